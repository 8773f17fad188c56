"""The algorithm and reward registries: every registered estimator against a plain-NumPy
(float64) implementation through the trainer's interface, exact zeros for all-equal groups,
and names that are not registered."""

import dataclasses
import types

import numpy as np
import pytest

from zsjax.rl import algorithms, rewards

rng = np.random.default_rng(1)
Q, K, T = 3, 4, 11
MASK = (rng.random((Q * K, T)) > 0.3).astype(np.float32)
MASK[:, 0] = 1
MASK[5] = 0  # a row with no policy tokens
RL = types.SimpleNamespace(std_eps=1e-6, kl_coef=0.05, gamma=0.9, lam=0.8)


def _inputs(rewards_b):
    old = rng.normal(size=(Q * K, T)).astype(np.float32)
    ref = rng.normal(size=(Q * K, T)).astype(np.float32)
    values = (rng.normal(size=(Q * K, T)) * MASK).astype(np.float32)
    return algorithms.AdvantageInputs(rewards=np.asarray(rewards_b, np.float32), group_size=K,
                                      mask=MASK, old_logprobs=old, ref_logprobs=ref,
                                      values=values, rl=RL)


# --- Plain NumPy, float64, loop by loop ------------------------------------------------------

def _groups(r):
    return np.asarray(r, np.float64).reshape(Q, K)


def np_grpo(x):
    g = _groups(x.rewards)
    adv = [(row - row.mean()) / (row.std(ddof=1) + RL.std_eps) for row in g]
    return np.concatenate(adv)[:, None] * MASK


def np_dr_grpo(x):
    return np.concatenate([row - row.mean() for row in _groups(x.rewards)])[:, None] * MASK


def np_rloo(x):
    adv = [[row[i] - np.delete(row, i).mean() for i in range(K)] for row in _groups(x.rewards)]
    return np.asarray(adv).reshape(-1)[:, None] * MASK


def _token_rewards(x):
    """score on the last policy token, minus kl_coef x the k1 KL (logp - ref logp) on each."""
    out = -RL.kl_coef * (np.float64(x.old_logprobs) - x.ref_logprobs) * MASK
    for b in range(Q * K):
        idx = np.nonzero(MASK[b])[0]
        if len(idx):
            out[b, idx[-1]] += x.rewards[b]
    return out


def _whiten(a):
    m = MASK > 0
    mean, var = a[m].mean(), a[m].var(ddof=1)
    return (a - mean) / np.sqrt(var + 1e-8) * MASK


def np_reinforce_pp(x):
    """Undiscounted returns: rl.gamma and rl.lam are PPO's (GAE) settings."""
    r, out = _token_rewards(x), np.zeros((Q * K, T))
    for b in range(Q * K):
        running = 0.0
        for t in reversed(range(T)):
            if MASK[b, t]:
                running = r[b, t] + running
                out[b, t] = running
    return _whiten(out)


def np_ppo(x):
    r, v = _token_rewards(x), np.float64(x.values)
    adv = np.zeros((Q * K, T))
    for b in range(Q * K):
        next_v = running = 0.0
        for t in reversed(range(T)):
            if MASK[b, t]:
                running = r[b, t] + RL.gamma * next_v - v[b, t] + RL.gamma * RL.lam * running
                next_v = v[b, t]
                adv[b, t] = running
    return _whiten(adv), (adv + v) * MASK


REFERENCES = {"grpo": np_grpo, "dr_grpo": np_dr_grpo, "rloo": np_rloo, "ppo": np_ppo,
              "reinforce_pp": np_reinforce_pp}


def test_every_builtin_algorithm_is_registered_with_a_reference():
    assert set(REFERENCES) <= set(algorithms.names())


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_advantages_match_numpy(name):
    x = _inputs(rng.random(Q * K))
    adv, returns = algorithms.get(name).advantages(x)
    want = REFERENCES[name](x)
    if name == "ppo":
        want, want_returns = want
        np.testing.assert_allclose(returns, want_returns, rtol=1e-4, atol=1e-5)
    else:
        assert returns is None
    np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(adv)[MASK == 0] == 0)  # documents and padding get nothing


@pytest.mark.parametrize("baseline", ["group", "group_norm"])
@pytest.mark.parametrize("name", ["ppo", "reinforce_pp"])
def test_score_baselines_are_the_reference_on_group_centred_rewards(name, baseline):
    """rl.score_baseline="group": the same estimator on each reward minus its question's mean
    (REINFORCE++-baseline); "group_norm": on GRPO's (r - mean) / (std + eps). Without it the
    same rewards give other advantages."""
    r = rng.random(Q * K)
    centred = np.concatenate([row - row.mean() for row in _groups(r)])
    if baseline == "group_norm":
        centred = np.concatenate([(row - row.mean()) / (row.std(ddof=1) + RL.std_eps)
                                  for row in _groups(r)])
    x = _inputs(r)
    rl = types.SimpleNamespace(**vars(RL), score_baseline=baseline)
    adv, returns = algorithms.get(name).advantages(dataclasses.replace(x, rl=rl))
    want = REFERENCES[name](dataclasses.replace(x, rewards=centred))
    if name == "ppo":
        want, want_returns = want
        np.testing.assert_allclose(returns, want_returns, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-5)
    plain, _ = algorithms.get(name).advantages(x)
    assert np.abs(np.asarray(plain) - np.asarray(adv)).max() > 1e-2


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [2 / 7, 0.1, 1 / 3, 0.0, 1.0, 0.8571428])
def test_all_equal_groups_get_exactly_zero(name, value):
    """F1-like values whose float32 mean is inexact: a group of equal rewards carries no
    signal, and its advantage is exactly 0 (float64 NumPy gives 0 too)."""
    r = np.full(Q * K, value, np.float32)
    r[:K] = [0.0, 0.5, 1.0, 0.25]  # one group that does differ
    adv, _ = algorithms.get(name).advantages(_inputs(r))
    adv = np.asarray(adv)
    assert np.all(adv[K:] == 0), adv[K:].max()
    assert np.abs(adv[:K]).max() > 0
    np.testing.assert_allclose(adv, REFERENCES[name](_inputs(r)), rtol=1e-4, atol=1e-6)


def test_needs_reference_and_where_the_kl_goes():
    grpo, ppo = algorithms.get("grpo"), algorithms.get("ppo")
    assert grpo.needs_reference(0.001) and not grpo.needs_reference(0.0)
    assert ppo.needs_reference(0.0) and ppo.critic and not grpo.critic
    assert grpo.loss_kl_coef(0.01) == 0.01 and ppo.loss_kl_coef(0.01) == 0.0


@pytest.mark.parametrize("name", ["ppo", "reinforce_pp"])
def test_kl_in_the_loss_takes_it_out_of_the_reward(name):
    """rl.kl_placement="loss": the reward-KL algorithms become loss-KL ones (a reference only
    when kl_coef > 0, the loss's coefficient kl_coef) and their advantages are the reference's
    at reward-KL 0, with or without the reference's logprobs."""
    algo = algorithms.resolve(name, "loss")
    assert algo.kl == "loss" and algo.loss_kl_coef(0.1) == 0.1
    assert algo.needs_reference(0.1) and not algo.needs_reference(0.0)
    assert algorithms.resolve(name, "").kl == "reward"
    assert algorithms.resolve("grpo", "loss") is algorithms.get("grpo")
    x = _inputs(rng.random(Q * K))
    x = dataclasses.replace(x, rl=types.SimpleNamespace(**vars(RL), kl_placement="loss"))
    no_kl = dataclasses.replace(x, ref_logprobs=x.old_logprobs)  # k1 KL exactly 0
    want = REFERENCES[name](no_kl)
    for inputs in (x, dataclasses.replace(x, ref_logprobs=None)):
        adv, returns = algo.advantages(inputs)
        if name == "ppo":
            np.testing.assert_allclose(returns, want[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(adv, want[0] if name == "ppo" else want, rtol=1e-4,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="rl.kl_placement='reward'"):
        algorithms.resolve(name, "reward")


def test_unknown_names_and_bad_registrations():
    with pytest.raises(ValueError, match="'dpo' is not available.*grpo"):
        algorithms.get("dpo")
    with pytest.raises(ValueError, match="'bleu' is not available.*f1"):
        rewards.get_reward("bleu")
    with pytest.raises(ValueError, match="kl"):
        algorithms.Algorithm(lambda x: x, kl="nowhere")
    with pytest.raises(TypeError):
        algorithms.register("x", lambda x: x)
    with pytest.raises(TypeError):
        rewards.register_reward("x", 3)


def test_rewards_by_name_match_plain_python():
    preds = ["the Eiffel Tower", "Paris France", None, "paris"]
    golds = [["Eiffel tower"], ["Paris"], ["Paris"], ["Paris", "Rome"]]
    np.testing.assert_allclose(rewards.get_reward("f1")(preds, golds), [1.0, 2 / 3, 0.0, 1.0],
                               rtol=1e-6)
    np.testing.assert_array_equal(rewards.get_reward("em")(preds, golds), [1, 0, 0, 1])
    np.testing.assert_array_equal(rewards.get_reward("substring")(preds, golds), [1, 1, 0, 1])


def test_readme_extension_examples_run(monkeypatch):
    """The README's "Extending zsjax" snippets run as written and register what they say."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme.split("## Extending zsjax", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 3
    monkeypatch.setitem(algorithms.ALGORITHMS, "leave_best_out", None)
    monkeypatch.setitem(rewards.REWARDS, "short_f1", None)
    from zsjax.search import factory
    monkeypatch.setitem(factory._KINDS, "my_engine", None)
    scope = {}
    for block in blocks:
        exec(block, scope)
    x = _inputs(rng.random(Q * K))
    adv, _ = algorithms.get("leave_best_out").advantages(x)
    g = _groups(x.rewards)
    np.testing.assert_allclose(adv, (g - g.max(1, keepdims=True)).reshape(-1)[:, None] * MASK,
                               rtol=1e-6)
    np.testing.assert_allclose(rewards.get_reward("short_f1")(["Paris France", None],
                                                              [["Paris"], ["x"]]),
                               [2 / 3 - 0.02, 0.0], rtol=1e-5)
    from zsjax.search import factory
    assert "my_engine" in factory.kinds()
    backend = factory.make_backend("my_engine", top_k=2)
    assert backend.search([types.SimpleNamespace(query="q")]) == ["Doc 1: q is ... (top 2)"]
