"""Logical axis names -> mesh axes.

Params and activations are annotated with logical names (`embed`, `mlp`, `heads`, `kv_heads`,
`vocab`, `batch`, `length`, ...). A rules table, part of the run's config, maps each name to mesh
axes of a ("data", "fsdp", "tensor") mesh. Resolution follows Flax's priority semantics: rules are
tried in order and a mesh axis is used at most once per array. On top of that, a mesh axis that
does not divide an array dimension is dropped (that dimension is replicated) so that odd sizes,
such as SmolLM2's 3 KV heads on tensor=2, still load.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model dimension of params over `fsdp`; tensor parallelism shards heads, MLP
# hidden units and the vocabulary over `tensor`; the batch is split over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # scan_layers' stacked axis: every device holds every layer's shard
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def as_rules(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Normalises a rules table (e.g. nested lists from an ml-collections config) to hashable
    tuples, so it can be a static jit argument."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes); got {rule!r}")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad:
            raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {bad}; "
                             f"mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def _check_sizes(data, fsdp, tensor) -> None:
    if any(not isinstance(s, int) or (s < 1 and s != -1) for s in (data, fsdp, tensor)):
        raise ValueError(f"mesh sizes are integers >= 1, or -1 for the rest of the devices; "
                         f"got data={data}, fsdp={fsdp}, tensor={tensor}")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD-style propagation).

    A size of -1 takes all remaining devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    _check_sizes(data, fsdp, tensor)
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got data={data}, fsdp={fsdp}, "
                         f"tensor={tensor}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor}: the -1 axis "
                             f"takes the rest of {len(devices)} devices, which the other axes' "
                             f"{known} do not divide")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs "
                         f"{math.prod(shape)} devices; {len(devices)} are available")
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(data: int, fsdp: int, tensor: int) -> Mesh | None:
    """The run's mesh from config sizes (-1 = the rest of the devices); None for a single device.
    A fully specified mesh smaller than the machine uses the first devices."""
    _check_sizes(data, fsdp, tensor)
    sizes = [data, fsdp, tensor]
    if -1 not in sizes:
        n = math.prod(sizes)
        if n == 1:
            return None
        return make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
    mesh = make_mesh(data, fsdp, tensor)
    return None if mesh.size == 1 else mesh


def device_slice(spec: str, devices) -> list:
    """`devices[A:B]` for a spec "A:B" (either end may be empty); all of them for ""."""
    devices = list(devices)
    if not spec:
        return devices
    try:
        lo, hi = (int(x) if x.strip() else None for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"a device slice is 'A:B' (e.g. '0:4'); got {spec!r}") from None
    picked = devices[lo:hi]
    if not picked:
        raise ValueError(f"device slice {spec!r} selects none of this process's "
                         f"{len(devices)} devices")
    return picked


def local_mesh(data: int, fsdp: int, tensor: int, devices: str = "") -> Mesh:
    """A mesh over this process's own devices (`devices`: a slice "A:B" of them; -1 sizes take
    the rest): generation meshes, which each process drives on its own. Always a Mesh, even of
    one device, so that it names the device it lives on."""
    local = device_slice(devices, jax.local_devices())
    _check_sizes(data, fsdp, tensor)
    sizes = [data, fsdp, tensor]
    if -1 not in sizes:
        n = math.prod(sizes)
        if n > len(local):
            raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} "
                             f"devices; this process has {len(local)} (devices={devices!r})")
        local = local[:n]
    return make_mesh(data, fsdp, tensor, devices=local)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with the given logical dim names (and shape, for divisibility)."""
    spec = list(nn.logical_to_mesh_axes(tuple(names), as_rules(rules)))
    spec += [None] * (len(names) - len(spec))
    if shape is not None:
        for i, axes in enumerate(spec):
            if axes is None:
                continue
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            # Keep the longest prefix of mesh axes whose product divides the dimension.
            kept: list[str] = []
            for a in axes_t:
                if shape[i] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                    kept.append(a)
                else:
                    break
            spec[i] = None if not kept else (kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def tree_shardings(logical_specs, shapes, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Maps a tree of logical PartitionSpecs (and a matching tree of shapes) to NamedShardings."""
    return jax.tree.map(
        lambda spec, shape: named_sharding(tuple(spec), tuple(shape), mesh, rules),
        logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def mesh_of(tree) -> Mesh | None:
    """The mesh a tree of arrays is placed on, or None when it is not on a NamedSharding."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None,
              rules: Rules = DEFAULT_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def shard_shape(x: jax.Array) -> tuple[int, ...]:
    """The shape of one addressable shard of x (for tests and logs)."""
    return tuple(np.shape(x.addressable_shards[0].data))
