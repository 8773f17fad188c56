"""The training step with part of the model frozen (`rl.freeze`, `train.freeze`): frozen params
are not differentiated, so no backward pass runs through frozen embeddings and lower layers.
Side by side in one run, SmolLM2-135M-Instruct (or any HF folder), a supervised step on
B x T tokens with the loss on the last two thirds.

    python benchmarks/frozen_layers.py [--model DIR] [--batch 8] [--length 512]
        [--dtype bfloat16] [--steps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time


def top_layers_only(n_layers: int, keep: int) -> str:
    """A freeze regex for the embeddings and every layer below the top `keep`."""
    return "embed|" + "|".join(f"layers_{i}'" for i in range(n_layers - keep))


def measure(model_dir: str, freeze: str, batch: int, length: int, dtype: str, steps: int):
    import numpy as np

    from zsjax.models import load_hf
    from zsjax.rl import update as U
    config, params = load_hf(model_dir, dtype=dtype, param_dtype="float32")
    tx = U.make_optimizer(1e-5, freeze=freeze)
    state = U.init_state(params, tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size - 1, (batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.float32)
    mask[:, length // 3:] = 1
    b = U.sft_batch(tokens, np.ones((batch, length), bool), mask)
    step = U.jit_step(U.supervised_step, state, b, config=config, tx=tx,
                      logits_from=U.loss_start(mask), freeze=freeze)
    t = time.perf_counter()
    state, _ = U.run_step(step, state, b)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, _ = U.run_step(step, state, b)
        times.append(time.perf_counter() - t)
    return {"compile_and_first_step_s": compile_s, "step_s": float(np.median(times)),
            "tokens_per_s": batch * length / float(np.median(times))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the SmolLM2 fixture)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from zsjax.models.config import read_hf_config
    if args.model is None:
        from zsjax.tools import fetch_smollm2
        args.model = fetch_smollm2.fetch()
    n = read_hf_config(args.model).n_layers
    variants = {"all trained": "", "embeddings frozen": "embed"}
    for keep in (n // 2, n // 3):
        variants[f"top {keep} of {n} layers trained"] = top_layers_only(n, keep)
    rows = {}
    for name, freeze in variants.items():
        rows[name] = measure(args.model, freeze, args.batch, args.length, args.dtype,
                             args.steps)
        print(f"{name:<28} {rows[name]['step_s']:7.2f} s/step "
              f"{rows[name]['tokens_per_s']:7.0f} tok/s (compile + first step "
              f"{rows[name]['compile_and_first_step_s']:.0f} s)", flush=True)
    base = rows["all trained"]["step_s"]
    print("\n| what is trained | s/step | tokens/s | speed-up | compile + first step, s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{base / r['step_s']:.2f}x | {r['compile_and_first_step_s']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
