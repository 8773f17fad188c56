"""A training step's batch on the host: trajectories -> padded arrays, and their per-trajectory
statistics by name (for the metrics)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# Per-trajectory statistics, the columns of `trajectory_stats` (gathered over processes as one
# float64 array, then read back by name with `by_name`).
STATS = ("reward", "f1", "em", "substring", "response_tokens", "searches", "answered",
         "format_valid", "noisy_calls", "search_calls", "tokens")


def padded_width(trajs, length_multiple: int) -> int:
    """The longest trajectory, rounded up to a multiple of `length_multiple`."""
    return -(-max(len(t.token_ids) for t in trajs) // length_multiple) * length_multiple


def pad_batch(trajs, length_multiple: int = 64, width: int = 0):
    """Right-padded tokens, attention and loss masks, and the sampler's model logprobs (0 off
    the policy's tokens); `width` (if larger) overrides the batch's own padded length (every
    process pads to the global one)."""
    width = max(width, padded_width(trajs, length_multiple))
    b = len(trajs)
    tokens = np.zeros((b, width), np.int32)
    attn = np.zeros((b, width), bool)
    mask = np.zeros((b, width), np.float32)
    logprobs = np.zeros((b, width), np.float32)
    for i, t in enumerate(trajs):
        n = len(t.token_ids)
        tokens[i, :n], attn[i, :n], mask[i, :n] = t.token_ids, True, t.loss_mask
        logprobs[i, :n] = t.model_logprobs
    return tokens, attn, mask, logprobs


def trajectory_stats(trajs: Sequence, reward, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """[N, len(STATS)] float64: each trajectory's reward, scores and counts."""
    rows = [[reward[i], scores["f1"][i], scores["em"][i], scores["substring"][i],
             len(t.response_ids), t.num_searches, t.answer is not None, format_valid(t),
             sum(t.noisy), len(t.noisy), len(t.token_ids)] for i, t in enumerate(trajs)]
    return np.array(rows, np.float64).reshape(len(trajs), len(STATS))


def format_valid(t) -> bool:
    """The trajectory answered, and every turn before was a well-formed action (no
    invalid-action reply)."""
    return t.answer is not None and not any(s.kind == "invalid" for s in t.segments)


def by_name(stats: np.ndarray) -> dict[str, np.ndarray]:
    return {name: stats[:, i] for i, name in enumerate(STATS)}


def rollout_metrics(stats: Mapping[str, np.ndarray]) -> dict:
    """The step's rollout metrics from every trajectory's statistics (`by_name`)."""
    calls = stats["search_calls"].sum()
    return {
        "reward_mean": float(stats["reward"].mean()), "reward_std": float(stats["reward"].std()),
        "f1_mean": float(stats["f1"].mean()), "em_mean": float(stats["em"].mean()),
        "substring_mean": float(stats["substring"].mean()),
        "noisy_fraction": float(stats["noisy_calls"].sum() / calls) if calls else None,
        "response_tokens_mean": float(stats["response_tokens"].mean()),
        "searches_mean": float(stats["searches"].mean()),
        "valid_answer_rate": float(stats["answered"].mean()),
        "format_valid_rate": float(stats["format_valid"].mean())}
