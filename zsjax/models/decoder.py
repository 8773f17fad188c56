"""The Llama / Qwen2 decoder as a Flax Linen module applied as a pure function.

    logits_btv, cache = Decoder(config).apply({"params": params}, tokens_bt, positions_bt, cache)

The KV cache is an explicit argument and result (a `KVCache` pytree), never a mutable Flax
collection, so the same module serves training (no cache), prefill and decode. Params carry
logical axis names (see `zsjax.sharding`); `param_logical_axes` reads them off the module.

Attention, and on a CPU the projections and the tied head, have hand-written backward passes
(`_attention`, `_matmul`): autodiff's were correct but XLA:CPU ran them slowly (see their
docstrings). `tests/models/test_parity.py` checks the gradients against PyTorch autograd.
Custom VJPs support reverse mode only: `jax.jvp` / `jacfwd` through the decoder raise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from zsjax import sharding
from zsjax.models import rope
from zsjax.models.config import ModelConfig

Params = Any


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values in fixed-capacity slots, shared by all rows of a batch.

    New tokens are written at slots [index, index + T) for every row; `valid` marks which slots
    hold real tokens, so rows may be left-padded or carry padding in the middle (ragged appends).
    """

    k: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]
    # Values are stored transposed, slots last, so both attention contractions run over the
    # minor dimension: on XLA:CPU this took batch-32 attention from 21 to 14 ms a step.
    v: tuple[jax.Array, ...]  # per layer [B, KVH, Dh, S]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32, next slot to write

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype: str | None = None
               ) -> KVCache:
    """An empty cache for `batch` rows and `capacity` token slots."""
    k_shape = (batch, config.n_kv_heads, capacity, config.head_dim)
    v_shape = (batch, config.n_kv_heads, config.head_dim, capacity)
    dt = jnp.dtype(dtype or config.dtype)
    return KVCache(k=tuple(jnp.zeros(k_shape, dt) for _ in range(config.n_layers)),
                   v=tuple(jnp.zeros(v_shape, dt) for _ in range(config.n_layers)),
                   valid=jnp.zeros((batch, capacity), bool), index=jnp.zeros((), jnp.int32))


def _on_cpu() -> bool:
    """Whether the default backend, which the traced program will run on, is a CPU."""
    return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, w_transposed: bool):
    """x [M, K] @ w [K, N] (w [N, K] when `w_transposed`), with a backward pass written for
    XLA:CPU (see `_dot_general`)."""
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
    return _matmul(x, w, w_transposed), (x, w)


def _matmul_bwd(w_transposed, res, g):
    x, w = res
    g = jax.lax.optimization_barrier(g)  # computed into memory once, not fused into a copy
    dx = _dot2d(g, w, 1, 0 if w_transposed else 1)
    dw = _dot2d(g, x, 0, 0) if w_transposed else _dot2d(x, g, 0, 0)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for the projections (x's trailing axes against the kernel's leading
    ones). On a CPU it runs as a [M, K] x [K, N] product whose backward pass materializes the
    output's cotangent before both gradient products: left to itself, XLA:CPU fused that
    cotangent's producer (silu's derivative, say) into a transposed copy read with a stride,
    64 ms of a 620 ms fine-tuning step for one [8192, 512] gate cotangent."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    standard = (not lb and not rb and tuple(lc) == tuple(range(lhs.ndim - k, lhs.ndim))
                and tuple(rc) == tuple(range(k)))
    if (not _on_cpu() or not standard or precision is not None
            or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
    x = lhs.reshape(-1, math.prod(lhs.shape[lhs.ndim - k:]))
    return _matmul(x, rhs.reshape(x.shape[1], -1), False).reshape(out_shape)


def _tied_head(x_btd, embedding_vd):
    """x @ embedding.T, the logits of a tied head; on a CPU through `_matmul` (above)."""
    if not _on_cpu():
        return jnp.einsum("btd,vd->btv", x_btd, embedding_vd)
    b, t, d = x_btd.shape
    return _matmul(x_btd.reshape(b * t, d), embedding_vd, True).reshape(b, t, -1)


def _attention_probs(q, k, mask_bts):
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    # A finite fill keeps rows with no visible key (left padding) free of NaNs.
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


@jax.custom_vjp
def _attention(q, k, v, mask_bts):
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


_attention.defvjp(_attention_fwd, _attention_bwd)


# Query rows per block of causal attention over a sequence without a cache, on a CPU (at least
# this many, and at most 16 blocks a sequence): see `_causal_attention`.
CAUSAL_BLOCK = 64


def _causal_attention(q, k, v, mask_bts, block: int):
    """`_attention` over a causal mask ([B, T, T]: query t sees no key after t), a block of
    `block` query rows at a time, each against the keys up to its last row only. That skips
    the upper triangle's products and exponentials (about half of them for many blocks), and
    on XLA:CPU the smaller [.., block, S] scores stay in cache: at T = 512, 8 rows, the
    forward and backward pass took 207 ms for 64-row blocks against 346 ms whole (4 layers).
    Query rows that see no key (left padding) get an unspecified output, as with
    `_attention` (an average of values that nothing reads). The keys' and values' gradients
    are sums over the blocks, in the inputs' dtype (in bfloat16, one rounding a block)."""
    t = q.shape[1]
    if t <= block:
        return _attention(q, k, v, mask_bts)
    return jnp.concatenate(
        [_attention(q[:, i:i + block], k[:, :, :i + block], v[..., :i + block],
                    mask_bts[:, i:i + block, :i + block]) for i in range(0, t, block)], axis=1)


def _dense_init(axes):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


def _zeros_init(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the scale multiply.
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    rules: Any = sharding.DEFAULT_RULES
    causal: bool = False  # no cache, and the mask is causal: queries may go by blocks

    @nn.compact
    def __call__(self, x_btd, cos, sin, mask_bts, kv_cache, cache_index):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def proj(name, heads, head_axis, bias):
            return nn.DenseGeneral(
                (heads, c.head_dim), axis=-1, use_bias=bias, dtype=dt, param_dtype=pdt,
                kernel_init=_dense_init(("embed", head_axis, "head_dim")),
                bias_init=_zeros_init((head_axis, "head_dim")), dot_general=_dot_general,
                name=name)(x_btd)

        q = proj("q_proj", c.n_heads, "heads", c.qkv_bias)  # [B, T, H, Dh]
        k = proj("k_proj", c.n_kv_heads, "kv_heads", c.qkv_bias)  # [B, T, KVH, Dh]
        v = proj("v_proj", c.n_kv_heads, "kv_heads", c.qkv_bias)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        k = k.transpose(0, 2, 1, 3)  # [B, KVH, T, Dh]
        v = v.transpose(0, 2, 3, 1)  # [B, KVH, Dh, T], the cache's layout
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                             (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                             (0, 0, 0, cache_index))
            kv_cache = (k, v)
        k = sharding.constrain(k, ("batch", "kv_heads", "length", "head_dim"), self.mesh,
                               self.rules)
        v = sharding.constrain(v, ("batch", "kv_heads", "head_dim", "length"), self.mesh,
                               self.rules)

        b, t = q.shape[:2]
        groups = c.n_heads // c.n_kv_heads
        q = q.reshape(b, t, c.n_kv_heads, groups, c.head_dim)
        if self.causal and kv_cache is None and _on_cpu():
            block = max(CAUSAL_BLOCK, -(-t // 16))
            out = _causal_attention(q, k.astype(dt), v.astype(dt), mask_bts, block)
        else:
            out = _attention(q, k.astype(dt), v.astype(dt), mask_bts)
        out = out.reshape(b, t, c.n_heads, c.head_dim)
        out = nn.DenseGeneral(
            c.d_model, axis=(-2, -1), use_bias=c.o_bias, dtype=dt, param_dtype=pdt,
            kernel_init=_dense_init(("heads", "head_dim", "embed")),
            bias_init=_zeros_init(("embed",)), dot_general=_dot_general, name="o_proj")(out)
        return out, kv_cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=pdt,
                                  dot_general=_dot_general)
        gate = dense(c.d_ff, kernel_init=_dense_init(("embed", "mlp")), name="gate_proj")(x)
        up = dense(c.d_ff, kernel_init=_dense_init(("embed", "mlp")), name="up_proj")(x)
        return dense(c.d_model, kernel_init=_dense_init(("mlp", "embed")),
                     name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    rules: Any = sharding.DEFAULT_RULES
    causal: bool = False  # (see Attention)

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, kv_cache, cache_index):
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, jnp.dtype(c.dtype),
                                 jnp.dtype(c.param_dtype))
        h, kv_cache = Attention(c, self.mesh, self.rules, self.causal, name="attn")(
            norm(name="attn_norm")(x), cos, sin, mask_bts, kv_cache, cache_index)
        x = x + h
        x = x + MLP(c, name="mlp")(norm(name="mlp_norm")(x))
        return x, kv_cache


class Decoder(nn.Module):
    """Token ids [B, T] and positions [B, T] -> float32 logits [B, T, V] (and the new cache).

    Without a cache, attention is causal over the T tokens, with `attention_mask` [B, T] hiding
    padding keys. With a cache, the T tokens are written at slots [cache.index, cache.index + T)
    and attend to every valid earlier slot. `last_logits_only` computes logits for the last
    position only ([B, 1, V]), which is all a prefill needs. `logits_positions` (start, stop),
    static, computes them for positions [start, stop) only ([B, stop - start, V]): a training
    step needs none at the prompt's positions. `return_hidden` returns the final normed hidden
    states [B, T, D] (or those positions') instead of logits (for a value head).
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: Any = sharding.DEFAULT_RULES
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, cache: KVCache | None = None,
                 attention_mask=None, last_logits_only: bool = False,
                 return_hidden: bool = False, logits_positions: tuple[int, int] | None = None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, t = tokens_bt.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        act_names = ("batch", "length", "embed")

        embed = nn.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=jnp.dtype(c.param_dtype),
                         embedding_init=_dense_init(("vocab", "embed")), name="embed")
        x = sharding.constrain(embed(tokens_bt), act_names, self.mesh, self.rules)
        cos, sin = rope.cos_sin(positions_bt, c)

        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask_bts = causal[None] & attention_mask[:, None, :]
            index = None
        else:
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
            slots = jnp.arange(cache.capacity)
            query_slots = index + jnp.arange(t)
            mask_bts = valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])

        new_k, new_v = [], []
        block_cls = nn.remat(Block) if self.remat else Block
        for i in range(c.n_layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = block_cls(c, self.mesh, self.rules, cache is None,
                                       name=f"layers_{i}")(
                x, cos, sin, mask_bts, layer_cache, index)
            x = sharding.constrain(x, act_names, self.mesh, self.rules)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])

        if last_logits_only and logits_positions is not None:
            raise ValueError("pass last_logits_only or logits_positions, not both")
        if last_logits_only:
            x = x[:, -1:]
        elif logits_positions is not None:
            start, stop = logits_positions
            if not 0 <= start < stop <= t:
                raise ValueError(f"logits_positions {logits_positions} must satisfy 0 <= start "
                                 f"< stop <= {t} (the sequence length)")
            x = x[:, start:stop]
        x = RMSNorm(c.rms_norm_eps, dt, jnp.dtype(c.param_dtype), name="final_norm")(x)
        if return_hidden:
            return x, cache
        if c.tie_embeddings:
            logits = _tied_head(x, embed.embedding.astype(dt))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dt,
                              param_dtype=jnp.dtype(c.param_dtype),
                              kernel_init=_dense_init(("embed", "vocab")),
                              dot_general=_dot_general, name="lm_head")(x)
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"),
                                    self.mesh, self.rules)
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + t)
        return logits, cache


def _abstract_variables(config: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(Decoder(config).init, jax.random.key(0), tokens, tokens)


def param_logical_axes(config: ModelConfig):
    """A params-shaped tree of PartitionSpecs holding logical axis names."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


def param_shapes(config: ModelConfig):
    """A params-shaped tree of jax.ShapeDtypeStruct."""
    return nn.meta.unbox(_abstract_variables(config))["params"]


def init_params(config: ModelConfig, rng: jax.Array, mesh: Mesh | None = None,
                rules=sharding.DEFAULT_RULES) -> Params:
    """Random params (normal(0.02) weights, unit norms), sharded over `mesh` when given."""
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init(key):
        return nn.meta.unbox(Decoder(config).init(key, tokens, tokens))["params"]

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = param_shardings(config, mesh, rules)
    return jax.jit(init, out_shardings=shardings)(rng)


def param_shardings(config: ModelConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """NamedShardings for every param, from the logical axis rules."""
    shapes = jax.tree.map(lambda s: s.shape, param_shapes(config))
    return sharding.tree_shardings(param_logical_axes(config), shapes, mesh, rules)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _forward(config, params, tokens_bt, attention_mask, mesh, rules):
    t = tokens_bt.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
    logits, _ = Decoder(config, mesh, rules).apply({"params": params}, tokens_bt, positions,
                                                   None, attention_mask)
    return logits


def forward(config: ModelConfig, params: Params, tokens, *, attention_mask=None,
            rules=sharding.DEFAULT_RULES) -> jax.Array:
    """[B, T] int tokens -> [B, T, V] float32 logits, no cache; right padding masked by
    `attention_mask` [B, T]. Runs sharded when `params` live on a mesh."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length]; got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    attention_mask = jnp.asarray(attention_mask, bool)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape "
                         f"{tokens.shape}")
    mesh = sharding.mesh_of(params)
    if mesh is not None:
        batch_sharding = sharding.named_sharding(("batch", "length"), tokens.shape, mesh, rules)
        tokens = jax.device_put(tokens, batch_sharding)
        attention_mask = jax.device_put(attention_mask, batch_sharding)
    return _forward(config, params, tokens, attention_mask, mesh, sharding.as_rules(rules))
