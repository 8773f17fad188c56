"""Generate text from a Hugging Face model folder with the zsjax decoder.

    python -m zsjax.generate --model DIR --prompt "What is the capital of France?" --chat

Stop-gap implementation (foundation issue): prefill once, then a jitted one-token decode step over
the explicit KV cache, driven from Python. The batched `lax.while_loop` sampler with stop strings
and top-p replaces the loop in the generation issue; this CLI keeps its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def load_tokenizer(model_dir: str):
    import transformers
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")) and not os.path.exists(
            os.path.join(model_dir, "tokenizer_config.json")):
        raise FileNotFoundError(f"model dir {model_dir} has no tokenizer.json or "
                                "tokenizer_config.json; --prompt needs a tokenizer")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


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


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat given but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def simple_generate(config, params, prompt_ids: list[int], *, max_new_tokens: int,
                    temperature: float = 0.0, eos: tuple[int, ...] = (), seed: int = 0):
    """One prompt; returns (generated ids, finish reason). Temperature 0 is greedy."""
    from zsjax.models import Decoder, init_cache

    model = Decoder(config)
    n = len(prompt_ids)
    padded = -(-n // 64) * 64  # bucket the prompt length so nearby prompts share a compile
    capacity = padded + max_new_tokens
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, padded - n:] = prompt_ids  # left padding: every row writes the same slots
    mask = np.arange(padded)[None] >= padded - n
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    def pick(logits, key):
        if temperature <= 0:
            return jnp.argmax(logits, -1)
        return jax.random.categorical(key, logits / temperature, -1)

    @jax.jit
    def prefill(params, tokens, positions, mask, key):
        logits, cache = model.apply({"params": params}, tokens, positions,
                                    init_cache(config, 1, capacity), mask)
        return pick(logits[:, -1], key), cache

    @jax.jit
    def step(params, token, position, cache, key):
        logits, cache = model.apply({"params": params}, token[:, None], position[:, None], cache)
        return pick(logits[:, -1], key), cache

    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    token, cache = prefill(params, tokens, positions, mask, sub)
    out: list[int] = []
    for i in range(max_new_tokens):
        t = int(token[0])
        out.append(t)
        if t in eos:
            return out, "eos"
        if i + 1 == max_new_tokens:
            break
        key, sub = jax.random.split(key)
        token, cache = step(params, token, jnp.array([n + i], jnp.int32), cache, sub)
    return out, "length"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate a continuation of a prompt with a Hugging Face model folder "
                    "(Llama / Qwen2 family) run by the zsjax decoder.")
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template as a user turn")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")

    from zsjax.models import CheckpointError, ConfigError, load_hf
    start = time.time()
    try:
        config, params = load_hf(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (FileNotFoundError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.time() - start
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    start = time.time()
    ids, reason = simple_generate(config, params, prompt_ids, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature,
                                  eos=eos_ids(args.model, config, tokenizer), seed=args.seed)
    gen_s = time.time() - start
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "tokens": ids, "finish_reason": reason,
                          "prompt_tokens": len(prompt_ids), "load_s": round(load_s, 3),
                          "generate_s": round(gen_s, 3)}))
    else:
        print(text)
        print(f"[{len(ids)} tokens, finish: {reason}, load {load_s:.1f}s, generate {gen_s:.1f}s "
              "incl. compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
