"""Collapse warnings and the format-valid rate, against plain-Python definitions."""

import numpy as np

from zsjax.rl import batch as B
from zsjax.rl.health import ADVICE, CollapseMonitor, Watch
from zsjax.search.rollout import Segment, Trajectory


def _reference_warnings(values, drop, floor=0.0, alpha=0.2, warmup=3):
    """The rule written out as a loop: warn when a value is below (1 - drop) x the exponential
    running mean of the values before it, once per fall (re-armed at (1 - drop / 2) x mean)."""
    mean, armed, out = None, True, []
    for i, v in enumerate(values):
        if mean is not None and i >= warmup and mean >= floor:
            if v < (1 - drop) * mean:
                if armed:
                    out.append(i)
                armed = False
            elif v >= (1 - drop / 2) * mean:
                armed = True
        mean = v if mean is None else (1 - alpha) * mean + alpha * v
    return out


def _watch(values, **kw):
    w = Watch("x", "x", **kw)
    return [i for i, v in enumerate(values) if w.observe(v) is not None]


def test_watch_matches_the_rule_on_random_series():
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = np.cumprod(1 + rng.normal(0, 0.25, size=40)).clip(0, None).tolist()
        for drop in (0.3, 0.5):
            assert _watch(values, drop=drop) == _reference_warnings(values, drop)


def test_a_sharp_fall_warns_once_and_a_slow_decline_never():
    slow = [1.0 * 0.97 ** i for i in range(100)]  # entropy decaying as RL normally makes it
    assert _watch(slow, drop=0.5) == []
    sharp = [0.9] * 10 + [0.2] * 5 + [0.9] * 10 + [0.1]
    assert _watch(sharp, drop=0.3) == [10, 25]  # once per fall, again after recovering
    assert _watch([0.05] * 5 + [0.0] * 5, drop=0.3, floor=0.2) == []  # nothing to lose
    assert _watch([1.0, None, float("nan"), 1.0, 1.0, 0.1], drop=0.5) == [5]


def test_monitor_names_every_metric_that_fell_in_one_line():
    mon = CollapseMonitor()
    healthy = {"format_valid_rate": 0.95, "valid_answer_rate": 0.97, "entropy": 0.6}
    for step in range(1, 11):
        assert mon.observe({"step": step, **healthy}) is None
    line = mon.observe({"step": 11, "format_valid_rate": 0.3, "valid_answer_rate": 0.97,
                        "entropy": 0.1})
    assert line.startswith("warning: step 11: format-valid answer rate fell to 0.3 from 0.95")
    assert "policy entropy fell to 0.1" in line and "valid-answer rate fell" not in line
    assert line.endswith(ADVICE) and "\n" not in line
    assert mon.observe({"step": 12, "format_valid_rate": 0.3, "entropy": None}) is None


def _traj(answer, kinds):
    t = Trajectory("q", ("a",), [1])
    t.answer, t.segments = answer, [Segment(k, "") for k in kinds]
    return t


def test_format_valid_rate_counts_answers_after_only_well_formed_turns():
    trajs = [_traj("x", ["policy", "information", "policy"]),  # valid
             _traj("x", ["policy", "invalid", "policy"]),  # answered after an invalid turn
             _traj(None, ["policy", "information"]),  # never answered
             _traj("y", ["policy"])]  # valid
    stats = B.by_name(B.trajectory_stats(trajs, np.zeros(4), {k: np.zeros(4) for k in
                                                               ("f1", "em", "substring")}))
    metrics = B.rollout_metrics(stats)
    assert metrics["format_valid_rate"] == 0.5 and metrics["valid_answer_rate"] == 0.75
