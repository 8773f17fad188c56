"""A tiny, self-contained setup for smoke runs and tests: a QA jsonl, a byte-level BPE tokenizer
trained on the spot (with a chat-free template), and random tiny policy and simulator models
saved as Hugging Face folders. Nothing is downloaded.

    python -m zsjax.tools.tiny_fixture DIR      # writes it, prints its paths
"""

from __future__ import annotations

import json
import os

import jax

from zsjax.data.bpe import train_bpe
from zsjax.models import ModelConfig, init_params, save_hf
from zsjax.search import prompts as P
from zsjax.search.simulator import FINETUNED_TEMPLATE

COUNTRIES = ["Zorland", "Quessia", "Brevania", "Oskelia", "Dunrath", "Mirevo", "Talvenia",
             "Korsica"]
CAPITALS = ["Vex", "Lorn", "Pelt", "Oskel", "Dunra", "Miro", "Tal", "Kors"]


def qa_rows() -> list[dict]:
    return [{"id": str(i), "question": f"What is the capital of {c}?", "golden_answers": [cap]}
            for i, (c, cap) in enumerate(zip(COUNTRIES, CAPITALS))]


def _tokenizer(path: str, vocab_size: int = 600):
    texts = [P.POLICY_TEMPLATE, P.INVALID_ACTION, P.information_block("Doc 1: x"),
             FINETUNED_TEMPLATE] + [json.dumps(r) for r in qa_rows()]
    fast = train_bpe(texts * 4, vocab_size=vocab_size, specials=["<pad>", "<eos>"],
                     eos="<eos>", pad="<pad>")
    fast.save_pretrained(path)
    return fast


def fixture_paths(directory: str) -> dict[str, str]:
    """Where `make` puts the fixture: {qa, policy, simulator}."""
    return {"qa": os.path.join(directory, "qa.jsonl"),
            "policy": os.path.join(directory, "policy_hf"),
            "simulator": os.path.join(directory, "simulator_hf")}


def make(directory: str, *, seed: int = 0) -> dict[str, str]:
    """Writes the fixture (idempotent); returns paths {qa, policy, simulator}."""
    paths = fixture_paths(directory)
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(directory, exist_ok=True)
    with open(paths["qa"], "w") as f:
        for r in qa_rows():
            f.write(json.dumps(r) + "\n")
    tok_dir = os.path.join(directory, "tokenizer")
    tok = _tokenizer(tok_dir)
    # transformers may add a special token when it reloads the tokenizer as a Qwen2 one; like
    # real checkpoints, the embedding table is padded past the tokenizer (to a multiple of 64).
    vocab = -(-(len(tok) + 1) // 64) * 64
    for i, name in enumerate(("policy", "simulator")):
        config = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4,
                             n_kv_heads=2, head_dim=16, d_ff=128, family="qwen2", qkv_bias=True,
                             tie_embeddings=True, eos_token_ids=(tok.eos_token_id,),
                             pad_token_id=tok.pad_token_id)
        params = init_params(config, jax.random.key(seed + i))
        save_hf(config, params, paths[name], tokenizer_dir=tok_dir)
    return paths

