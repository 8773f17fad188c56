"""Causal attention's forward and backward passes: whole, by blocks of query rows, and PyTorch.

    python benchmarks/attention.py [--batch 16] [--length 256] [--kv-heads 4] [--group 1]
                                   [--head-dim 64] [--layers 4] [--blocks 128 64 32]

What a training step's attention costs: `--layers` layers, each the forward pass and the
gradient of a weighted sum of the outputs with respect to q, k and v, with a causal mask and
ragged right padding. zsjax's `kernels.attention` over the whole [T, T] mask, then
`kernels.causal_attention` with each block size, then PyTorch's
`scaled_dot_product_attention(is_causal=True)` (its fused CPU kernel) on the same arrays, in
one run. Reports the fastest of 5 calls after a compiling one, and the largest difference of
the blocked loss and gradients from the whole ones, relative to each one's largest value.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats=5) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--group", type=int, default=1, help="query heads per kv head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--no-reference", action="store_true", help="skip PyTorch")
    args = parser.parse_args()
    from zsjax.models.kernels import attention as _attention
    from zsjax.models.kernels import causal_attention as _causal_attention

    b, t, kvh, g, dh = args.batch, args.length, args.kv_heads, args.group, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.normal(size=s).astype(np.float32) for s in
                  [(b, t, kvh, g, dh), (b, kvh, t, dh), (b, kvh, t, dh), (b, t, kvh, g, dh)])
    lengths = t - np.arange(b) % 7
    valid = np.arange(t)[None] < lengths[:, None]
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
    qj, kj, wj = jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)
    vj = jnp.asarray(v.transpose(0, 1, 3, 2))  # the decoder's V layout [B, KVH, Dh, S]

    def step(attend):
        def loss(q, k, v):
            return sum((attend(q * (1 + i * 1e-3), k, v) * wj).sum() for i in range(args.layers))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    rows = []
    whole = step(lambda q, k, v: _attention(q, k, v, mask))
    ref = whole(qj, kj, vj)
    rows.append({"attention": "whole", "ms": round(_best(lambda: whole(qj, kj, vj)) * 1e3, 1)})
    for block in args.blocks:
        if block >= t:
            continue
        fn = step(lambda q, k, v, block=block: _causal_attention(q, k, v, mask, block))
        out = fn(qj, kj, vj)
        diff = max(float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in
                   zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
        rows.append({"attention": f"{block}-row blocks",
                     "ms": round(_best(lambda: fn(qj, kj, vj)) * 1e3, 1),
                     "max_rel_diff": float(f"{diff:.2g}")})

    if not args.no_reference:
        import torch
        torch.set_num_threads(os.cpu_count())
        tq = torch.tensor(q.reshape(b, t, kvh * g, dh).transpose(0, 2, 1, 3)).requires_grad_()
        tk = torch.tensor(np.repeat(k, g, axis=1)).requires_grad_()
        tv = torch.tensor(np.repeat(v, g, axis=1)).requires_grad_()
        tw = torch.tensor(w.reshape(b, t, kvh * g, dh).transpose(0, 2, 1, 3))
        # (padding keys are not masked here: PyTorch's is_causal takes no extra mask)

        def torch_step():
            loss = sum((torch.nn.functional.scaled_dot_product_attention(
                tq * (1 + i * 1e-3), tk, tv, is_causal=True) * tw).sum()
                for i in range(args.layers))
            loss.backward()
        rows.append({"attention": "torch sdpa (causal)",
                     "ms": round(_best(torch_step) * 1e3, 1)})

    print(f"{args.layers} layers, batch {b} x {t}, {kvh} kv heads x {g}, head dim {dh}, "
          f"forward + backward, {os.cpu_count()} cores, jax {jax.__version__} "
          f"({jax.default_backend()})")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
