"""Rotary position embeddings, Hugging Face layout (rotate-half, not interleaved)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zsjax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies, with Llama-3 or linear scaling applied.

    Computed in float32 like transformers, so positions far into the context agree bit for bit.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # Llama 3: keep high frequencies, divide low frequencies by `factor`, interpolate between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions_bt: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, head_dim]; the tables are cast to x's dtype first, as transformers does."""
    cos = cos_btd[:, :, None, :].astype(x_bthd.dtype)
    sin = sin_btd[:, :, None, :].astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin
