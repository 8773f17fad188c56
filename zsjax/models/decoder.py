"""The Llama / Qwen2 / Qwen3 decoder as a Flax Linen module applied as a pure function.

    logits_btv, cache = Decoder(config).apply({"params": params}, tokens_bt, positions_bt, cache)

The KV cache is an explicit argument and result (a `KVCache` pytree), never a mutable Flax
collection, so the same module serves training (no cache), prefill and decode. Params carry
logical axis names (see `zsjax.sharding`); `param_logical_axes` reads them off the module.

Attention, and on a CPU the projections and the tied head, run through products with
hand-written backward passes (`zsjax.models.kernels`); this module is the architecture.

With `config.scan_layers` the layers are one `nn.scan` over params stacked on a leading
"layers" axis (`params["layers"]`, each leaf [n_layers, ...]) instead of a Python loop over
`layers_0 ... layers_{n-1}`: one layer is traced and compiled, whatever the depth. The cache
then holds one stacked array for keys and one for values. `stack_layers` / `unstack_layers`
convert params between the two layouts (Hugging Face checkpoints are per layer).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from zsjax import sharding
from zsjax.models import kernels as K
from zsjax.models import rope
from zsjax.models.config import ModelConfig

Params = Any


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values in fixed-capacity slots, shared by all rows of a batch.

    New tokens are written at slots [index, index + T) for every row; `valid` marks which slots
    hold real tokens, so rows may be left-padded or carry padding in the middle (ragged appends).
    """

    k: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh] (scan_layers: one [L, B, KVH, S, Dh])
    # Values are stored transposed, slots last, so both attention contractions run over the
    # minor dimension: on XLA:CPU this took batch-32 attention from 21 to 14 ms a step.
    v: tuple[jax.Array, ...]  # per layer [B, KVH, Dh, S] (scan_layers: one [L, B, KVH, Dh, S])
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
    if config.scan_layers:
        return KVCache(k=(jnp.zeros((config.n_layers,) + k_shape, dt),),
                       v=(jnp.zeros((config.n_layers,) + v_shape, dt),),
                       valid=jnp.zeros((batch, capacity), bool), index=jnp.zeros((), jnp.int32))
    return KVCache(k=tuple(jnp.zeros(k_shape, dt) for _ in range(config.n_layers)),
                   v=tuple(jnp.zeros(v_shape, dt) for _ in range(config.n_layers)),
                   valid=jnp.zeros((batch, capacity), bool), index=jnp.zeros((), jnp.int32))


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """A one-row cache repeated for `batch` rows (a prefix every row shares). Under autodiff
    the rows' gradients with respect to the prefix's keys and values are summed."""
    axis = 1 if cache.k[0].ndim == 5 else 0  # scan_layers: [L, B, ...]

    def rows(a):
        return jnp.broadcast_to(a, a.shape[:axis] + (batch,) + a.shape[axis + 1:])
    return KVCache(k=tuple(map(rows, cache.k)), v=tuple(map(rows, cache.v)),
                   valid=jnp.broadcast_to(cache.valid, (batch,) + cache.valid.shape[1:]),
                   index=cache.index)


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
                bias_init=_zeros_init((head_axis, "head_dim")), dot_general=K.dot_general,
                name=name)(x_btd)

        q = proj("q_proj", c.n_heads, "heads", c.qkv_bias)  # [B, T, H, Dh]
        k = proj("k_proj", c.n_kv_heads, "kv_heads", c.qkv_bias)  # [B, T, KVH, Dh]
        v = proj("v_proj", c.n_kv_heads, "kv_heads", c.qkv_bias)
        if c.qk_norm:  # Qwen3: each head's q and k normalised over head_dim
            q = RMSNorm(c.rms_norm_eps, dt, pdt, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, dt, pdt, name="k_norm")(k)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        k = k.transpose(0, 2, 1, 3)  # [B, KVH, T, Dh]
        v = v.transpose(0, 2, 3, 1)  # [B, KVH, Dh, T], the cache's layout
        if kv_cache is not None and len(kv_cache) == 3:
            # scan_layers: every layer's cache stacked, this layer's index; only the new slots
            # are written, in place in the loop's carry
            k_all, v_all, layer = kv_cache
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype),
                                                 (layer, 0, 0, cache_index, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype),
                                                 (layer, 0, 0, 0, cache_index))
            k, v = k_all[layer], v_all[layer]
            kv_cache = (k_all, v_all, layer)
        elif kv_cache is not None:
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
        if self.causal and kv_cache is None and K.on_cpu():
            block = max(K.CAUSAL_BLOCK, -(-t // 16))
            out = K.causal_attention(q, k.astype(dt), v.astype(dt), mask_bts, block)
        else:
            out = K.attention(q, k.astype(dt), v.astype(dt), mask_bts)
        out = out.reshape(b, t, c.n_heads, c.head_dim)
        out = nn.DenseGeneral(
            c.d_model, axis=(-2, -1), use_bias=c.o_bias, dtype=dt, param_dtype=pdt,
            kernel_init=_dense_init(("heads", "head_dim", "embed")),
            bias_init=_zeros_init(("embed",)), dot_general=K.dot_general, name="o_proj")(out)
        return out, kv_cache


# The MLP's gate activations, by Hugging Face's `hidden_act` names (transformers' ACT2FN).
ACTIVATIONS = {"silu": nn.silu, "gelu": functools.partial(nn.gelu, approximate=False),
               "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
               "relu": nn.relu}


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=pdt,
                                  dot_general=K.dot_general)
        gate = dense(c.d_ff, kernel_init=_dense_init(("embed", "mlp")), name="gate_proj")(x)
        up = dense(c.d_ff, kernel_init=_dense_init(("embed", "mlp")), name="up_proj")(x)
        return dense(c.d_model, kernel_init=_dense_init(("mlp", "embed")),
                     name="down_proj")(ACTIVATIONS[c.activation](gate) * up)


def _block(module, x, cos, sin, mask_bts, kv_cache, cache_index):
    """One decoder layer, its submodules created in `module`'s scope (Block and ScannedBlock
    share it, so both hold the same param tree)."""
    c = module.config
    norm = functools.partial(RMSNorm, c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
    h, kv_cache = Attention(c, module.mesh, module.rules, module.causal, name="attn")(
        norm(name="attn_norm")(x), cos, sin, mask_bts, kv_cache, cache_index)
    x = x + h
    x = x + MLP(c, name="mlp")(norm(name="mlp_norm")(x))
    return x, kv_cache


class Block(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    rules: Any = sharding.DEFAULT_RULES
    causal: bool = False  # (see Attention)

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, kv_cache, cache_index):
        return _block(self, x, cos, sin, mask_bts, kv_cache, cache_index)


class ScannedBlock(nn.Module):
    """A layer as the body of `nn.scan`: carry (x,) or (x, k_all, v_all), scanned over the
    layer index."""

    config: ModelConfig
    mesh: Mesh | None = None
    rules: Any = sharding.DEFAULT_RULES
    causal: bool = False

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask_bts, cache_index):
        x, *kv = carry
        kv_cache = (kv[0], kv[1], layer) if kv else None
        x, kv_cache = _block(self, x, cos, sin, mask_bts, kv_cache, cache_index)
        x = sharding.constrain(x, ("batch", "length", "embed"), self.mesh, self.rules)
        return (x, *kv_cache[:2]) if kv else (x,), None


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

        if c.scan_layers:
            x, new_k, new_v = self._scanned_layers(x, cos, sin, mask_bts, cache, index)
        else:
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
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + t)
        x = RMSNorm(c.rms_norm_eps, dt, jnp.dtype(c.param_dtype), name="final_norm")(x)
        if return_hidden:
            return x, cache
        if c.tie_embeddings:
            logits = K.tied_head(x, embed.embedding.astype(dt))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dt,
                              param_dtype=jnp.dtype(c.param_dtype),
                              kernel_init=_dense_init(("embed", "vocab")),
                              dot_general=K.dot_general, name="lm_head")(x)
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"),
                                    self.mesh, self.rules)
        return logits, cache


    def _scanned_layers(self, x, cos, sin, mask_bts, cache, index):
        """The layers as one `nn.scan` over params stacked under "layers" (scan_layers); the
        stacked cache rides in the carry. Returns (x, [k], [v]), or empty lists without a
        cache."""
        c = self.config
        body = nn.remat(ScannedBlock, prevent_cse=False) if self.remat else ScannedBlock
        layers = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                         length=c.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        carry = (x,) if cache is None else (x, cache.k[0], cache.v[0])
        carry, _ = layers(c, self.mesh, self.rules, cache is None, name="layers")(
            carry, jnp.arange(c.n_layers), cos, sin, mask_bts, index)
        return carry[0], list(carry[1:2]), list(carry[2:3])


def stack_layers(params: Params, n_layers: int) -> Params:
    """Per-layer params (`layers_0 ... layers_{n-1}`) -> the scan_layers layout
    (`layers`, each leaf stacked on a new leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                 *[params[f"layers_{i}"] for i in range(n_layers)])
    return out


def unstack_layers(params: Params) -> Params:
    """The scan_layers layout -> per-layer params (what Hugging Face checkpoints hold)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], params["layers"])
    return out


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
