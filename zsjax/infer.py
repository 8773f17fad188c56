"""Run one question through the search agent and print the whole trajectory.

    python -m zsjax.infer --policy DIR --simulator DIR --question "Who wrote Hamlet?"
    python -m zsjax.infer --policy DIR --simulator-url http://127.0.0.1:8000 --question ...
    python -m zsjax.infer --policy DIR --retriever-url http://127.0.0.1:8000 --question ...
    python -m zsjax.infer --policy DIR --corpus corpus.jsonl --question ...   # local BM25

On a terminal, the simulator's documents are shown in colour, set apart from the policy's text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from zsjax.models import load_hf
from zsjax.models.tokenizer import eos_ids, load_tokenizer
from zsjax.search import ModelTurnGenerator, RolloutSettings, rollout
from zsjax.search import factory
from zsjax.search.bm25 import read_corpus
from zsjax.search.curriculum import draw_rng
from zsjax.search.http_backends import SearchBackendError
from zsjax.search.simulator import InProcessSimulator

_COLORS = {"prompt": "\033[2m", "policy": "", "information": "\033[36m", "invalid": "\033[33m"}
_RESET = "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one question through the ZeroSearch agent.")
    p.add_argument("--policy", required=True, help="policy: Hugging Face model folder")
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--simulator", help="simulator: Hugging Face model folder (in-process)")
    backend.add_argument("--simulator-url", help="OpenAI-compatible simulator server URL")
    backend.add_argument("--retriever-url", help="Search-R1 retriever URL (POST /retrieve)")
    backend.add_argument("--corpus", help="a JSONL corpus of {id, title, text} passages: "
                         "search it with BM25 (zsjax.search.bm25; the index is cached beside it)")
    p.add_argument("--question", required=True)
    p.add_argument("--answer", action="append", default=[],
                   help="golden answer(s): the simulator prompt uses the first")
    p.add_argument("--noise-probability", type=float, default=0.0,
                   help="chance that each search gets noisy documents")
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--max-response-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.0, help="policy; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--simulator-style", choices=("finetuned", "prompt_only"),
                   default="finetuned",
                   help="simulator prompt: finetuned (a fine-tuned simulator, as training's "
                        "default), or prompt_only for an instruct model used as --simulator")
    p.add_argument("--simulator-model", default=None,
                   help="--simulator-url: the served model's name (default: the first the "
                        "server lists at /v1/models)")
    p.add_argument("--simulator-temperature", type=float, default=0.8)
    p.add_argument("--simulator-max-new-tokens", type=int, default=600)
    p.add_argument("--topk", type=int, default=3,
                   help="documents per query, for --retriever-url and --corpus")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p


def make_backend(args, policy_dir, policy_model):

    def simulator():
        if os.path.abspath(args.simulator) == os.path.abspath(policy_dir):
            config, params, tokenizer = policy_model
        else:
            config, params = load_hf(args.simulator, dtype=args.dtype)
            tokenizer = load_tokenizer(args.simulator)
        return InProcessSimulator(config, params, tokenizer, style=args.simulator_style,
                                  temperature=args.simulator_temperature,
                                  max_new_tokens=args.simulator_max_new_tokens, seed=args.seed,
                                  eos_token_ids=eos_ids(args.simulator, config, tokenizer))

    kind = ("retriever_url" if args.retriever_url else "simulator_url" if args.simulator_url
            else "bm25" if args.corpus else "simulator")
    return factory.make_backend(kind, url=args.retriever_url or args.simulator_url or "",
                                model=args.simulator_model or "", corpus=args.corpus or "",
                                top_k=args.topk,
                                style=args.simulator_style, temperature=args.simulator_temperature,
                                max_new_tokens=args.simulator_max_new_tokens, simulator=simulator)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.noise_probability <= 1.0:
        parser.error(f"--noise-probability must be in [0, 1]; got {args.noise_probability}")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0: greedy); got {args.temperature}")
    if not args.question.strip():
        parser.error("--question is empty")
    if args.topk < 1:
        parser.error(f"--topk must be >= 1; got {args.topk}")
    if args.corpus:  # a missing or malformed corpus is reported before any model loads
        try:
            read_corpus(args.corpus)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:  # before any model loads
        settings = RolloutSettings(max_turns=args.max_turns,
                                   max_response_tokens=args.max_response_tokens,
                                   temperature=args.temperature, top_p=args.top_p)
    except ValueError as e:
        parser.error(str(e))

    start = time.time()
    try:
        config, params = load_hf(args.policy, dtype=args.dtype)
        tokenizer = load_tokenizer(args.policy)
        backend = make_backend(args, args.policy, (config, params, tokenizer))
    except (FileNotFoundError, ValueError) as e:  # Config-, Checkpoint-, SafetensorsError
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = ModelTurnGenerator(config, params, tokenizer, settings,
                             eos_token_ids=eos_ids(args.policy, config, tokenizer))
    try:
        traj = rollout([args.question], [args.answer or [""]], tokenizer=tokenizer,
                       generate_fn=gen, backend=backend, settings=settings,
                       noise_probability=args.noise_probability,
                       noise_rng=lambda tid: draw_rng(args.seed, 0, tid),
                       seed=args.seed)[0]
    except SearchBackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    seconds = time.time() - start
    if args.json:
        print(json.dumps({
            "question": args.question, "answer": traj.answer, "answered": traj.answered,
            "searches": traj.queries, "turns": traj.turns,
            "segments": [{"kind": s.kind, "text": s.text} for s in traj.segments],
            "response_tokens": len(traj.response_ids),
            "policy_tokens": int(sum(traj.response_mask)), "seconds": round(seconds, 2)}))
        return 0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    paint = (lambda kind, text: f"{_COLORS[kind]}{text}{_RESET}" if _COLORS[kind] else text) \
        if color else (lambda kind, text: text)
    prompt = tokenizer.decode(traj.prompt_ids, skip_special_tokens=False)
    print(paint("prompt", prompt), end="")
    for seg in traj.segments:
        print(paint(seg.kind, seg.text), end="")
    print()
    print(f"\n[answer: {traj.answer!r} | searches: {traj.num_searches} | turns: {traj.turns} | "
          f"{seconds:.1f}s incl. load and compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
