"""The declarative map between Hugging Face tensor names and zsjax param paths.

Each rule names a Hugging Face tensor (a regex; `(\d+)` captures the layer), the params path it
fills, both shapes as config attribute names, and whether the matrix is transposed (PyTorch's
Linear stores [out, in]; our kernels are [in, ...out]). Loading is: read, check the HF shape,
transpose, reshape to our shape. Export is the same rule backwards. Supporting another
architecture with the same blocks means adding rows, not code.
"""

from __future__ import annotations

import dataclasses
import re

from zsjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf: str  # regex over the HF tensor name
    path: str  # params path, "/"-separated; "{layer}" takes the captured layer index
    hf_shape: tuple[str, ...]  # config attributes giving the HF shape
    shape: tuple[str, ...]  # config attributes giving our shape
    transpose: bool = False  # HF [out, in] -> ours [in, out] before the reshape
    when: str | None = None  # config attribute that must be true for this tensor to exist

    def applies(self, config: ModelConfig) -> bool:
        return self.when is None or bool(getattr(config, self.when))

    def hf_dims(self, config: ModelConfig) -> tuple[int, ...]:
        return tuple(getattr(config, a) for a in self.hf_shape)

    def dims(self, config: ModelConfig) -> tuple[int, ...]:
        return tuple(getattr(config, a) for a in self.shape)


_L = r"model\.layers\.(\d+)\."
_P = "layers_{layer}/"

# Shared by LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (the `when` rows exist only
# in the configs whose flag is set: biases, untied heads, q/k norms).
DECODER_RULES: tuple[TensorRule, ...] = (
    TensorRule(r"model\.embed_tokens\.weight", "embed/embedding",
               ("vocab_size", "d_model"), ("vocab_size", "d_model")),
    TensorRule(r"model\.norm\.weight", "final_norm/scale", ("d_model",), ("d_model",)),
    TensorRule(r"lm_head\.weight", "lm_head/kernel", ("vocab_size", "d_model"),
               ("d_model", "vocab_size"), transpose=True, when="untied"),
    TensorRule(_L + r"input_layernorm\.weight", _P + "attn_norm/scale", ("d_model",),
               ("d_model",)),
    TensorRule(_L + r"post_attention_layernorm\.weight", _P + "mlp_norm/scale", ("d_model",),
               ("d_model",)),
    TensorRule(_L + r"self_attn\.q_proj\.weight", _P + "attn/q_proj/kernel",
               ("q_dim", "d_model"), ("d_model", "n_heads", "head_dim"), transpose=True),
    TensorRule(_L + r"self_attn\.k_proj\.weight", _P + "attn/k_proj/kernel",
               ("kv_dim", "d_model"), ("d_model", "n_kv_heads", "head_dim"), transpose=True),
    TensorRule(_L + r"self_attn\.v_proj\.weight", _P + "attn/v_proj/kernel",
               ("kv_dim", "d_model"), ("d_model", "n_kv_heads", "head_dim"), transpose=True),
    TensorRule(_L + r"self_attn\.o_proj\.weight", _P + "attn/o_proj/kernel",
               ("d_model", "q_dim"), ("n_heads", "head_dim", "d_model"), transpose=True),
    TensorRule(_L + r"self_attn\.q_proj\.bias", _P + "attn/q_proj/bias", ("q_dim",),
               ("n_heads", "head_dim"), when="qkv_bias"),
    TensorRule(_L + r"self_attn\.k_proj\.bias", _P + "attn/k_proj/bias", ("kv_dim",),
               ("n_kv_heads", "head_dim"), when="qkv_bias"),
    TensorRule(_L + r"self_attn\.v_proj\.bias", _P + "attn/v_proj/bias", ("kv_dim",),
               ("n_kv_heads", "head_dim"), when="qkv_bias"),
    TensorRule(_L + r"self_attn\.o_proj\.bias", _P + "attn/o_proj/bias", ("d_model",),
               ("d_model",), when="o_bias"),
    TensorRule(_L + r"self_attn\.q_norm\.weight", _P + "attn/q_norm/scale", ("head_dim",),
               ("head_dim",), when="qk_norm"),
    TensorRule(_L + r"self_attn\.k_norm\.weight", _P + "attn/k_norm/scale", ("head_dim",),
               ("head_dim",), when="qk_norm"),
    TensorRule(_L + r"mlp\.gate_proj\.weight", _P + "mlp/gate_proj/kernel",
               ("d_ff", "d_model"), ("d_model", "d_ff"), transpose=True),
    TensorRule(_L + r"mlp\.up_proj\.weight", _P + "mlp/up_proj/kernel",
               ("d_ff", "d_model"), ("d_model", "d_ff"), transpose=True),
    TensorRule(_L + r"mlp\.down_proj\.weight", _P + "mlp/down_proj/kernel",
               ("d_model", "d_ff"), ("d_ff", "d_model"), transpose=True),
)

RULES_BY_FAMILY = {"llama": DECODER_RULES, "qwen2": DECODER_RULES, "qwen3": DECODER_RULES}

# Tensors some checkpoints carry that hold nothing we need (recomputed or tied).
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def rules_for(config: ModelConfig) -> tuple[TensorRule, ...]:
    return RULES_BY_FAMILY[config.family]


def match(config: ModelConfig, hf_name: str) -> tuple[TensorRule, str] | None:
    """The rule and params path for an HF tensor name, or None if no rule matches."""
    for rule in rules_for(config):
        m = re.fullmatch(rule.hf, hf_name)
        if m:
            layer = m.group(1) if m.groups() else None
            if layer is not None and int(layer) >= config.n_layers:
                return None
            return rule, rule.path.format(layer=layer)
    return None


def expected(config: ModelConfig) -> dict[str, tuple[TensorRule, str]]:
    """Every params path the config needs -> (rule, HF tensor name)."""
    out = {}
    for rule in rules_for(config):
        if not rule.applies(config):
            continue
        layers = range(config.n_layers) if "{layer}" in rule.path else [None]
        for layer in layers:
            hf_name = rule.hf.replace(r"(\d+)", str(layer)).replace("\\.", ".")
            out[rule.path.format(layer=layer)] = (rule, hf_name)
    return out
