"""The curriculum formula against a plain transcription of the paper's definition."""

import math

import numpy as np
import pytest

from zsjax.search.curriculum import draw_rng, noise_probability


@pytest.mark.parametrize("start,end,base", [(0.0, 0.5, 4.0), (0.1, 0.9, 2.0), (0.5, 0.0, 10.0)])
def test_noise_probability_formula(start, end, base):
    m = 200
    for i in range(0, 260, 7):
        expect = end if i >= m else start + (math.pow(base, i / m) - 1) / (base - 1) * (end - start)
        assert noise_probability(i, m, start, end, base) == pytest.approx(expect, abs=1e-12)
    assert noise_probability(0, m) == 0.0 and noise_probability(m, m) == 0.5
    # easy to hard: monotone for the default schedule, and slow at first (convex)
    ps = [noise_probability(i, m) for i in range(m + 1)]
    assert all(a <= b for a, b in zip(ps, ps[1:])) and ps[m // 2] < 0.25


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        noise_probability(1, 0)
    with pytest.raises(ValueError, match="base"):
        noise_probability(1, 10, base=1.0)


def test_draws_reproducible_per_seed_and_step():
    a = draw_rng(3, 17).random(100)
    np.testing.assert_array_equal(a, draw_rng(3, 17).random(100))
    assert not np.array_equal(a, draw_rng(3, 18).random(100))
    assert not np.array_equal(a, draw_rng(4, 17).random(100))


def test_noisy_rate_matches_p_within_a_binomial_bound():
    for p in (0.1, 0.37, 0.5):
        n = 20000
        rate = (draw_rng(0, 3).random(n) < p).mean()
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n)
