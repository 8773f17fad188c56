"""Where a decode step's time goes: a `jax.profiler` trace of `generate`, attributed per XLA op.

    python benchmarks/profile_decode.py [--model DIR] [--batch 32] [--new-tokens 64]
                                        [--temperature T] [--top-p P] [--out FILE]

Compiles `generate` with one call, then traces a second call (a Perfetto JSON trace) while XLA
dumps the optimised HLO. Every op of the decode loop's body runs once per step (or more, inside
a nested loop): its traced time is summed, divided by the number of steps, and grouped by
(output shape, op kind), so 30 layers' gate projections make one row. On a CPU, the runtime
runs independent ops side by side (the gate and up projections, say), so the rows can add up to
more than a step's wall time.

This is how the V-cache layout and the argmax were found (docs/PERFORMANCE.md).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def op_times(trace_events, module: str) -> tuple[collections.Counter, collections.Counter]:
    """Per HLO op of `module` (a substring of the jitted function's module name): total traced
    microseconds and number of executions."""
    total, count = collections.Counter(), collections.Counter()
    for e in trace_events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args and module in args.get("hlo_module", ""):
            total[args["hlo_op"]] += e.get("dur", 0)
            count[args["hlo_op"]] += 1
    return total, count


def per_step_rows(total, count, hlo_text: str, steps: int) -> list[dict]:
    """Ops of the decode loop (executed at least steps - 1 times: once a step, or several times
    inside a nested loop such as the top-p bisection), grouped by output shape and op kind, in
    ms per step, largest first."""
    groups = collections.defaultdict(lambda: [0.0, 0])
    for op, us in total.items():
        if count[op] < steps - 1:
            continue  # prefill and setup
        # "%op = SHAPE kind(" where SHAPE may be a tuple "(f32[..], s32[..])"; ROOT ops too
        m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(op) + r" = (.+?) [\w-]+\(", hlo_text)
        shape = re.sub(r"\{[^}]*\}", "", m.group(1)) if m else "?"
        kind = op.rsplit(".", 1)[0] if re.search(r"\.\d+$", op) else op
        groups[(shape, kind)][0] += us / 1000 / steps
        groups[(shape, kind)][1] += 1
    rows = [{"shape": s, "op": k, "ms_per_step": round(v[0], 3), "n_ops": v[1]}
            for (s, k), v in groups.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top", type=int, default=20, help="rows to print")
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="zsjax_profile_")
    dump = os.path.join(work, "hlo")
    # The dump flag must be set before XLA starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    import jax
    import numpy as np

    from zsjax.models import load_hf
    from zsjax.sampling import generate
    from zsjax.tools.fetch_smollm2 import fetch

    config, params = load_hf(args.model or fetch())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, min(config.vocab_size, 1000),
                            size=int(rng.integers(30, 48))).tolist() for _ in range(args.batch)]

    def call():
        return generate(config, params, prompts, max_new_tokens=args.new_tokens,
                        temperature=args.temperature, top_p=args.top_p, eos_token_ids=[])

    call()
    trace_dir = os.path.join(work, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    hlo_files = glob.glob(f"{dump}/*generate_core*after_optimizations.txt")
    hlo_text = open(hlo_files[0]).read() if hlo_files else ""
    total, count = op_times(events, "generate_core")
    if not total:
        sys.exit("the trace holds no per-op events for _generate_core (is this backend traced?)")
    steps = args.new_tokens  # the loop body runs once per new token
    rows = per_step_rows(total, count, hlo_text, steps)
    step_sum = sum(r["ms_per_step"] for r in rows)
    print(f"batch {args.batch}, {steps} new tokens, T={args.temperature}, top-p {args.top_p}, "
          f"{jax.default_backend()}: traced call "
          f"{wall:.2f} s; loop-body ops sum to {step_sum:.1f} ms a step "
          f"(trace and HLO in {work})\n")
    print("| ms per step | distinct ops | output shape | op |\n|---|---|---|---|")
    for r in rows[:args.top]:
        print(f"| {r['ms_per_step']:.2f} | {r['n_ops']} | `{r['shape']}` | {r['op']} |")
    if args.out:
        json.dump({"batch": args.batch, "new_tokens": steps, "wall_s": wall, "rows": rows},
                  open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
