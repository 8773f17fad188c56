"""How fast do decode's matmuls pull their weights from memory, against how fast XLA can read?

    python benchmarks/weight_stream.py [--rows 1 8 16 32] [--layers 60] [--k 576 --n 1536]

A decode step multiplies a few rows by every weight matrix once, so its matmuls stream the
weights from DRAM; a microbenchmark that reuses one matrix keeps it in cache and measures
something else. This runs, in one process and one program each:

  chained    `--layers` distinct [K, N] weights applied in sequence to [rows, K] (each product
             feeds the next, as layers do), the weights together far larger than the caches;
  in cache   the same number of products with one weight matrix;
  read       the same bytes as the chained weights summed by XLA (the read bandwidth a
             bandwidth-bound matmul could reach).

It reports GFLOP/s and the weight bytes per second of each, and chained / read: the fraction of
the read bandwidth the matmuls reach. Defaults: SmolLM2-135M's gate projection, two per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)


def chain(x, weights):
    """x through every weight in turn (tanh between, so nothing folds); [rows, K] out."""
    import jax.numpy as jnp
    k = x.shape[1]
    for w in weights:
        x = jnp.tanh(x @ w)[:, :k]
    return x


def _best(fn, *args, repeats: int, inner: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def measure(rows: int, layers: int, k: int, n: int, repeats: int = 5, inner: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    if n < k:
        raise ValueError(f"--n ({n}) must be >= --k ({k}): each product's output feeds the next")
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n)) * k ** -0.5, jnp.float32)
               for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    chained = jax.jit(chain)
    cached = jax.jit(lambda x, w: chain(x, [w] * layers))
    read = jax.jit(lambda ws: sum(w.sum() for w in ws))
    t_chain = _best(chained, x, weights, repeats=repeats, inner=inner)
    t_cache = _best(cached, x, weights[0], repeats=repeats, inner=inner)
    t_read = _best(read, weights, repeats=repeats, inner=inner)
    flops = 2 * rows * k * n * layers
    nbytes = 4 * k * n * layers
    return {"rows": rows, "layers": layers, "k": k, "n": n, "flops": flops, "weight_bytes": nbytes,
            "seconds": {"chained": t_chain, "in_cache": t_cache, "read": t_read},
            "weight_mb": round(nbytes / 1e6, 1),
            "chained_ms": round(t_chain * 1e3, 2), "chained_gflop_s": round(flops / t_chain / 1e9),
            "chained_gb_s": round(nbytes / t_chain / 1e9, 1),
            "in_cache_gflop_s": round(flops / t_cache / 1e9),
            "read_gb_s": round(nbytes / t_read / 1e9, 1),
            "chained_over_read": round(t_read / t_chain, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    args = parser.parse_args()
    import jax
    results = []
    for rows in args.rows:
        results.append(measure(rows, args.layers, args.k, args.n))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "seconds"}), flush=True)
    head = (f"{args.layers} distinct [{args.k}, {args.n}] float32 weights "
            f"({results[0]['weight_mb']} MB), backend {jax.default_backend()}, "
            f"{os.cpu_count()} cores")
    lines = [head, "", "| rows | chained ms | chained GFLOP/s | weights GB/s (chained) | "
             "in-cache GFLOP/s | XLA read GB/s | chained / read |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['chained_ms']} | {r['chained_gflop_s']} | {r['chained_gb_s']} "
              f"| {r['in_cache_gflop_s']} | {r['read_gb_s']} | {r['chained_over_read']} |"
              for r in results]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, {"rows": results, "command": " ".join(["python"] + sys.argv)},
                     lines)


if __name__ == "__main__":
    main()
