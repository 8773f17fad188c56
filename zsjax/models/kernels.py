"""The decoder's products with hand-written backward passes: the projections and the tied head
on a CPU (`matmul` behind `dot_general`), and grouped-query attention (`attention`, and
`causal_attention` by blocks of query rows). Autodiff's backward passes were correct but XLA:CPU
ran them slowly (see each docstring); `tests/models/test_parity.py` checks these gradients
against PyTorch autograd. Custom VJPs support reverse mode only: `jax.jvp` / `jacfwd` through
the decoder raise.

`zsjax.models.decoder` holds the architecture and calls these; nothing here is specific to a
model family.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def on_cpu() -> bool:
    """Whether the default backend, which the traced program will run on, is a CPU."""
    return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, w, w_transposed: bool):
    """x [M, K] @ w [K, N] (w [N, K] when `w_transposed`), with a backward pass written for
    XLA:CPU (see `dot_general`)."""
    return _dot2d(x, w, 1, 1 if w_transposed else 0)


def _dot2d(a, b, a_contract: int, b_contract: int):
    """A 2-D product over one axis of each operand, in the operands' dtype. bfloat16
    operands are multiplied with a float32 result, then rounded once: XLA:CPU runs that form
    on its bfloat16 kernels (AMX, AVX512-BF16), but a product with a bfloat16 result through
    float32 conversions of both operands, about 3x slower at decode's 8 to 32 rows (bfloat16
    decode of SmolLM2 at batch 8 and 32: 1.6x). Both accumulate in float32: the results
    differ in summation order only."""
    dims = (((a_contract,), (b_contract,)), ((), ()))
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        return jax.lax.dot_general(a, b, dims)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


def _matmul_fwd(x, w, w_transposed):
    return matmul(x, w, w_transposed), (x, w)


def _matmul_bwd(w_transposed, res, g):
    x, w = res
    g = jax.lax.optimization_barrier(g)  # computed into memory once, not fused into a copy
    dx = _dot2d(g, w, 1, 0 if w_transposed else 1)
    dw = _dot2d(g, x, 0, 0) if w_transposed else _dot2d(x, g, 0, 0)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for the projections (x's trailing axes against the kernel's leading
    ones). On a CPU it runs as a [M, K] x [K, N] product whose backward pass materializes the
    output's cotangent before both gradient products: left to itself, XLA:CPU fused that
    cotangent's producer (silu's derivative, say) into a transposed copy read with a stride,
    64 ms of a 620 ms fine-tuning step for one [8192, 512] gate cotangent."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    standard = (not lb and not rb and tuple(lc) == tuple(range(lhs.ndim - k, lhs.ndim))
                and tuple(rc) == tuple(range(k)))
    if (not on_cpu() or not standard or precision is not None
            or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
    x = lhs.reshape(-1, math.prod(lhs.shape[lhs.ndim - k:]))
    return matmul(x, rhs.reshape(x.shape[1], -1), False).reshape(out_shape)


def tied_head(x_btd, embedding_vd):
    """x @ embedding.T, the logits of a tied head; on a CPU through `matmul` (above)."""
    if not on_cpu():
        return jnp.einsum("btd,vd->btv", x_btd, embedding_vd)
    b, t, d = x_btd.shape
    return matmul(x_btd.reshape(b * t, d), embedding_vd, True).reshape(b, t, -1)


def _attention_probs(q, k, mask_bts):
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    # A finite fill keeps rows with no visible key (left padding) free of NaNs.
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


@jax.custom_vjp
def attention(q, k, v, mask_bts):
    """Grouped-query attention: q [B, T, KVH, G, Dh], k [B, KVH, S, Dh], v [B, KVH, Dh, S]
    (the cache layouts), mask [B, T, S] -> [B, T, KVH, G, Dh].

    The backward pass is the standard one with the softmax's row term taken as
    sum(dout * out) over Dh rather than sum(probs * dprobs) over the S slots (equal, since
    out = probs @ v): on XLA:CPU that [B, KVH, G, T, S] reduction was a tenth of a demo
    fine-tuning step."""
    return _attention_fwd(q, k, v, mask_bts)[0]


def _attention_fwd(q, k, v, mask_bts):
    probs = _attention_probs(q, k, mask_bts)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, v)
    return out, (q, k, v, mask_bts, probs, out)


def _attention_bwd(res, d_out):
    q, k, v, mask_bts, probs, out = res
    f32 = jnp.float32
    dv = jnp.einsum("bkgts,btkgd->bkds", probs, d_out)
    # (a bf16 x bf16 -> f32 product that XLA:CPU does not always have a kernel for)
    d_probs = jnp.einsum("btkgd,bkds->bkgts", d_out, v).astype(f32)
    row = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(f32), out.astype(f32))
    d_scores = probs.astype(f32) * (d_probs - row[..., None])
    d_scores = jnp.where(mask_bts[:, None, None], d_scores, 0.0) * (q.shape[-1] ** -0.5)
    d_scores = d_scores.astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->btkgd", d_scores, k)
    dk = jnp.einsum("bkgts,btkgd->bksd", d_scores, q)
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)


# Query rows per block of causal attention over a sequence without a cache, on a CPU (at least
# this many, and at most 16 blocks a sequence): see `causal_attention`.
CAUSAL_BLOCK = 64


def causal_attention(q, k, v, mask_bts, block: int):
    """`attention` over a causal mask ([B, T, T]: query t sees no key after t), a block of
    `block` query rows at a time, each against the keys up to its last row only. That skips
    the upper triangle's products and exponentials (about half of them for many blocks), and
    on XLA:CPU the smaller [.., block, S] scores stay in cache: at T = 512, 8 rows, the
    forward and backward pass took 207 ms for 64-row blocks against 346 ms whole (4 layers).
    Query rows that see no key (left padding) get an unspecified output, as with
    `attention` (an average of values that nothing reads). The keys' and values' gradients
    are sums over the blocks, in the inputs' dtype (in bfloat16, one rounding a block)."""
    t = q.shape[1]
    if t <= block:
        return attention(q, k, v, mask_bts)
    return jnp.concatenate(
        [attention(q[:, i:i + block], k[:, :, :i + block], v[..., :i + block],
                    mask_bts[:, i:i + block, :i + block]) for i in range(0, t, block)], axis=1)
