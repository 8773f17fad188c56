"""Early signs of a collapsing RL run, as one-line warnings.

Users of the reference meet sudden reward collapses in GRPO that no metric foretold. Two of the
step metrics move first: the rate of format-valid answers (the policy stops closing `<answer>`)
and the policy's entropy (it stops exploring). `CollapseMonitor` follows each against its own
recent history and warns once when it falls sharply: below a fraction of its running mean (an
exponential mean over about the last 10 steps, so a slow decline, which RL normally shows, is
followed and not warned about). It warns again only after the metric has recovered.
"""

from __future__ import annotations

import dataclasses
import math

# What a user can do about it (the ZeroSearch authors recommend REINFORCE when GRPO collapses).
ADVICE = ("a sign of collapse: lower rl.lr, raise rl.kl_coef or rl.entropy_coef, or try "
          "rl.algorithm=reinforce_pp with rl.kl_placement=loss")


@dataclasses.dataclass
class Watch:
    """One metric: warn when it falls below (1 - drop) x its running mean."""

    key: str  # the metrics.jsonl key
    label: str
    drop: float  # the relative fall that warns, e.g. 0.3: below 70% of the running mean
    floor: float = 0.0  # no warning while the running mean is below this (nothing to lose)
    alpha: float = 0.2  # weight of the newest step in the running mean (about 1/alpha steps)
    warmup: int = 3  # steps observed before any warning
    mean: float | None = None
    seen: int = 0
    warned: bool = False

    def observe(self, value) -> str | None:
        """Takes one step's value; returns the warning's text when it fell sharply."""
        if value is None or not math.isfinite(value):
            return None
        message = None
        if self.mean is not None and self.seen >= self.warmup and self.mean >= self.floor:
            fell = value < (1 - self.drop) * self.mean
            if fell and not self.warned:
                message = (f"{self.label} fell to {value:.3g} from {self.mean:.3g} (its running "
                           "mean)")
                self.warned = True
            elif not fell and value >= (1 - self.drop / 2) * self.mean:
                self.warned = False  # recovered: warn again on the next fall
        self.mean = (value if self.mean is None
                     else (1 - self.alpha) * self.mean + self.alpha * value)
        self.seen += 1
        return message


def default_watches() -> list[Watch]:
    return [Watch("format_valid_rate", "format-valid answer rate", drop=0.3, floor=0.2),
            Watch("valid_answer_rate", "valid-answer rate", drop=0.3, floor=0.2),
            Watch("entropy", "policy entropy", drop=0.5, floor=1e-3)]


class CollapseMonitor:
    """Follows a run's step records (metrics.jsonl lines); `observe` returns the step's warning
    line, or None."""

    def __init__(self, watches: list[Watch] | None = None):
        self.watches = default_watches() if watches is None else watches

    def observe(self, record: dict) -> str | None:
        falls = [m for w in self.watches if (m := w.observe(record.get(w.key))) is not None]
        if not falls:
            return None
        return f"warning: step {record['step']}: {'; '.join(falls)}: {ADVICE}"
