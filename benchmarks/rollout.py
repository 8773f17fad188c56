"""Multi-turn rollout throughput: KV-cache reuse across turns vs re-prefilling each turn.

    python benchmarks/rollout.py [--questions 16] [--turns 2] [--response-tokens 64]
        [--backend scripted|simulator] [--modes kv_reuse re_prefill full_batch]
        [--model DIR] [--dtype float32|bfloat16] [--out FILE]

Modes: kv_reuse (the default generator), re_prefill (the whole context prefilled each turn),
full_batch (KV reuse with batches that never shrink as rows finish, `shrink_above=0`).

SmolLM2-135M-Instruct as the policy (--model: another Hugging Face folder; sampling at the
reference's temperature 1.0, top-p 0.95), the same seed for every mode. The search backend is
either scripted (five ~30-word documents, instantly) or the in-process simulator (the policy's
model, prompt-only, temperature 0.8, --sim-tokens new tokens, behind the trainer's per-step
query cache; the first turn's search is scripted, since the untrained policy does not search by
itself, and later turns are the model's). Reports trajectories/s and generated tokens/s per mode
after --warmup untimed rollouts (the first one, which compiles, is reported apart), where the
time goes (policy generation, simulator, everything else), and the bound on generation set by
this machine's matmul rate and memory bandwidth (class Bound).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "When did World War II end?",
             "What is the largest planet?", "Who painted the Mona Lisa?",
             "What is the boiling point of water?", "Which river flows through Cairo?",
             "Who discovered penicillin?"]


def docs(request):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod".split()
    return "\n".join(f"Doc {i}: {request.query} " + " ".join(words * 3)[:170]
                     for i in range(1, 6))


class Timed:
    """Wraps a turn generator: seconds, tokens generated and rows x decode steps computed."""

    def __init__(self, inner):
        self.inner, self.seconds, self.tokens, self.rows_stepped = inner, 0.0, 0, 0

    def __call__(self, inputs):
        t = time.perf_counter()
        out = self.inner(inputs)
        self.seconds += time.perf_counter() - t
        self.tokens += sum(len(x) for x in out.tokens)
        self.rows_stepped += out.rows_stepped
        return out


class Bound:
    """The time a rollout's generation calls need at least, on this machine: each call's
    prefill FLOPs at the matmul rate, then per decode step the larger of its FLOPs over the
    rows still generating and the bytes it must read (params + those rows' KV caches) at the
    memory bandwidth. Records every sampler call of the policy and the simulator."""

    def __init__(self, config, flops_s, bytes_s):
        self.p, self.flops_s, self.bytes_s = config.num_params(), flops_s, bytes_s
        # weights and cache in the compute dtype
        width = {"float32": 4, "bfloat16": 2, "float16": 2}[getattr(config, "dtype", "float32")]
        self.param_bytes = self.p * width
        self.kv_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * width
        self.seconds = 0.0

    def add(self, new_lens, ctx_lens, out_lens):
        t = 2 * self.p * sum(new_lens) / self.flops_s
        for i in range(max(out_lens, default=0)):
            live = [c + i for c, n in zip(ctx_lens, out_lens) if n > i]
            t += max(2 * self.p * len(live) / self.flops_s,
                     (self.param_bytes + self.kv_token * sum(live)) / self.bytes_s)
        self.seconds += t

    def install(self):
        """Wraps the sampler entry points the rollout and the simulator call."""
        import importlib
        # (the package `zsjax.search` exports a function named `rollout`: import by path)
        R = importlib.import_module("zsjax.search.rollout")
        S = importlib.import_module("zsjax.search.simulator")
        gen, cont = R.generate, R.continue_generate

        def generate(config, params, prompts, **kw):
            out = gen(config, params, prompts, **kw)
            lens = [len(x) for x in prompts]
            self.add(lens, lens, [len(x) for x in out.tokens])
            return out

        def continue_generate(config, params, chunks, *, session, **kw):
            out, new_session = cont(config, params, chunks, session=session, **kw)
            lens = [len(x) for x in chunks]
            start = [0] * len(lens) if session is None else list(session.next_pos[:len(lens)])
            self.add(lens, [s + n for s, n in zip(start, lens)], [len(x) for x in out.tokens])
            return out, new_session

        R.generate, R.continue_generate, S.generate = generate, continue_generate, generate


class SearchFirst:
    """Turn 0 is a scripted `<search> QUESTION </search>` (SmolLM2-135M, untrained, does not
    follow the search format, so the simulator would never be called); later turns are the
    model's. Used with the simulator backend, so every trajectory makes one real simulator call
    and continues from its documents."""

    def __init__(self, inner, tokenizer, questions):
        self.inner, self.tok, self.questions = inner, tokenizer, questions

    def __call__(self, inputs):
        if inputs.turn > 0:
            return self.inner(inputs)
        from zsjax.sampling import GenerateResult
        import numpy as np
        out = GenerateResult([], [], [], [])
        for r in inputs.rows:
            ids = self.tok.encode(f"<search> {self.questions[r]} </search>",
                                  add_special_tokens=False)
            out.tokens.append(ids)
            out.logprobs.append(np.zeros(len(ids)))
            out.model_logprobs.append(np.zeros(len(ids)))
            out.finish_reasons.append("stop")
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
    parser.add_argument("--backend", choices=("scripted", "simulator"), default="scripted")
    parser.add_argument("--sim-tokens", type=int, default=64,
                        help="new tokens per simulator call (--backend simulator)")
    parser.add_argument("--modes", nargs="+", choices=("kv_reuse", "re_prefill", "full_batch"),
                        default=["kv_reuse", "re_prefill", "full_batch"])
    parser.add_argument("--shrink-above", type=int, default=None,
                        help="the generator's shrink_above in the kv_reuse and re_prefill modes "
                             "(default: zsjax.sampling.sampler.SHRINK_ABOVE)")
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    args = parser.parse_args()

    import transformers
    from zsjax.models import load_hf
    from zsjax.search import (FunctionBackend, ModelTurnGenerator, RolloutSettings, StepCache,
                              rollout)
    from zsjax.search.simulator import InProcessSimulator
    from zsjax.sampling.sampler import SHRINK_ABOVE
    from zsjax.tools.fetch_smollm2 import fetch
    if args.shrink_above is None:
        args.shrink_above = SHRINK_ABOVE
    model_dir = args.model or fetch()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config, params = load_hf(model_dir, dtype=args.dtype)
    name = (os.path.basename(os.path.normpath(args.model)) if args.model
            else "SmolLM2-135M-Instruct")
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    settings = RolloutSettings(max_turns=args.turns, max_response_tokens=args.response_tokens,
                               temperature=1.0, top_p=0.95)
    from decode import ceilings  # benchmarks/decode.py: matmul rate and memory bandwidth
    flops_s, bytes_s = ceilings(dtype=args.dtype)
    bound = Bound(config, flops_s, bytes_s)
    bound.install()
    rows = []
    for mode in args.modes:
        times, first = [], None
        for rep in range(args.warmup + args.repeats):
            gen = Timed(ModelTurnGenerator(config, params, tok, settings,
                                           kv_reuse=mode != "re_prefill",
                                           shrink_above=0 if mode == "full_batch"
                                           else args.shrink_above))
            turn_fn = SearchFirst(gen, tok, qs) if args.backend == "simulator" else gen
            if args.backend == "simulator":
                backend = StepCache(InProcessSimulator(
                    config, params, tok, style="prompt_only", temperature=0.8,
                    max_new_tokens=args.sim_tokens, seed=rep))
                backend.new_step(rep)
            else:
                backend = StepCache(FunctionBackend(docs))
            bound.seconds = 0.0
            t = time.perf_counter()
            trajs = rollout(qs, [["x"]] * len(qs), tokenizer=tok, generate_fn=turn_fn,
                            backend=backend, settings=settings, seed=rep)
            total = time.perf_counter() - t
            if rep < args.warmup:
                first = total if first is None else first
                continue
            times.append((total, gen.seconds, gen.tokens, sum(t.turns for t in trajs),
                          backend.seconds, sum(t.num_searches for t in trajs), bound.seconds,
                          gen.tokens / max(gen.rows_stepped, 1)))
        med = lambda i: statistics.median(x[i] for x in times)  # noqa: E731
        total = med(0)
        rows.append({"mode": mode, "backend": args.backend,
                     "trajectories_s": round(len(qs) / total, 2),
                     "generated_tokens_s": round(med(2) / total, 1),
                     "seconds": round(total, 2), "policy_share": round(med(1) / total, 2),
                     "simulator_share": round(med(4) / total, 2),
                     "other_share": round(max(0.0, 1 - (med(1) + med(4)) / total), 2),
                     "turns": med(3), "searches": med(5), "first_call_s": round(first, 2),
                     "bound_s": round(med(6), 2), "fraction_of_bound": round(med(6) / total, 2),
                     "row_utilisation": round(med(7), 2)})
        print(json.dumps(rows[-1]), flush=True)
    head = (f"{len(qs)} questions, max_turns={args.turns}, {args.response_tokens} tokens/turn, "
            f"{name} {args.dtype}, T=1.0 top-p 0.95, backend {args.backend}"
            + (f" ({args.sim_tokens} tokens/call)" if args.backend == "simulator" else "")
            + f", {os.cpu_count()} cores; matmul {flops_s / 1e9:.1f} GFLOP/s, copy bandwidth "
            f"{bytes_s / 1e9:.1f} GB/s (same run)")
    lines = [head, "", "| mode | trajectories/s | generated tokens/s | s per rollout | policy "
             "share | simulator share | other | turns | searches | first call s | bound s | "
             "bound / actual | rows used |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['trajectories_s']} | {r['generated_tokens_s']} | "
              f"{r['seconds']} | {r['policy_share']} | {r['simulator_share']} | "
              f"{r['other_share']} | {r['turns']} | {r['searches']} | {r['first_call_s']} | "
              f"{r['bound_s']} | {r['fraction_of_bound']} | {r['row_utilisation']} |"
              for r in rows]
    lines.append("\n(rows used: the policy's generated tokens over the rows x decode steps its "
                 "sampler computed.)")
    by_mode = {r["mode"]: r["trajectories_s"] for r in rows}
    ratios = {f"kv_reuse / {m}": round(by_mode["kv_reuse"] / by_mode[m], 2)
              for m in ("re_prefill", "full_batch") if m in by_mode and "kv_reuse" in by_mode}
    for name, ratio in ratios.items():
        lines.append(f"\n{name} throughput: {ratio:.2f}x")
    print("\n".join(lines))
    if args.out:
        write_report(args.out, {"rows": rows, "ratios": ratios,
                                "command": " ".join(["python"] + sys.argv)}, lines)


if __name__ == "__main__":
    main()
