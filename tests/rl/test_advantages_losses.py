"""Advantage estimators and losses against loop-by-loop NumPy references."""

import numpy as np
import pytest

from zsjax.rl import advantages as A
from zsjax.rl import losses as L

rng = np.random.default_rng(0)
B, T = 5, 13
MASK = (rng.random((B, T)) > 0.3).astype(np.float32)
MASK[:, 0] = 1
MASK[2] = 0  # a row with no policy tokens at all
MASK[3, :] = 1


def test_group_normalized_and_dr_grpo_and_rloo():
    r = rng.normal(size=(4, 5)).astype(np.float32)
    ref = np.empty_like(r)
    for q in range(4):
        mean, std = r[q].mean(), r[q].std(ddof=1)
        ref[q] = (r[q] - mean) / (std + 1e-6)
    np.testing.assert_allclose(A.group_normalized(r), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(A.group_normalized(r, eps=0.5), (r - r.mean(1, keepdims=True))
                               / (r.std(1, ddof=1, keepdims=True) + 0.5), rtol=1e-5)
    np.testing.assert_allclose(A.group_normalized(r, scale=False), r - r.mean(1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    loo = np.array([[r[q, i] - np.delete(r[q], i).mean() for i in range(5)] for q in range(4)])
    np.testing.assert_allclose(A.rloo(r), loo, rtol=1e-5, atol=1e-6)
    # identical rewards in a group: zero advantage, not a division by zero
    assert np.all(np.asarray(A.group_normalized(np.ones((2, 4)))) == 0)


def _ref_gae(r, v, m, gamma, lam):
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        next_v, run = 0.0, 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                delta = r[b, t] + gamma * next_v - v[b, t]
                run = delta + gamma * lam * run
                adv[b, t] = run
                next_v = v[b, t]
    return adv, (adv + v) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_gae_skips_masked_tokens(gamma, lam):
    r = rng.normal(size=(B, T)).astype(np.float32)
    v = rng.normal(size=(B, T)).astype(np.float32)
    adv, ret = A.gae(r, v, MASK, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _ref_gae(r, v, MASK, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # inserting masked tokens (an information block) changes nothing for the policy tokens
    row = 3
    wide_r = np.insert(r[row], 6, [9.0] * 4)
    wide_v = np.insert(v[row], 6, [-7.0] * 4)
    wide_m = np.insert(MASK[row], 6, [0.0] * 4)
    adv2, _ = A.gae(wide_r[None], wide_v[None], wide_m[None], gamma=gamma, lam=lam)
    np.testing.assert_allclose(np.delete(np.asarray(adv2)[0], range(6, 10)),
                               np.asarray(adv)[row], rtol=1e-5, atol=1e-6)


def test_reinforce_plus_plus():
    scores = np.asarray(A.place_on_last_token(rng.normal(size=B).astype(np.float32), MASK))
    kl = rng.random((B, T)).astype(np.float32)
    coef, gamma = 0.1, 0.99
    out = np.asarray(A.reinforce_plus_plus(scores, kl, MASK, kl_coef=coef, gamma=gamma))
    ret = np.zeros((B, T))
    for b in range(B):
        run = 0.0
        for t in reversed(range(T)):
            if MASK[b, t]:
                run = scores[b, t] - coef * kl[b, t] + gamma * run
                ret[b, t] = run
    vals = ret[MASK > 0]
    ref = (ret - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * MASK
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_place_on_last_token():
    out = np.asarray(A.place_on_last_token(np.arange(1, B + 1, dtype=np.float32), MASK))
    for b in range(B):
        idx = np.nonzero(MASK[b])[0]
        expect = np.zeros(T)
        if len(idx):
            expect[idx[-1]] = b + 1
        np.testing.assert_array_equal(out[b], expect)


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregations(mode):
    x = rng.normal(size=(B, T)).astype(np.float32)
    s, d = L.aggregate(x, MASK, mode)
    rows = [b for b in range(B) if MASK[b].sum() > 0]
    if mode == "token-mean":
        ref = (x * MASK).sum() / MASK.sum()
    elif mode == "seq-mean-token-mean":
        ref = np.mean([(x[b] * MASK[b]).sum() / MASK[b].sum() for b in rows])
    else:
        ref = np.mean([(x[b] * MASK[b]).sum() for b in rows])
    np.testing.assert_allclose(float(s) / float(d), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        L.aggregate(x, MASK, "mean")


@pytest.mark.parametrize("clip_high,dual", [(None, None), (0.28, None), (None, 3.0)])
def test_ppo_clip_policy_loss(clip_high, dual):
    logp = rng.normal(scale=0.3, size=(B, T)).astype(np.float32) - 1
    old = logp + rng.normal(scale=0.4, size=(B, T)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    s, d = L.policy_loss(logp, old, adv, MASK, clip_low=0.2, clip_high=clip_high, dual_clip=dual)
    hi = 0.2 if clip_high is None else clip_high
    ref = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            ratio = np.exp(logp[b, t] - old[b, t])
            loss = max(-adv[b, t] * ratio, -adv[b, t] * min(max(ratio, 0.8), 1 + hi))
            if dual is not None and adv[b, t] < 0:
                loss = min(loss, -adv[b, t] * dual)
            ref[b, t] = loss
    np.testing.assert_allclose(float(s) / float(d), (ref * MASK).sum() / MASK.sum(), rtol=1e-5)


def test_kl_estimators_entropy_and_value_loss():
    logp = rng.normal(size=(B, T)).astype(np.float32) - 2
    ref = logp + rng.normal(scale=0.5, size=(B, T)).astype(np.float32)
    lr = logp.astype(np.float64) - ref
    np.testing.assert_allclose(L.kl_estimate(logp, ref, "k1"), lr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.kl_estimate(logp, ref, "k2"), 0.5 * lr ** 2, rtol=1e-5,
                               atol=1e-6)
    k3 = np.exp(ref - logp) - (ref - logp) - 1  # the design reference's form
    np.testing.assert_allclose(L.kl_estimate(logp, ref, "k3"), k3, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(L.kl_estimate(logp, ref, "k3")) >= 0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(L.entropy_from_logits(logits), -(p * np.log(p)).sum(-1),
                               rtol=1e-5)
    v, old_v, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    s, d = L.value_loss(v, old_v, ret, MASK, clip=0.5)
    vc = old_v + np.clip(v - old_v, -0.5, 0.5)
    expect = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
    np.testing.assert_allclose(float(s) / float(d), (expect * MASK).sum() / MASK.sum(),
                               rtol=1e-5)


def test_k3_is_bounded_and_an_overflow_off_the_mask_stays_out_of_the_loss():
    """As veRL's low_var_kl: log r clipped to [-20, 20] before the exponential, k3 at most
    10, and a token past the bound gets no gradient. Masked tokens contribute neither a value
    nor a NaN gradient, even where the unbounded estimate would overflow."""
    import jax
    import jax.numpy as jnp
    logp = jnp.array([[-1.0, -2.0, -95.0, -3.0]])
    ref = jnp.array([[-1.1, -1.9, -2.0, -30.0]])  # token 2: ref - logp = 93 (exp overflows)
    mask = jnp.array([[1.0, 1.0, 0.0, 1.0]])
    k3 = np.asarray(L.kl_estimate(logp, ref, "k3"))
    lr = np.asarray(logp - ref, np.float64)
    np.testing.assert_allclose(k3[0, :2], np.exp(-lr[0, :2]) + lr[0, :2] - 1, rtol=1e-5)
    assert k3[0, 2] == 10.0 and 0 < k3[0, 3] <= 10.0

    def loss(lp):
        s, d = L.aggregate(L.kl_estimate(lp, ref, "k3"), mask)
        return s / d
    value, grad = jax.value_and_grad(loss)(logp)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(grad[0, 2]) == 0.0  # masked
    # token 3 (log r = 27): past both bounds, so no gradient; tokens 0, 1: d k3 / d logp
    assert float(grad[0, 3]) == 0.0
    np.testing.assert_allclose(np.asarray(grad[0, :2]), (1 - np.exp(-lr[0, :2])) / 3, rtol=1e-5)
