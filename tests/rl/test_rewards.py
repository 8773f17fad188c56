"""Rewards against a plain-Python SQuAD-style reference."""

import re
import string
from collections import Counter

import numpy as np
from hypothesis import given, settings, strategies as st

from zsjax.rl.rewards import (exact_match_scores, f1_scores, score,
                              substring_match_scores)


def ref_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def ref_f1(pred, golds):
    if pred is None:
        return 0.0
    best = 0.0
    for g in golds:
        p, r = ref_normalize(pred).split(), ref_normalize(g).split()
        same = sum((Counter(p) & Counter(r)).values())
        if same:
            best = max(best, 2 * same / (len(p) + len(r)))
    return best


def ref_em(pred, golds):
    return float(pred is not None and any(ref_normalize(pred) == ref_normalize(g) for g in golds))


def ref_sub(pred, golds):
    return float(pred is not None and any(ref_normalize(g) in ref_normalize(pred) for g in golds))


def check(preds, golds):
    out = score(preds, golds)
    np.testing.assert_allclose(out["f1"], [ref_f1(p, g) for p, g in zip(preds, golds)],
                               rtol=1e-6)
    np.testing.assert_array_equal(out["em"], [ref_em(p, g) for p, g in zip(preds, golds)])
    np.testing.assert_array_equal(out["substring"], [ref_sub(p, g) for p, g in zip(preds, golds)])


WORDS = st.sampled_from(["the", "a", "an", "paris", "Paris", "city", "of", "lights", "x", "x,",
                         "!", "new-york", "New", "York", "", " ", "É", "über"])
TEXT = st.lists(WORDS, max_size=8).map(" ".join)


@given(st.lists(st.tuples(st.one_of(st.none(), TEXT), st.lists(TEXT, min_size=1, max_size=4)),
                min_size=1, max_size=12))
@settings(max_examples=150, deadline=None)
def test_matches_reference_on_random_strings(rows):
    check([p for p, _ in rows], [g for _, g in rows])


@given(st.lists(st.tuples(st.text(max_size=30), st.lists(st.text(max_size=12), min_size=1,
                                                          max_size=3)), min_size=1, max_size=6))
@settings(max_examples=100, deadline=None)
def test_matches_reference_on_arbitrary_unicode(rows):
    check([p for p, _ in rows], [g for _, g in rows])


def test_hand_written_cases():
    preds = ["The Eiffel Tower", "eiffel tower!", "tower tower tower", "", None,
             "Paris, France", "the the the", "Barack Obama", "new york city"]
    golds = [["Eiffel Tower"], ["the eiffel tower"], ["tower"], ["anything"], ["x"],
             ["France", "Paris"], [""], ["Obama", "Barack Hussein Obama"], ["York"]]
    out = score(preds, golds)
    np.testing.assert_allclose(out["f1"], [1, 1, 0.5, 0, 0, 2 / 3, 0, 0.8, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(out["em"], [1, 1, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(out["substring"], [1, 1, 1, 0, 0, 1, 1, 1, 1])
    check(preds, golds)


def test_named_wrappers_and_empty_batch():
    assert f1_scores(["x y"], [["y z"]])[0] == 0.5
    assert exact_match_scores(["Paris."], [["paris"]])[0] == 1.0
    assert substring_match_scores(["in paris now"], [["Paris"]])[0] == 1.0
    assert score([], [])["f1"].shape == (0,)


def test_thousands_of_rows_in_one_call():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "a"]
    preds = [" ".join(rng.choice(words, rng.integers(0, 6))) for _ in range(3000)]
    golds = [[" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(rng.integers(1, 4))]
             for _ in range(3000)]
    check(preds, golds)


def test_long_prediction_against_many_long_golden_answers():
    """A prediction over 1024 normalised characters against TriviaQA-sized golden lists (up to
    256 answers of up to 128 characters): more than 64M substring windows for one row, which
    once made the row chunking shift by -1."""
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    golds = [[" ".join(rng.choice(words, 18)) for _ in range(200)] for _ in range(3)]
    preds = [" ".join(rng.choice(words, 200)), golds[1][7] + " and " + "word " * 210, None]
    out = score(preds, golds)
    assert out["substring"][1] == 1.0
    check(preds, golds)
