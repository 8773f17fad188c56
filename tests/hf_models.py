"""Tiny transformers models for parity tests, built offline from random configs."""

import numpy as np

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0}


def build_torch_model(family: str, *, tied: bool, rope=None, bias: bool = True, seed: int = 0,
                      vocab: int = 257, layers: int = 2, act: str = "silu"):
    """A small transformers model with every weight randomised (biases and norms included), so
    that a parity test is sensitive to each of them. Qwen3's head_dim (32) differs from
    hidden / heads (16), as in the real Qwen3 models."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                  hidden_act=act)
    if family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, attention_bias=bias,
                          rope_parameters=rope or {"rope_type": "default",
                                                   "rope_theta": 1000000.0})
        model = Qwen3ForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, rope_parameters=rope or {"rope_type": "default",
                                                              "rope_theta": 10000.0})
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, attention_bias=bias,
                          rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model.eval()


def torch_logits(model, tokens, attention_mask=None):
    import torch
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask, np.int64))
        return model(torch.tensor(np.asarray(tokens, np.int64)), **kwargs).logits.float().numpy()


def chat_ids(tokenizer, text):
    """A user turn through the tokenizer's chat template, as token ids."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)
