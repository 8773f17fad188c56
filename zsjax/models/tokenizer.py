"""A model folder's tokenizer (transformers'), and the facts about it that generation needs:
its EOS ids and whether it fits the model's embedding table."""

from __future__ import annotations

import json
import os


def load_tokenizer(model_dir: str):
    import transformers
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")) and not os.path.exists(
            os.path.join(model_dir, "tokenizer_config.json")):
        raise FileNotFoundError(f"model dir {model_dir} has no tokenizer.json or "
                                "tokenizer_config.json; its tokenizer is needed")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def check_vocab(tokenizer, config, where: str) -> None:
    """Raises ValueError when the tokenizer can produce ids past the model's embedding table
    (a smaller tokenizer is normal: embeddings are often padded to a multiple)."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding table has only {config.vocab_size} (vocab_size); the "
                         "tokenizer does not belong to this model")


def eos_ids(model_dir: str, config, tokenizer) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json and the tokenizer, merged."""
    ids = set(config.eos_token_ids)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        eos = json.load(open(gen_path)).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
