"""Losses as pure functions returning (sum, denominator), masked by the loss mask.

Returning the pair, not the mean, makes gradient accumulation exact: the update sums the sums
and the denominators over micro-batches (and devices) and divides once, so the result is the
global mean whatever the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")


def aggregate(values_bt: jax.Array, mask_bt: jax.Array, mode: str = "token-mean"
              ) -> tuple[jax.Array, jax.Array]:
    """(sum, denominator) of per-token values under `mode`:
    token-mean: all mask-1 tokens of the batch weigh the same;
    seq-mean-token-mean: mean over tokens within a sequence, then over sequences;
    seq-mean-token-sum: sum over tokens within a sequence, mean over sequences."""
    mask = mask_bt.astype(jnp.float32)
    v = jnp.where(mask > 0, values_bt, 0.0)  # an inf off the mask must not make a NaN sum
    if mode == "token-mean":
        return v.sum(), mask.sum()
    has = (mask.sum(-1) > 0).astype(jnp.float32)
    if mode == "seq-mean-token-mean":
        return (v.sum(-1) / jnp.maximum(mask.sum(-1), 1)).sum(), has.sum()
    if mode == "seq-mean-token-sum":
        return v.sum(), has.sum()
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def ppo_clip_terms(logp_bt, old_logp_bt, adv_bt, *, clip_low: float = 0.2,
                   clip_high: float | None = None, dual_clip: float | None = None):
    """Per-token PPO-clip loss [B, T] and whether the clip was active (for the clip fraction).

    clip_high defaults to clip_low (symmetric); a larger clip_high is the asymmetric
    "clip-higher". dual_clip = c > 1 bounds the loss of negative-advantage tokens by -c * A.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = jnp.exp(logp_bt - old_logp_bt)
    unclipped = -adv_bt * ratio
    clipped = -adv_bt * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    active = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1; got {dual_clip}")
        bound = -adv_bt * dual_clip
        loss = jnp.where(adv_bt < 0, jnp.minimum(loss, bound), loss)
    return loss, active


def policy_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, *, clip_low: float = 0.2,
                clip_high: float | None = None, dual_clip: float | None = None,
                mode: str = "token-mean"):
    """PPO-clip policy loss as (sum, denominator)."""
    loss, _ = ppo_clip_terms(logp_bt, old_logp_bt, adv_bt, clip_low=clip_low,
                             clip_high=clip_high, dual_clip=dual_clip)
    return aggregate(loss, mask_bt, mode)


def entropy_from_logits(logits_btv: jax.Array) -> jax.Array:
    """Per-token entropy [B, T] of softmax(logits)."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def kl_estimate(logp_bt, ref_logp_bt, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled tokens.

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) + log r - 1 (low variance, >= 0), with
    log r = logp - ref_logp. The loss *adds* coef * KL (the reference subtracts it: a sign bug).
    As veRL's low_var_kl, k3 takes log r within [-20, 20] and is at most 10 (its gradient is 0
    beyond): one token far from the reference can neither overflow nor dominate the update.
    """
    log_ratio = logp_bt - ref_logp_bt
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        log_ratio = jnp.clip(log_ratio, -20.0, 20.0)
        return jnp.minimum(jnp.exp(-log_ratio) + log_ratio - 1.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def value_loss(values_bt, old_values_bt, returns_bt, mask_bt, *, clip: float = 0.5,
               mode: str = "token-mean"):
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) as (sum, denominator)."""
    clipped = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
    loss = 0.5 * jnp.maximum((values_bt - returns_bt) ** 2, (clipped - returns_bt) ** 2)
    return aggregate(loss, mask_bt, mode)
