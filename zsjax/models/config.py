"""Model hyper-parameters, and their translation from/to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Hugging Face architecture name -> our family name. The families share one decoder and one
# checkpoint mapping table; they differ only in config flags (q/k/v bias, q/k norms, the
# activation, rope scaling, tying), set from config.json by `from_hf_dict`.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# Architectures that are recognised but not supported, with the reason.
UNSUPPORTED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "Qwen3-MoE (mixture-of-experts MLPs) is not supported; zsjax loads "
                           "the dense Qwen3 models (0.6B to 32B)",
}
# The MLP's gate activation, by its Hugging Face `hidden_act` name (`zsjax.models.decoder`).
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


DTYPES = ("float32", "bfloat16", "float16")  # param and compute dtypes a model may take


class ConfigError(ValueError):
    """A model config that zsjax cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is "llama3" or "linear"; unused fields stay None."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs. Frozen and hashable, so it can be a static jit argument."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    family: str = "llama"  # "llama" | "qwen2" | "qwen3"
    activation: str = "silu"  # the MLP's gate activation (ACTIVATIONS); SwiGLU with silu
    qk_norm: bool = False  # an RMSNorm over head_dim on each head's q and k, before RoPE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The layers as one scan over stacked params (zsjax.models.decoder): compile time that does
    # not grow with depth. A layout of zsjax's params, not of the model: never in config.json.
    scan_layers: bool = False

    def __post_init__(self):
        if self.family not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(f"unknown model family {self.family!r}; expected one of "
                              f"{sorted(set(SUPPORTED_ARCHITECTURES.values()))}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected float32, bfloat16 "
                                  "or float16")

    # Derived sizes, used by the checkpoint mapping table.
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def untied(self) -> bool:
        return not self.tie_embeddings

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        per_layer = (d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * f + 2 * d
                     + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)
                     + (d if self.o_bias else 0) + (2 * self.head_dim if self.qk_norm else 0))
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Reads RoPE settings from either config style.

    transformers >= 5 writes `rope_parameters` (theta inside); older folders have top-level
    `rope_theta` and an optional `rope_scaling` dict (whose type key was once `type`).
    """
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; zsjax supports "
                          f"{', '.join(_SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor' field")
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=_opt_float(params.get("low_freq_factor")),
        high_freq_factor=_opt_float(params.get("high_freq_factor")),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )
    if rope_type == "llama3" and None in (scaling.low_freq_factor, scaling.high_freq_factor,
                                          scaling.original_max_position_embeddings):
        raise ConfigError(f"{source}: llama3 rope scaling needs low_freq_factor, "
                          "high_freq_factor and original_max_position_embeddings")
    return theta, scaling


def _opt_float(x):
    return None if x is None else float(x)


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_dict(hf: dict[str, Any], *, dtype: str = "float32", source: str = "config.json"
                 ) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face config dict; raises ConfigError when unsupported."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES),
                  None)
    for arch in archs:
        if arch in UNSUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: {UNSUPPORTED_ARCHITECTURES[arch]}")
    if family is None and not archs and model_type in set(SUPPORTED_ARCHITECTURES.values()):
        family = model_type
    if family is None:
        raise ConfigError(
            f"{source}: architecture {archs or model_type!r} is not supported; zsjax loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama, Qwen2/Qwen2.5 and dense Qwen3 "
            "families)")
    if hf.get("hidden_act", "silu") not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; zsjax supports "
                          f"{', '.join(ACTIVATIONS)}")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported; zsjax "
                          "implements full attention only")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        if key not in hf:
            raise ConfigError(f"{source}: missing required field {key!r}")
    theta, scaling = _rope_from_hf(hf, source)
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        d_ff=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        activation=hf.get("hidden_act", "silu"),
        qk_norm=family == "qwen3",
        # Qwen2 always has q/k/v bias and no o bias; Llama's and Qwen3's attention_bias covers
        # all four.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        dtype=dtype,
        param_dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The inverse of from_hf_dict, in the transformers 5 style (`rope_parameters`), with the
    older keys beside it (`rope_theta`, `rope_scaling`, `torch_dtype`) for readers built on
    transformers 4, which would otherwise take the default theta of 10000 without a word."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update({k: v for k, v in dataclasses.asdict(config.rope_scaling).items()
                     if v is not None})
    arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[config.family]
    eos = list(config.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.activation,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "dtype": config.param_dtype,
        "rope_theta": config.rope_theta,
        "torch_dtype": config.param_dtype,
    }
    if config.rope_scaling is not None:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        hf["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    if config.family in ("llama", "qwen3"):
        if config.qkv_bias != config.o_bias:
            raise ConfigError(f"{arch} checkpoints have one attention_bias flag for q/k/v/o; "
                              f"got qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
        hf["attention_bias"] = config.qkv_bias
    if config.family == "llama":
        hf["mlp_bias"] = False
    else:
        hf["use_sliding_window"] = False
    if config.qk_norm != (config.family == "qwen3"):
        raise ConfigError(f"{arch} checkpoints {'have' if config.family == 'qwen3' else 'have no'} "
                          f"q/k norms; got qk_norm={config.qk_norm}")
    return hf


def read_hf_config(path: str, *, dtype: str = "float32") -> ModelConfig:
    """Reads `path/config.json` into a ModelConfig."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model dir {path} does not exist; expected a Hugging Face model "
                                "folder (config.json + *.safetensors)")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"model dir {path} has no config.json; expected a Hugging Face "
                                "model folder (config.json + *.safetensors)")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
    return from_hf_dict(hf, dtype=dtype, source=cfg_path)
