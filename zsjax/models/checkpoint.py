"""Hugging Face folders <-> (ModelConfig, params), streamed tensor by tensor.

Loading reads one tensor, checks its shape against config.json, transposes/reshapes it by the
mapping table, casts it, and places it straight onto its sharding (each device receives only its
own slice), before reading the next. Peak host memory is about one tensor above the params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from zsjax import sharding
from zsjax.models import decoder, hf_mapping, safetensors_io
from zsjax.models.config import ModelConfig, read_hf_config, to_hf_dict


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or the mapping table."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "generation_config.json", "added_tokens.json")


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get_path(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def load_hf(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
            mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, scan_layers: bool = False
            ) -> tuple[ModelConfig, dict]:
    """A Hugging Face folder (config.json + safetensors, single or sharded) -> (config, params).

    `dtype` is the compute dtype, and the params' too unless `param_dtype` says otherwise:
    weights to train want float32 (`param_dtype="float32"`) under bfloat16 compute, since an
    update of lr 1e-6 is far below a bfloat16 weight's rounding step (about 1e-4 at 0.02).
    With a mesh, each param is placed on its NamedSharding from the logical axis rules.
    `scan_layers` returns the config and params in the scanned layout (`decoder.stack_layers`);
    the per-layer tensors are read first, so the layers' weights are held twice for a moment.
    """
    config = read_hf_config(path, dtype=dtype)
    if param_dtype is not None:
        config = dataclasses.replace(config, param_dtype=param_dtype)
    expected = hf_mapping.expected(config)
    shapes = jax.tree.map(lambda s: s.shape, decoder.param_shapes(config))
    if mesh is not None:
        shardings = sharding.tree_shardings(decoder.param_logical_axes(config), shapes, mesh,
                                            rules)
    target_dtype = np.dtype(jax.numpy.dtype(config.param_dtype))

    params: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for file in safetensors_io.iter_checkpoint_files(path):
        with safetensors_io.SafetensorsFile(file) as f:
            for name in f.keys():
                if any(p.fullmatch(name) for p in hf_mapping.IGNORED):
                    continue
                found = hf_mapping.match(config, name)
                if found is None:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has no entry in the {config.family} mapping "
                        "table (zsjax.models.hf_mapping); the checkpoint does not match its "
                        "config.json or is an unsupported architecture")
                rule, param_path = found
                if not rule.applies(config):
                    if rule.when == "untied":
                        continue  # a tied checkpoint that also stores lm_head: transformers ignores it
                    raise CheckpointError(
                        f"{file}: tensor {name!r} exists but config.json implies "
                        f"{rule.when}=false")
                want = rule.hf_dims(config)
                got = f.shape(name)
                if got != want:
                    raise CheckpointError(_shape_message(file, name, got, want, rule, config))
                host = f.read(name)
                if rule.transpose:
                    host = host.T
                host = np.ascontiguousarray(host.reshape(rule.dims(config)), dtype=target_dtype)
                if mesh is None:
                    value = jax.device_put(host)
                else:
                    target = _get_path(shardings, param_path)
                    value = jax.make_array_from_callback(host.shape, target,
                                                         lambda idx, h=host: h[idx])
                _set_path(params, param_path, value)
                seen[param_path] = file
                del host

    missing = [f"{hf_name!r} (for {p})" for p, (_, hf_name) in expected.items() if p not in seen]
    if missing:
        raise CheckpointError(f"model dir {path} lacks {len(missing)} tensor(s) that its "
                              f"config.json needs: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    if scan_layers:
        config = dataclasses.replace(config, scan_layers=True)
        params = decoder.stack_layers(params, config.n_layers)
        if mesh is not None:
            params = jax.device_put(params, sharding.tree_shardings(
                decoder.param_logical_axes(config),
                jax.tree.map(lambda s: s.shape, decoder.param_shapes(config)), mesh, rules))
    return config, params


def _shape_message(file, name, got, want, rule, config) -> str:
    msg = (f"{file}: tensor {name!r} has shape {list(got)}, but config.json implies "
           f"{list(want)} ({' x '.join(rule.hf_shape)})")
    if "vocab_size" in rule.hf_shape:
        i = rule.hf_shape.index("vocab_size")
        if len(got) == len(want) and got[i] != want[i]:
            msg += (f"; vocab mismatch: config.json vocab_size={config.vocab_size}, the "
                    f"checkpoint has {got[i]} rows")
    return msg


def save_hf(config: ModelConfig, params: dict, path: str, *, dtype: str | None = None,
            max_shard_bytes: int = 2 * 2**30, tokenizer_dir: str | None = None) -> None:
    """Writes a Hugging Face folder that transformers loads (`from_pretrained(path)`).

    Streams one param at a time to host (gathering it if sharded). Files above
    `max_shard_bytes` are split, with a `model.safetensors.index.json`. `tokenizer_dir`, if given,
    is a folder whose tokenizer files are copied alongside. Params in the scan_layers layout
    are written per layer, as Hugging Face holds them.
    """
    os.makedirs(path, exist_ok=True)
    if "layers" in params:  # the scan_layers layout: checkpoints are per layer
        params = decoder.unstack_layers(params)
    out_dtype = np.dtype(jax.numpy.dtype(dtype or config.param_dtype))
    entries = []  # (hf_name, hf_shape, param_path, rule)
    for param_path, (rule, hf_name) in hf_mapping.expected(config).items():
        try:
            _get_path(params, param_path)
        except (KeyError, TypeError):
            raise CheckpointError(f"params have no {param_path!r}, needed for {hf_name!r}; "
                                  "are these params for this config?") from None
        entries.append((hf_name, rule.hf_dims(config), param_path, rule))
    entries.sort(key=lambda e: e[0])

    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes

    def produce(by_name):
        def _produce(hf_name):
            _, hf_shape, param_path, rule = by_name[hf_name]
            value = np.asarray(jax.device_get(_get_path(params, param_path)))
            if rule.transpose:
                value = value.reshape(hf_shape[::-1]).T
            return np.ascontiguousarray(value.reshape(hf_shape), dtype=out_dtype)
        return _produce

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
        by_name = {e[0]: e for e in shard}
        safetensors_io.write(os.path.join(path, fname),
                             [(e[0], e[1], out_dtype) for e in shard], produce(by_name),
                             metadata={"format": "pt"})
        weight_map.update({e[0]: fname for e in shard})
    if len(shards) > 1:
        total = sum(int(np.prod(e[1])) * out_dtype.itemsize for e in entries)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    # Weight files of an earlier export into this folder would be read instead of, or with,
    # the new ones (transformers reads model.safetensors before an index).
    for name in os.listdir(path):
        stale = (name == "model.safetensors.index.json" and len(shards) == 1) or (
            name not in names and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name))
        if stale:
            os.remove(os.path.join(path, name))

    hf = to_hf_dict(config)
    hf["dtype"] = hf["torch_dtype"] = (str(out_dtype) if out_dtype != np.dtype("bfloat16")
                                       else "bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
                    os.path.join(path, name)):
                shutil.copy(src, path)
