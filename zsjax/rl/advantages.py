"""Advantage estimators: small pure functions, one per algorithm.

Token arrays are [B, T] over the response, with `mask` 1 exactly on the policy's own tokens.
Information blocks (mask 0) sit *inside* a response, so the reverse scans below carry their state
through mask-0 tokens untouched instead of resetting there: the return seen before a search
includes what the policy earned after it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_normalized(rewards_qk: jax.Array, *, eps: float = 1e-6, scale: bool = True
                     ) -> jax.Array:
    """GRPO: (r - group mean) / (group std + eps) over the K rollouts of each question [Q, K].

    The std is the unbiased one (ddof=1), as torch.std in the reference; a group of one gets
    mean 0 and std 1. `scale=False` is the Dr.GRPO variant: r - group mean, no division.

    A group whose rewards are all equal gets exactly 0. The float32 mean of equal values such
    as 2/7 is not always exact, and dividing by (std + eps) would blow the rounding up into
    small, sign-random advantages on every token of the group (the reference has this noise).
    """
    k = rewards_qk.shape[-1]
    r = rewards_qk.astype(jnp.float32)
    if k == 1:
        return r
    mean = r.mean(-1, keepdims=True)
    same = jnp.all(r == r[..., :1], axis=-1, keepdims=True)
    centred = jnp.where(same, 0.0, r - mean)
    if not scale:
        return centred
    std = jnp.sqrt((centred ** 2).sum(-1, keepdims=True) / (k - 1))
    return centred / (std + eps)


def rloo(rewards_qk: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out: r_i minus the mean of the other K-1 rewards of its group
    (exactly 0 for a group of equal rewards, as in `group_normalized`)."""
    k = rewards_qk.shape[-1]
    r = rewards_qk.astype(jnp.float32)
    if k == 1:
        return jnp.zeros_like(r)
    same = jnp.all(r == r[..., :1], axis=-1, keepdims=True)
    return jnp.where(same, 0.0, r - (r.sum(-1, keepdims=True) - r) / (k - 1))


def masked_mean(x, mask, axis=None):
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1)


def masked_whiten(x_bt: jax.Array, mask_bt: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over mask-1 tokens (unbiased var); mask-0 tokens become 0."""
    mask = mask_bt.astype(jnp.float32)
    mean = masked_mean(x_bt, mask)
    n = mask.sum()
    var = ((x_bt - mean) ** 2 * mask).sum() / jnp.maximum(n - 1, 1)
    out = (x_bt - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation as a masked reverse scan: (advantages, returns) [B, T].

    Mask-0 tokens are skipped: they get advantage 0 and pass (next value, running GAE) through
    unchanged, so a search's documents do not cut the credit path.
    """
    mask = mask_bt.astype(jnp.float32)

    def step(carry, xs):
        next_value, running = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        new_running = delta + gamma * lam * running
        running = jnp.where(m > 0, new_running, running)
        next_value = jnp.where(m > 0, v, next_value)
        return (next_value, running), running * m

    b = rewards_bt.shape[0]
    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
    xs = (rewards_bt.T.astype(jnp.float32), values_bt.T.astype(jnp.float32), mask.T)
    _, adv_tb = jax.lax.scan(step, init, xs, reverse=True)
    adv = adv_tb.T
    return adv, (adv + values_bt) * mask


def discounted_returns(rewards_bt: jax.Array, mask_bt: jax.Array, *, gamma: float = 1.0
                       ) -> jax.Array:
    """sum_{s >= t, mask_s = 1} gamma^(k(s) - k(t)) r_s, counting only mask-1 tokens; 0 where
    mask is 0."""
    mask = mask_bt.astype(jnp.float32)

    def step(running, xs):
        r, m = xs
        running = jnp.where(m > 0, r + gamma * running, running)
        return running, running * m

    _, ret_tb = jax.lax.scan(step, jnp.zeros(rewards_bt.shape[:1], jnp.float32),
                             (rewards_bt.T.astype(jnp.float32), mask.T), reverse=True)
    return ret_tb.T


def reinforce_plus_plus(scores_bt: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, *,
                        kl_coef: float, gamma: float = 1.0) -> jax.Array:
    """REINFORCE++: token reward = score (on the last response token) - kl_coef * KL, its
    discounted return, whitened over the batch's mask-1 tokens."""
    rewards = scores_bt - kl_coef * kl_bt
    return masked_whiten(discounted_returns(rewards, mask_bt, gamma=gamma), mask_bt)


def place_on_last_token(scores_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """[B] sequence scores -> [B, T], each on the row's last mask-1 token (the reward position)."""
    t = mask_bt.shape[1]
    last = t - 1 - jnp.argmax(mask_bt[:, ::-1] > 0, axis=1)
    has = mask_bt.sum(1) > 0
    onehot = jax.nn.one_hot(last, t, dtype=jnp.float32) * has[:, None]
    return onehot * scores_b[:, None].astype(jnp.float32)
