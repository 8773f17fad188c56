"""`zsjax.sampling.distribution` against JAX's own reference ops: the argmax, the greedy
logprob and the token draw are rewritten for speed, and must give what `jnp.argmax`,
`jax.nn.log_softmax` and `jax.random.categorical` give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax.sampling.distribution import SamplingParams, argmax, filter_logits, sample


def _logits():
    x = np.random.default_rng(0).normal(size=(6, 1000)).astype(np.float32) * 3
    x[1, [10, 500, 999]] = x[1].max() + 1  # exact ties: the first index wins
    x[2, 100:] = -np.inf  # a filtered row
    x[3, :] = -np.inf
    x[3, 998] = 0.0  # one finite entry, at the end
    x[4, [7, 8]] = np.inf  # ties at +inf
    return jnp.asarray(x)


def _keys(n):
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(n))


def test_argmax_equals_jnp_argmax_with_ties_and_infinities():
    x = _logits()
    got = np.asarray(jax.jit(argmax)(x))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert list(got[[1, 3, 4]]) == [10, 998, 7]


def test_argmax_of_a_row_with_nan_is_a_valid_id():
    x = _logits().at[0, 5].set(jnp.nan).at[5, :].set(jnp.nan)
    got = np.asarray(jax.jit(argmax)(x))
    assert 0 <= got[0] < 1000 and got[5] == 0  # all NaN: no element equals the maximum
    np.testing.assert_array_equal(got[1:5], np.asarray(jnp.argmax(x[1:5], axis=-1)))


def test_greedy_token_and_logprob_equal_argmax_and_log_softmax():
    x = _logits()[:3]  # finite maxima (the +inf row has no finite logprob either way)
    tokens, lp, model_lp = jax.jit(sample, static_argnums=1)(x, SamplingParams(0.0), _keys(3))
    want = jnp.argmax(x, axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    ref = jax.nn.log_softmax(x, axis=-1)[jnp.arange(3), want]
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model_lp), np.asarray(lp))


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, 0.9, 50),
                                    SamplingParams(1.3, 0.5)])
def test_draws_equal_jax_random_categorical(params):
    x = jnp.concatenate([_logits()[:3], _logits()[:3] * 0.1])
    keys = _keys(6)
    tokens, lp, _ = jax.jit(sample, static_argnums=1)(x, params, keys)
    filtered = filter_logits(x, params)
    want = jax.vmap(jax.random.categorical)(keys, filtered)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(filtered[jnp.arange(6), want]),
                               atol=1e-6)
