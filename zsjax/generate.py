"""Generate text from a Hugging Face model folder with the zsjax decoder.

    python -m zsjax.generate --model DIR --prompt "What is the capital of France?" --chat

A thin shell over `zsjax.sampling.generate` (the same sampler the RL rollout uses). `--prompt`
may be repeated: the prompts are generated together as one ragged batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


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


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat given but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate a continuation of a prompt with a Hugging Face model folder "
                    "(Llama / Qwen2 family) run by the zsjax decoder.")
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template as a user turn")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string, e.g. '</search>'; may be repeated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")

    from zsjax.models import load_hf
    start = time.time()
    try:
        config, params = load_hf(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as e:  # Config-, Checkpoint-, SafetensorsError
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.time() - start
    from zsjax.sampling import generate
    start = time.time()
    try:
        prompt_ids = [encode_prompt(tokenizer, p, args.chat) for p in args.prompt]
        result = generate(config, params, prompt_ids, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          stop_strings=args.stop, tokenizer=tokenizer,
                          eos_token_ids=eos_ids(args.model, config, tokenizer), seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen_s = time.time() - start
    n_tokens = sum(len(t) for t in result.tokens)
    for prompt, ids, lps, reason in zip(prompt_ids, result.tokens, result.logprobs,
                                        result.finish_reasons):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"text": text, "tokens": ids, "logprobs": [round(float(x), 5)
                                                                         for x in lps],
                              "finish_reason": reason, "prompt_tokens": len(prompt),
                              "load_s": round(load_s, 3), "generate_s": round(gen_s, 3)}))
        else:
            print(text)
    if not args.json:
        print(f"[{n_tokens} tokens, finish: {', '.join(result.finish_reasons)}, load "
              f"{load_s:.1f}s, generate {gen_s:.1f}s incl. compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
