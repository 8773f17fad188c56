"""LoRA adapters on a zsjax params tree: initialise, merge into the weights, export as a PEFT
adapter folder.

An adapter on a kernel W is a pair (A, B) with W' = W + (alpha / rank) * A @ B, A [in..., rank]
and B [rank, out...] in the kernel's own axes (q/k/v [d_model | heads, head_dim], o_proj
[heads, head_dim | d_model], the MLP's [in | out]). B starts at zero, so a fresh adapter
changes nothing; A starts as PEFT's does (Kaiming-uniform, bound 1 / sqrt(fan_in)).

Why params-level and not qwix: qwix 0.1.8's Linen LoRA (`qwix.apply_lora_to_model`) adapts
`nn.Dense` layers but not the `nn.DenseGeneral` projections zsjax's attention uses (an
initialised Decoder got `kernel_lora_a` on gate/up/down_proj only, none on q/k/v/o_proj),
and attention is LoRA's default target. Adapters beside the params keep the model code as
it is, and are what the optimizer, the checkpoints and the PEFT export hold.

Training (`zsjax.train` with `policy.lora.rank > 0`, `zsjax.sft` with `model.lora.rank > 0`):
the train state's params are a `LoraParams` (the base weights, the adapters, the scale). The
base is frozen by the optimizer's own mechanism (`FROZEN`: no gradient, no optimizer state);
checkpoints hold the adapters and their optimizer state only (`saved_part`); the KL reference is
the base itself.

Merged or not, chosen by measurement (`benchmarks/lora.py`, docs/PERFORMANCE.md):
- Rollouts decode merged weights (`merged`, once a step): an un-merged decode runs the base's
  matmuls plus two small ones per adapted projection and token, so it can be no faster than
  decoding merged weights, and the merge costs 6-7% of one step's decode (SmolLM2, CPU).
- Training passes (`apply`) differentiate the merged weights W + s A B too. The alternative,
  un-merged projections x W + s (x A) B (`LoraParams.unmerged`: the model's Dense layers are
  intercepted with `flax.linen.intercept_methods`, the model code unchanged), skips each
  kernel's full gradient x^T dy in the backward pass, yet measured slower on a CPU (SmolLM2,
  8 x 256 tokens: 13.5 s and 15.6 s a GRPO step against 11.1 s and 12.6 s in two runs, and
  7.1 GB peak against 6.7 GB). It is kept for `benchmarks/lora.py` to measure on
  accelerators, where the saved FLOPs may win.
LoRA dropout (`dropout > 0`) acts on the adapter's own input, which merged weights do not
have: with it, training passes are un-merged and drop entries of x in s (dropout(x) A) B, as
PEFT does. Its masks are a function of a number fixed at the start (from the seed) and of the
pass's tokens, so a resumed run draws the same ones; rollouts and evaluation decode without it.
In RL the trainer's first pass then differs from the sampler's policy (the PPO ratio is not
exactly 1); with `rl.old_logprobs=recompute` the old logprobs see the same masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# Kernels whose input spans two axes (heads, head_dim); every other kernel's input is axis 0.
_IN_AXES = {"o_proj": 2}
DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
# zsjax module path -> Hugging Face module name (as PEFT names adapter weights)
_HF_MODULES = {"attn": "self_attn", "mlp": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS  # a regex searched in "layers_0/attn/q_proj/kernel" paths

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1; got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1); got {self.dropout}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0; got {self.alpha!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets={self.targets!r} is not a regular expression: "
                             f"{e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def target_paths(params, config: LoraConfig) -> list[str]:
    """The kernels the adapters attach to ("layers_0/attn/q_proj/kernel", ...), in tree
    order; a pattern that matches none is an error."""
    found = [_path(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if re.search(config.targets, _path(p)) and getattr(x, "ndim", 0) >= 2]
    if not found:
        raise ValueError(f"lora.targets={config.targets!r} matches no kernel")
    return found


def _leaf(params, path: str):
    node = params
    for k in path.split("/"):
        node = node[k]
    return node


def _split(path: str, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_in = _IN_AXES.get(path.split("/")[-2], 1)
    return tuple(shape[:n_in]), tuple(shape[n_in:])


def init(params, config: LoraConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """{kernel path: {"a": A, "b": B}}: A Kaiming-uniform as PEFT's, B zeros."""
    adapters = {}
    paths = target_paths(params, config)
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        w = _leaf(params, path)
        ins, outs = _split(path, w.shape)
        bound = 1.0 / math.sqrt(math.prod(ins))
        adapters[path] = {
            "a": jax.random.uniform(k, (*ins, config.rank), jnp.float32, -bound, bound),
            "b": jnp.zeros((config.rank, *outs), jnp.float32)}
    return adapters


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in the kernel's shape."""
    return scale * jnp.tensordot(a, b, axes=1)


def merge(params, adapters, config: LoraConfig):
    """The params with every adapted kernel replaced by W + scale * A @ B (in W's dtype)."""
    return _merge(params, adapters, config.scale)


def _merge(params, adapters, scale: float):
    def visit(path, w):
        p = _path(path)
        if p not in adapters:
            return w
        ad = adapters[p]
        return (w.astype(jnp.float32) + delta(ad["a"], ad["b"], scale)).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(visit, params)


# --- Training with adapters -------------------------------------------------------------------

@flax.struct.dataclass
class LoraParams:
    """A train state's params under LoRA: the frozen base weights and the trained adapters
    ({kernel path: {"a", "b"}}), with the scale alpha / rank (static). `unmerged` (static):
    training passes through un-merged projections instead of merged weights (slower on a CPU;
    kept to measure the choice elsewhere, `benchmarks/lora.py`). `dropout` (static) > 0:
    un-merged passes that drop the adapters' inputs, with masks drawn from `dropout_seed`
    (static: a key among the params would pass through the optimizer's float arithmetic) and
    the pass's tokens."""
    base: Any
    adapters: dict
    scale: float = flax.struct.field(pytree_node=False)
    unmerged: bool = flax.struct.field(pytree_node=False, default=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    dropout_seed: int = flax.struct.field(pytree_node=False, default=0)


# The optimizer's `freeze` pattern (`zsjax.rl.step.make_optimizer`) that leaves a LoraParams'
# base out of the gradient and the optimizer state: its paths read ".base['embed']...".
FROZEN = r"^\.base\["


def from_settings(settings) -> LoraConfig | None:
    """The LoraConfig of a config's `lora` block ({rank, alpha, dropout, targets}); None when
    rank is 0 (LoRA off)."""
    if settings is None or not settings.get("rank", 0):
        return None
    return LoraConfig(rank=settings["rank"], alpha=float(settings["alpha"]),
                      dropout=float(settings["dropout"]), targets=settings["targets"])


def from_training_config(settings, freeze: str, where: str, freeze_key: str
                         ) -> LoraConfig | None:
    """`from_settings` for a trainer: a ValueError that names the config keys (`where`, e.g.
    "policy.lora"; `freeze_key`, e.g. "rl.freeze") for a bad value, or for a freeze pattern
    set beside LoRA (which trains the adapters only)."""
    try:
        config = from_settings(settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if config is not None and freeze:
        raise ValueError(f"{freeze_key}={freeze!r} with {where}: LoRA trains the adapters only "
                         f"(the base is frozen); choose the adapted kernels with "
                         f"{where}.targets")
    return config


def attach(params, config: LoraConfig, key: jax.Array) -> LoraParams:
    """Fresh adapters (`init`) beside `params` (and a dropout seed when config.dropout > 0).
    On a mesh, the adapters (a few MB) are replicated over it."""
    init_key, dropout_key = jax.random.split(key)
    adapters = init(params, config, init_key)
    extra = {}
    if config.dropout:
        extra = {"dropout": config.dropout,
                 "dropout_seed": int(jax.random.randint(dropout_key, (), 0, 2 ** 31 - 1))}
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(params)
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    if mesh is not None:
        adapters = jax.device_put(adapters, NamedSharding(mesh, PartitionSpec()))
    return LoraParams(base=params, adapters=adapters, scale=config.scale, **extra)


def weights(params):
    """The weights a forward pass uses: the base with the adapters merged in for LoraParams,
    anything else as it is."""
    if isinstance(params, LoraParams):
        return _merge(params.base, params.adapters, params.scale)
    return params


merged = jax.jit(weights)  # a step's rollout weights, merged once


def apply(model: nn.Module, params, tokens, *args, **kwargs):
    """`model.apply({"params": params}, tokens, ...)`; for LoraParams, on `weights(params)`
    (or, when `unmerged` or with dropout, on the base with every adapted projection adding
    s (dropout(x) A) B to its output)."""
    if not isinstance(params, LoraParams):
        return model.apply({"params": params}, tokens, *args, **kwargs)
    if not (params.unmerged or params.dropout):
        return model.apply({"params": weights(params)}, tokens, *args, **kwargs)
    key = None
    if params.dropout:
        key = jax.random.fold_in(jax.random.key(params.dropout_seed), _fingerprint(tokens))
    with nn.intercept_methods(_adapter_interceptor(params.adapters, params.scale,
                                                   params.dropout, key)):
        return model.apply({"params": params.base}, tokens, *args, **kwargs)


def _fingerprint(tokens) -> jax.Array:
    """A uint32 function of a token array (its entries weighted by position, wrapping), so that
    different batches draw different dropout masks and the same batch the same ones."""
    t = jnp.asarray(tokens).astype(jnp.uint32).reshape(-1)
    weights_ = jnp.arange(t.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(t * weights_)


def _adapter_interceptor(adapters: dict, scale: float, dropout: float = 0.0, key=None):
    """A `flax.linen.intercept_methods` interceptor: the Dense / DenseGeneral layers whose
    kernel is adapted return x W (+ bias) + scale * (dropout(x) A) B, in the layer's compute
    dtype; each kernel's mask from `key` folded with the kernel's index."""
    index = {path: i for i, path in enumerate(sorted(adapters))}

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__"
                or not isinstance(module, (nn.Dense, nn.DenseGeneral))):
            return y
        path = "/".join((*module.path, "kernel"))
        ad = adapters.get(path)
        if ad is None:
            return y
        a, b = ad["a"].astype(y.dtype), ad["b"].astype(y.dtype)
        x = args[0].astype(y.dtype)
        if dropout:
            keep = jax.random.bernoulli(jax.random.fold_in(key, index[path]), 1.0 - dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(y.dtype)
        xa = jnp.tensordot(x, a, axes=a.ndim - 1)  # over the kernel's input axes
        return y + scale * jnp.tensordot(xa, b, axes=1)
    return intercept


def saved_part(state):
    """What a checkpoint holds of a train state: with LoraParams, the state with the adapters
    as its params (the optimizer state has nothing for the frozen base); else the state."""
    if isinstance(getattr(state, "params", None), LoraParams):
        return state.replace(params=state.params.adapters)
    return state


def with_saved(state, saved):
    """`state` with what `saved_part` kept of it replaced by `saved` (a restored checkpoint)."""
    if isinstance(getattr(state, "params", None), LoraParams):
        return saved.replace(params=state.params.replace(adapters=saved.params))
    return saved


def record(config: LoraConfig | None) -> dict | None:
    """The LoRA setting as a checkpoint's JSON record keeps it (None: no LoRA)."""
    return None if config is None else {"rank": config.rank, "alpha": config.alpha,
                                        "targets": config.targets}


def check_resumable(saved: dict | None, config: LoraConfig | None, where: str) -> None:
    """A ValueError unless a checkpoint's recorded LoRA setting (`record`) is this run's."""
    mine = record(config)
    if saved == mine:
        return

    def say(m):
        return ("without LoRA" if m is None else
                f"with LoRA rank {m['rank']}, alpha {m['alpha']}, targets {m['targets']!r}")
    raise ValueError(f"the checkpoint in {where} was written {say(saved)}, this run is "
                     f"{say(mine)}; resume it with the LoRA setting that wrote it, or pick a "
                     "new workdir")


def count(adapters) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def peft_state(adapters, config: LoraConfig) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them for a Hugging Face causal LM
    (`base_model.model.model.layers.I.self_attn.q_proj.lora_A.weight` [rank, in] and
    `...lora_B.weight` [out, rank], with in and out flattened as the HF weight's)."""
    out = {}
    for path, ad in adapters.items():
        layer, module, proj, _ = path.split("/")
        i = int(layer.split("_")[1])
        name = f"base_model.model.model.layers.{i}.{_HF_MODULES[module]}.{proj}"
        a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, config.rank).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(config.rank, -1).T)
    return out


def save_peft(adapters, config: LoraConfig, path: str, base_model: str = "") -> None:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_model, path)` loads."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    modules = sorted({p.split("/")[2] for p in adapters})
    save_file(peft_state(adapters, config), os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
                   "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
                   "inference_mode": True, "base_model_name_or_path": base_model}, f, indent=1)
