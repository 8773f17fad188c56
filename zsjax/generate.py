"""Generate text from a Hugging Face model folder with the zsjax decoder.

    python -m zsjax.generate --model DIR --prompt "What is the capital of France?" --chat

A thin shell over `zsjax.sampling.generate` (the same sampler the RL rollout uses). `--prompt`
may be repeated: the prompts are generated together as one ragged batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from zsjax.models import load_hf
from zsjax.models.tokenizer import check_vocab, eos_ids, load_tokenizer  # noqa: F401
from zsjax.sampling import generate


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
                    "(Llama, Qwen2 or Qwen3) run by the zsjax decoder.")
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

    start = time.time()
    try:
        config, params = load_hf(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as e:  # Config-, Checkpoint-, SafetensorsError
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.time() - start
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
