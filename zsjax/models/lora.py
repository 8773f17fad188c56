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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

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
        re.compile(self.targets)

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
    def visit(path, w):
        p = _path(path)
        if p not in adapters:
            return w
        ad = adapters[p]
        return (w.astype(jnp.float32) + delta(ad["a"], ad["b"], config.scale)).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(visit, params)


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
