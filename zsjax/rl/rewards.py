"""Rewards by name (`rl.reward`): F1 (the paper's), exact match and substring match of the
policy's answer against the golden answers, after SQuAD-style normalisation, scored on device.

A reward is a function (predictions: list[str | None], golden_answers: list[list[str]]) ->
[N] float array; None is a trajectory that never answered. Add one with `register_reward`:

    from zsjax.rl import rewards
    rewards.register_reward("length_penalised_f1",
                            lambda p, g: rewards.f1_scores(p, g) - 0.01 * ...)

The answer itself is read by `zsjax.search.actions.extract_answer`.
"""

from __future__ import annotations

import re
import string
from typing import Callable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# --- Scores on device -----------------------------------------------------------------------
# The host normalises strings and turns them into padded integer ids (words for F1 and exact
# match, characters for substring match, since `gold in pred` is a string test); one jitted
# function scores the whole batch against every golden answer and takes the max.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _bucket(n: int) -> int:
    return max(1, 1 << (max(n, 1) - 1).bit_length())


@jax.jit
def _score_ids(pred_w, gold_w, pred_c, gold_c, has_pred, gold_valid):
    """pred_w [N, W], gold_w [N, G, W] word ids (0 = pad); pred_c [N, C], gold_c [N, G, D] char
    ids (0 = pad); has_pred [N]; gold_valid [N, G]. Returns f1, em, substring: [N] float32."""
    p_real = pred_w > 0  # [N, P]
    g_real = gold_w > 0  # [N, G, Q]
    # Multiset overlap: pred token i counts iff fewer equal tokens precede it in the prediction
    # than its word occurs in the golden answer.
    same_pred = (pred_w[:, :, None] == pred_w[:, None, :]) & p_real[:, None, :]  # [N, P, P]
    before = jnp.tril(jnp.ones(same_pred.shape[-2:], bool), k=-1)
    rank = (same_pred & before).sum(-1)  # [N, P]
    gold_count = ((pred_w[:, None, :, None] == gold_w[:, :, None, :])
                  & g_real[:, :, None, :]).sum(-1)  # [N, G, P]
    overlap = ((rank[:, None, :] < gold_count) & p_real[:, None, :]).sum(-1)  # [N, G]
    pn = p_real.sum(-1)[:, None]
    rn = g_real.sum(-1)
    f1 = jnp.where(overlap > 0, 2.0 * overlap / jnp.maximum(pn + rn, 1), 0.0)
    # pred and gold share one padded width, and ids are >= 1, so row equality is list equality.
    em = jnp.all(pred_w[:, None, :] == gold_w, axis=-1)
    # Substring: gold occurs in pred starting at some offset o (characters, padded with 0).
    c, d = pred_c.shape[-1], gold_c.shape[-1]
    padded = jnp.pad(pred_c, ((0, 0), (0, d)))  # room for offsets near the end
    offsets = jnp.arange(c + 1)[:, None] + jnp.arange(d)[None, :]  # [C+1, D]
    windows = padded[:, offsets]  # [N, C+1, D]
    g_chars = gold_c > 0  # [N, G, D]
    match = (windows[:, None] == gold_c[:, :, None]) | ~g_chars[:, :, None]  # [N, G, C+1, D]
    fits = (jnp.arange(c + 1)[None, None, :] + g_chars.sum(-1)[..., None]
            <= (pred_c > 0).sum(-1)[:, None, None])
    sub = jnp.any(jnp.all(match, -1) & fits, -1)  # [N, G]
    ok = gold_valid & has_pred[:, None]
    best = lambda x: jnp.max(jnp.where(ok, x.astype(jnp.float32), 0.0), axis=-1)  # noqa: E731
    return best(f1), best(em), best(sub)


def score(predictions, golden_answers) -> dict[str, np.ndarray]:
    """F1, exact match and substring match ([N] float32 each), max over golden answers.

    `predictions` is a list of `str | None` (None = no answer: all scores 0); `golden_answers` a
    list of lists of strings. Exact match is strict equality after normalisation; substring match
    is `normalize(gold) in normalize(pred)`, which the reference reports as "EM".
    """
    n = len(predictions)
    if n != len(golden_answers):
        raise ValueError(f"{n} predictions but {len(golden_answers)} golden-answer lists")
    if n == 0:
        empty = np.zeros(0, np.float32)
        return {"f1": empty, "em": empty, "substring": empty}
    vocab: dict[str, int] = {}
    word_ids = lambda s: [vocab.setdefault(w, len(vocab) + 1) for w in s.split()]  # noqa: E731
    preds = [None if p is None else normalize_answer(p) for p in predictions]
    golds = [[normalize_answer(g) for g in gs] for gs in golden_answers]
    pw = [word_ids(p) if p is not None else [] for p in preds]
    gw = [[word_ids(g) for g in gs] for gs in golds]
    # Characters as codepoints + 1 (0 is padding).
    pc = [[ord(ch) + 1 for ch in p] if p is not None else [] for p in preds]
    gc = [[[ord(ch) + 1 for ch in g] for g in gs] for gs in golds]
    g = _bucket(max((len(x) for x in gw), default=1))
    w = _bucket(max([len(x) for x in pw] + [len(x) for gs in gw for x in gs] + [1]))
    c = _bucket(max((len(x) for x in pc), default=1))
    d = _bucket(max((len(x) for gs in gc for x in gs), default=1))
    # Rows per call, a power of two, so the [rows, G, C, D] substring windows stay near 64M
    # elements (one row a call when a single row exceeds that).
    fits = (1 << 26) // (g * (c + 1) * d)
    chunk = min(_bucket(n), 1 << (fits.bit_length() - 1) if fits else 1)
    out = {"f1": [], "em": [], "substring": []}
    for lo in range(0, n, chunk):
        rows = range(lo, min(n, lo + chunk))
        pred_w = np.zeros((chunk, w), np.int32)
        gold_w = np.zeros((chunk, g, w), np.int32)
        pred_c = np.zeros((chunk, c), np.int32)
        gold_c = np.zeros((chunk, g, d), np.int32)
        has_pred = np.zeros(chunk, bool)
        gold_valid = np.zeros((chunk, g), bool)
        for r, i in enumerate(rows):
            has_pred[r] = preds[i] is not None
            pred_w[r, :len(pw[i])] = pw[i]
            pred_c[r, :len(pc[i])] = pc[i]
            for j, (ws, ch) in enumerate(zip(gw[i], gc[i])):
                gold_w[r, j, :len(ws)] = ws
                gold_c[r, j, :len(ch)] = ch
                gold_valid[r, j] = True
        scores = jax.device_get(_score_ids(pred_w, gold_w, pred_c, gold_c, has_pred, gold_valid))
        for key, value in zip(("f1", "em", "substring"), scores):
            out[key].append(value[:len(rows)])
    return {k: np.concatenate(v) for k, v in out.items()}


def f1_scores(predictions, golden_answers) -> np.ndarray:
    """Token F1 after SQuAD normalisation, max over golden answers (the training reward)."""
    return score(predictions, golden_answers)["f1"]


def exact_match_scores(predictions, golden_answers) -> np.ndarray:
    """1.0 where the normalised prediction equals a normalised golden answer."""
    return score(predictions, golden_answers)["em"]


def substring_match_scores(predictions, golden_answers) -> np.ndarray:
    """1.0 where a normalised golden answer is a substring of the normalised prediction (the
    reference's "EM")."""
    return score(predictions, golden_answers)["substring"]


RewardFn = Callable[[list, list], np.ndarray]
REWARDS: dict[str, RewardFn] = {"f1": f1_scores, "em": exact_match_scores,
                                "substring": substring_match_scores}


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    """Adds (or replaces) a reward under `name`, selectable as `rl.reward=name`."""
    if not callable(fn):
        raise TypeError(f"register_reward({name!r}, ...) takes a function; got "
                        f"{type(fn).__name__}")
    REWARDS[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"rl.reward={name!r} is not available; choose one of "
                         f"{tuple(REWARDS)}") from None
