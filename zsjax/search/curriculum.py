"""The easy-to-hard curriculum: how likely each search call is to get noisy documents."""

from __future__ import annotations

import numpy as np


def noise_probability(step: int, total_steps: int, start: float = 0.0, end: float = 0.5,
                      base: float = 4.0) -> float:
    """p(i) = start + (base**(i/m) - 1) / (base - 1) * (end - start); p = end once i >= m."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    if base <= 0 or base == 1:
        raise ValueError(f"base must be positive and not 1; got {base}")
    if step >= total_steps:
        return float(end)
    frac = max(step, 0) / total_steps
    return float(start + (base ** frac - 1) / (base - 1) * (end - start))


def draw_rng(seed: int, step: int, trajectory_id: int = 0) -> np.random.Generator:
    """The generator of one trajectory's useful/noisy draws in step `step`: reproducible from
    (seed, step, trajectory) alone, so a resumed run, or one whose batch is split over several
    processes, draws exactly what an uninterrupted single-process run would."""
    return np.random.default_rng([seed, step, 0x5EA2C4, trajectory_id])
