"""The Llama / Qwen2 / Qwen3 decoder, pure functions of a params pytree, and Hugging Face
checkpoints."""

from zsjax.models.checkpoint import CheckpointError, load_hf, save_hf
from zsjax.models.config import ConfigError, ModelConfig, RopeScaling, from_hf_dict, to_hf_dict
from zsjax.models.decoder import (Decoder, KVCache, forward, init_cache, init_params,
                                  param_logical_axes, param_shardings)

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "KVCache", "ModelConfig", "RopeScaling",
    "forward", "from_hf_dict", "init_cache", "init_params", "load_hf", "param_logical_axes",
    "param_shardings", "save_hf", "to_hf_dict",
]
