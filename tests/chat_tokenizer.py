"""A small byte-level BPE chat tokenizer built offline with the `tokenizers` library.

It has what the rollout, stop-string, simulator and SFT tests need from a real instruct
tokenizer: byte-level pieces (a CJK character splits into tokens that decode alone to '\ufffd'),
ChatML special tokens, and a ChatML chat template of the SmolLM2 / Qwen2.5 kind (a default system
message when the chat has none). Tests that compare with a real checkpoint use SmolLM2's own.
"""

from __future__ import annotations

from zsjax.data.bpe import CHATML_SPECIALS, CHATML_TEMPLATE, train_bpe
from zsjax.search import prompts as P
from zsjax.search.simulator import FINETUNED_TEMPLATE

SPECIALS = list(CHATML_SPECIALS)
CHAT_TEMPLATE = CHATML_TEMPLATE

_TEXTS = [
    P.POLICY_TEMPLATE, P.INVALID_ACTION, P.information_block("Doc 1: x"), FINETUNED_TEMPLATE,
    "<search> capital of France </search> <answer> Paris </answer> <think> first </think>",
    "What is the capital of France? Who wrote Hamlet? Name a colour. The Qux river.",
    "Doc 1: Vex is the capital city of Zorland. Mira Tal was born in Oskel in 1902.",
    "The Dunra river runs through Oskel. Zorland is famous for its blue goats.",
    "the final answer is here, and more text about search engines and documents",
]


def build(vocab_size: int = 1000):
    """A transformers fast tokenizer (no torch needed), EOS `<|im_end|>`, pad `<|endoftext|>`."""
    return train_bpe(_TEXTS * 8, vocab_size=vocab_size, specials=SPECIALS, eos="<|im_end|>",
                     pad="<|endoftext|>", extra_specials=["<|im_start|>"],
                     chat_template=CHAT_TEMPLATE)


def save(path: str, vocab_size: int = 1000):
    """Builds the tokenizer and saves it as a model folder's tokenizer files; returns it."""
    tok = build(vocab_size)
    tok.save_pretrained(path)
    return tok


def tiny_model(tokenizer, *, seed: int = 0, family: str = "llama"):
    """(config, params): a randomly initialised 2-layer zsjax decoder for `tokenizer`, its
    embedding table padded to a multiple of 64 as real checkpoints pad theirs."""
    import jax
    from zsjax.models import ModelConfig, init_params
    config = ModelConfig(vocab_size=-(-len(tokenizer) // 64) * 64, d_model=64, n_layers=2,
                         n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, family=family,
                         tie_embeddings=True, eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id)
    return config, init_params(config, jax.random.key(seed))


def save_tiny_model(path: str, *, seed: int = 0) -> str:
    """A Hugging Face folder (config, safetensors, tokenizer) holding `tiny_model`."""
    import os
    import tempfile
    from zsjax.models import save_hf
    with tempfile.TemporaryDirectory() as tok_dir:
        tok = save(tok_dir)
        config, params = tiny_model(tok, seed=seed)
        save_hf(config, params, os.fspath(path), tokenizer_dir=tok_dir)
    return os.fspath(path)
