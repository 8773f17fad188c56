"""Compile time against depth: the decoder's layers unrolled (a Python loop, the default) vs one
`nn.scan` over stacked params (`ModelConfig.scan_layers`), side by side in one run.

    python benchmarks/scan_layers.py [--layers 36] [--d-model 256] [--out FILE]

A random model of Qwen2.5-3B's depth and layout (36 layers, Qwen2 with q/k/v biases, 8 query
heads per KV head, tied embeddings, its 151936-token vocabulary), narrowed to --d-model so that
it fits a CPU's memory; the depth, which is what compile time grows with, is kept. For each
layout, the compile time (`jit(...).lower(...).compile()`, in a fresh JAX cache) and the run
time after it of three programs: the forward pass over 4 x 256 tokens, one decode step of 8 rows
against a 512-slot cache, and the GRPO update step (remat, AdamW) over 4 x 256 tokens.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)


def _timed(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(config, params, batch=4, length=256, rows=8, slots=512):
    """{program: (compile s, run s)} for the forward, a decode step and the update."""
    from zsjax.models.decoder import Decoder, init_cache
    from zsjax.rl import update as U
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    out = {}

    def compiled(fn, *args):
        jax.clear_caches()
        t = time.perf_counter()
        exe = jax.jit(fn).lower(*args).compile()
        return exe, time.perf_counter() - t

    def fwd(p, x, pos):
        return Decoder(config).apply({"params": p}, x, pos)[0]
    exe, seconds = compiled(fwd, params, tokens, positions)
    out["forward"] = (seconds, _timed(lambda: exe(params, tokens, positions)))

    cache = init_cache(config, rows, slots)
    one = jnp.ones((rows, 1), jnp.int32)

    def step(p, x, cache):
        pos = jnp.broadcast_to(cache.index, x.shape).astype(jnp.int32)
        return Decoder(config).apply({"params": p}, x, pos, cache, last_logits_only=True)
    exe, seconds = compiled(step, params, one, cache)
    out["decode_step"] = (seconds, _timed(lambda: exe(params, one, cache)))

    mask = np.ones((batch, length), np.float32)
    mask[:, : length // 4] = 0
    adv = (rng.normal(size=(batch, 1)) * mask).astype(np.float32)
    b = U.Batch(tokens=tokens, attention_mask=jnp.ones((batch, length), bool),
                loss_mask=jnp.asarray(mask), old_logprobs=jnp.zeros((batch, length)),
                advantages=jnp.asarray(adv))
    tx = U.make_optimizer(1e-6)
    state = U.init_state(params, tx)
    jax.clear_caches()
    fn = U.make_policy_step(state, b, config=config, tx=tx, cfg=U.LossConfig(), remat=True,
                            logits_from=U.loss_start(mask))
    t = time.perf_counter()
    exe = fn.lower(state, b).compile()
    seconds = time.perf_counter() - t
    # the step donates its state: run it on a fresh copy each time
    out["update"] = (seconds, _timed(lambda: exe(jax.tree.map(jnp.copy, state), b)[1]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    args = p.parse_args(argv)

    import dataclasses
    from zsjax.models import ModelConfig, init_params
    from zsjax.models.decoder import stack_layers
    heads = max(args.d_model // 32, 8)
    config = ModelConfig(vocab_size=151936, d_model=args.d_model, n_layers=args.layers,
                         n_heads=heads, n_kv_heads=heads // 8, head_dim=args.d_model // heads,
                         d_ff=args.d_model * 43 // 8, family="qwen2", qkv_bias=True,
                         tie_embeddings=True, rope_theta=1e6)
    params = init_params(config, jax.random.key(0))
    rows = {}
    for name, cfg, prm in (
            ("unrolled", config, params),
            ("scanned", dataclasses.replace(config, scan_layers=True),
             stack_layers(params, config.n_layers))):
        rows[name] = measure(cfg, prm)
        print(f"[scan_layers] {name}: {rows[name]}", file=sys.stderr, flush=True)
    result = {"model": f"random Qwen2.5-3B layout, {config.n_layers} layers, d_model "
                       f"{config.d_model}, {config.num_params() / 1e6:.0f}M params",
              "machine": f"{os.cpu_count()} cores, jax {jax.__version__} "
                         f"({jax.default_backend()})",
              "programs": {prog: {"unrolled_compile_s": round(rows["unrolled"][prog][0], 2),
                                  "scanned_compile_s": round(rows["scanned"][prog][0], 2),
                                  "compile_ratio": round(rows["unrolled"][prog][0]
                                                         / rows["scanned"][prog][0], 2),
                                  "unrolled_run_s": round(rows["unrolled"][prog][1], 4),
                                  "scanned_run_s": round(rows["scanned"][prog][1], 4)}
                           for prog in rows["unrolled"]},
              "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(result, indent=2))
    lines = [f"{result['model']}; {result['machine']}", "",
             "| program | compile s, unrolled | compile s, scanned | unrolled / scanned | "
             "run s, unrolled | run s, scanned |", "|---|---|---|---|---|---|"]
    for prog, r in result["programs"].items():
        lines.append(f"| {prog} | {r['unrolled_compile_s']} | {r['scanned_compile_s']} | "
                     f"{r['compile_ratio']}x | {r['unrolled_run_s']} | {r['scanned_run_s']} |")
    print("\n".join(lines))
    if args.out:
        write_report(args.out, result, lines)


if __name__ == "__main__":
    main()
