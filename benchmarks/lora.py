"""LoRA against full fine-tuning for the GRPO update step, side by side in one run: step time,
peak memory and checkpoint size, with LoRA's training pass on merged weights (what zsjax runs)
and un-merged; and the merge a LoRA run does once per step before its rollouts, against the
decode it precedes.

    python benchmarks/lora.py [--model DIR] [--rank 16] [--batch 8] [--length 256]
        [--dtype float32] [--steps 3] [--decode-batch 8] [--new-tokens 64] [--out FILE.json]

SmolLM2-135M-Instruct by default (the package fixture). Each variant runs in a process of its
own, so its peak RSS is its own: the policy loaded as `zsjax.train` loads it (full: float32
trained weights; LoRA: the base in the compute dtype plus float32 adapters on every attention
and MLP projection), one jitted GRPO step (`zsjax.rl.update.policy_step`, PPO-clip loss on a
random batch, loss on the last two thirds of each row), timed after its compile, then the train
state written with zsjax's checkpointer (what a `zsjax.train` checkpoint holds: all the params
and AdamW's moments; under LoRA the adapters and theirs).

Merged or un-merged adapters in rollouts: an un-merged decode runs the base's matmuls plus two
small ones per adapted projection and token, so it can be no faster than decoding the base
weights; a merged decode is exactly that, after one merge per step. The merge's time against the
decode's is therefore the most an un-merged decode could save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


VARIANTS = ("full", "lora", "lora_unmerged")


def variant(model_dir: str, name: str, rank: int, batch: int, length: int, dtype: str,
            steps: int, decode_batch: int, new_tokens: int) -> dict:
    """One variant in this process: "full" fine-tuning, "lora" (the training pass on merged
    weights) or "lora_unmerged" (un-merged projections)."""
    import jax
    import numpy as np

    from zsjax.checkpointing import Checkpointer
    from zsjax.models import load_hf, lora
    from zsjax.rl import update as U
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank) if name != "full" else None
    config, params = load_hf(model_dir, dtype=dtype,
                             param_dtype=dtype if lcfg else "float32")
    freeze = ""
    if lcfg:
        params = lora.attach(params, lcfg, jax.random.key(0)).replace(
            unmerged=name == "lora_unmerged")
        freeze = lora.FROZEN
    tx = U.make_optimizer(1e-5, freeze=freeze)
    state = U.init_state(params, tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size - 1, (batch, length)).astype(np.int32)
    attn = np.ones((batch, length), bool)
    mask = np.zeros((batch, length), np.float32)
    mask[:, length // 3:] = 1
    start = U.loss_start(mask)
    old = U.logprobs_pass(config, params, tokens, attn, micro_batch=batch, logits_from=start)
    b = U.Batch(tokens=tokens, attention_mask=attn, loss_mask=mask,
                old_logprobs=np.asarray(old) * mask,
                advantages=rng.normal(size=(batch, length)).astype(np.float32) * mask)
    step = U.make_policy_step(state, b, config=config, tx=tx, cfg=U.LossConfig(),
                              logits_from=start, freeze=freeze)
    t = time.perf_counter()
    state, m = U.run_step(step, state, b)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = U.run_step(step, state, b)
        times.append(time.perf_counter() - t)
    out = {"rank": rank if lcfg else 0, "step_s": float(np.median(times)),
           "compile_and_first_step_s": compile_s,
           "tokens_per_s": batch * length / float(np.median(times)),
           "trained_params": (lora.count(state.params.adapters) if lcfg else
                              sum(x.size for x in jax.tree.leaves(params))),
           "policy_loss": m["policy_loss"]}
    ckpt_dir = tempfile.mkdtemp(prefix="zsjax_lora_bench_")
    try:
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        ckpt.save(1, lora.saved_part(state), {"step": 1})
        ckpt.wait()
        ckpt.close()
        out["checkpoint_mb"] = _dir_bytes(ckpt_dir) / 1e6
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    # the update's peak (before the decode below, which only the LoRA variant runs)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if name == "lora":  # the merge before a step's rollouts, against the decode it precedes
        from zsjax.sampling import generate
        merged = lora.merged(state.params)
        jax.block_until_ready(merged)
        merges = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(lora.merged(state.params))
            merges.append(time.perf_counter() - t)
        prompts = [list(rng.integers(0, config.vocab_size - 1, 32)) for _ in range(decode_batch)]
        kwargs = dict(max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=())
        generate(config, merged, prompts, **kwargs)  # compiles
        t = time.perf_counter()
        generate(config, merged, prompts, **kwargs)
        out["merge_s"] = float(np.median(merges))
        out["decode_s"] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the SmolLM2 fixture)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        from zsjax.tools import fetch_smollm2
        args.model = fetch_smollm2.fetch()
    if args.variant is not None:  # a child: one variant, its JSON on the last line
        print(json.dumps(variant(args.model, args.variant, args.rank, args.batch, args.length,
                                 args.dtype, args.steps, args.decode_batch, args.new_tokens)))
        return 0
    rows = {}
    for name in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--rank",
               str(args.rank),
               "--model", args.model, "--batch", str(args.batch), "--length", str(args.length),
               "--dtype", args.dtype, "--steps", str(args.steps), "--decode-batch",
               str(args.decode_batch), "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, check=True)
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    full, lo, mf = rows["full"], rows["lora"], rows["lora_unmerged"]
    result = {"args": vars(args), "results": rows,
              "step_speedup": full["step_s"] / lo["step_s"],
              "unmerged_step_speedup": full["step_s"] / mf["step_s"],
              "memory_ratio": lo["peak_rss_gb"] / full["peak_rss_gb"],
              "checkpoint_ratio": lo["checkpoint_mb"] / full["checkpoint_mb"],
              "merge_over_decode": lo["merge_s"] / lo["decode_s"]}
    names = {"full": "full fine-tuning", "lora": f"LoRA rank {args.rank} (merged-weights pass)",
             "lora_unmerged": f"LoRA rank {args.rank}, un-merged pass"}
    lines = [f"GRPO update step, {args.batch} x {args.length} tokens, {args.dtype} compute, "
             f"median of {args.steps} steps after the compile; each variant in its own process.",
             "", "| | trained params | step s | tokens/s | peak RSS GB | checkpoint MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {names[name]} | {r['trained_params'] / 1e6:.2f}M | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['checkpoint_mb']:.1f} |")
    lines += ["", f"LoRA against full: {result['step_speedup']:.2f}x the step speed "
              f"({result['unmerged_step_speedup']:.2f}x with the un-merged pass), peak "
              f"memory {result['memory_ratio']:.2f}x, checkpoint "
              f"{result['checkpoint_ratio']:.3f}x.",
              f"Merging the adapters: {lo['merge_s'] * 1e3:.0f} ms, against "
              f"{lo['decode_s']:.2f} s to decode {args.decode_batch} x {args.new_tokens} tokens "
              f"with the merged weights ({100 * result['merge_over_decode']:.1f}%): the most "
              "an un-merged decode could save."]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
