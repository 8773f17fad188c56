"""Multi-turn rollout throughput: KV-cache reuse across turns vs re-prefilling each turn.

    python benchmarks/rollout.py [--questions 16] [--turns 2] [--response-tokens 64]

SmolLM2-135M-Instruct as the policy (sampling at the reference's temperature 1.0, top-p 0.95),
a scripted search backend that returns five ~30-word documents instantly, the same seed for
both modes. Reports trajectories/s and generated tokens/s per mode after --warmup untimed
rollouts (the first one, which compiles, is reported apart), and the time split between generation and everything else.
"""

import argparse
import json
import os
import statistics
import sys
import time

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "When did World War II end?",
             "What is the largest planet?", "Who painted the Mona Lisa?",
             "What is the boiling point of water?", "Which river flows through Cairo?",
             "Who discovered penicillin?"]


def docs(request):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod".split()
    return "\n".join(f"Doc {i}: {request.query} " + " ".join(words * 3)[:170]
                     for i in range(1, 6))


class Timed:
    def __init__(self, inner):
        self.inner, self.seconds, self.tokens = inner, 0.0, 0

    def __call__(self, inputs):
        t = time.perf_counter()
        out = self.inner(inputs)
        self.seconds += time.perf_counter() - t
        self.tokens += sum(len(x) for x in out.tokens)
        return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rollouts first: bucketed shapes vary between rollouts, so "
                             "the first few compile a handful of programs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import transformers
    from zsjax.models import load_hf
    from zsjax.search import FunctionBackend, ModelTurnGenerator, RolloutSettings, rollout
    from zsjax.tools.fetch_smollm2 import fetch
    model_dir = fetch()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config, params = load_hf(model_dir)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    settings = RolloutSettings(max_turns=args.turns, max_response_tokens=args.response_tokens,
                               temperature=1.0, top_p=0.95)
    rows = []
    for kv in (True, False):
        times, first = [], None
        for rep in range(args.warmup + args.repeats):
            gen = Timed(ModelTurnGenerator(config, params, tok, settings, kv_reuse=kv))
            t = time.perf_counter()
            trajs = rollout(qs, [["x"]] * len(qs), tokenizer=tok, generate_fn=gen,
                            backend=FunctionBackend(docs), settings=settings, seed=rep)
            total = time.perf_counter() - t
            if rep < args.warmup:
                first = total if first is None else first
                continue
            times.append((total, gen.seconds, gen.tokens,
                          sum(t.turns for t in trajs), sum(len(t.token_ids) for t in trajs)))
        total = statistics.median(x[0] for x in times)
        gen_s = statistics.median(x[1] for x in times)
        tokens = statistics.median(x[2] for x in times)
        rows.append({"mode": "kv_reuse" if kv else "re_prefill",
                     "trajectories_s": round(len(qs) / total, 2),
                     "generated_tokens_s": round(tokens / total, 1),
                     "seconds": round(total, 2), "generation_share": round(gen_s / total, 2),
                     "turns": statistics.median(x[3] for x in times),
                     "first_call_s": round(first, 2)})
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[0]["trajectories_s"] / rows[1]["trajectories_s"]
    lines = [f"{len(qs)} questions, max_turns={args.turns}, {args.response_tokens} tokens/turn, "
             f"SmolLM2-135M-Instruct float32, T=1.0 top-p 0.95, {os.cpu_count()} cores", "",
             "| mode | trajectories/s | generated tokens/s | s per rollout | generation share | "
             "turns played | first call s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['trajectories_s']} | {r['generated_tokens_s']} | "
              f"{r['seconds']} | {r['generation_share']} | {r['turns']} | {r['first_call_s']} |"
              for r in rows]
    lines.append(f"\nkv_reuse / re_prefill throughput: {ratio:.2f}x")
    print("\n".join(lines))
    if args.out:
        json.dump({"rows": rows, "ratio": ratio, "command": " ".join(sys.argv)},
                  open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
