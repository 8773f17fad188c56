"""Where a training loop's step metrics go: one writer interface, with JSONL, TensorBoard and
Weights & Biases behind it. `zsjax.loop.TrainingLoop` writes every step's record to each.

    writers = make_writers(workdir, start=0, tensorboard=True,
                           wandb=WandbSettings(project="zerosearch"), run_config=config.to_dict())

A writer takes records, each a dict with its "step"; `close` flushes it. A new destination is a
class with `write(record)` and `close()`.

Weights & Biases (`train.wandb.project` set): the run's id is kept in WORKDIR/wandb_run.json,
so a resumed run continues the same W&B run. Steps a resumed run repeats (those after its
checkpoint, before the crash) were logged already; they are skipped (on a CPU the repeat
computes the same numbers, and W&B refuses steps below its latest one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Protocol

WANDB_MODES = ("", "online", "offline", "disabled")
WANDB_STATE = "wandb_run.json"


class MetricsWriter(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def numbers(record: dict) -> dict[str, float]:
    """The finite numeric values of a record, without its "step" (booleans and None left out)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            and math.isfinite(v)}


class JsonlWriter:
    """One JSON object a line, appended (the file survives crashes line by line)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Every finite number of a record as a scalar at its step, in DIR (event files). Events
    after `start` from an earlier, interrupted run are purged."""

    def __init__(self, directory: str, start: int = 0):
        from tensorboardX import SummaryWriter  # heavy: only when TensorBoard is on
        self._writer = SummaryWriter(directory, purge_step=start + 1)

    def write(self, record: dict) -> None:
        for key, value in numbers(record).items():
            self._writer.add_scalar(key, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """`train.wandb` in the configs. Off while `project` is empty."""

    project: str = ""
    entity: str = ""
    name: str = ""  # the run's display name; W&B picks one when empty
    # "online", "offline" (a local run, `wandb sync` later), "disabled", or "": $WANDB_MODE if
    # set, else online
    mode: str = ""

    @classmethod
    def from_config(cls, c) -> "WandbSettings":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})

    @property
    def enabled(self) -> bool:
        return bool(self.project)

    def check(self, where: str) -> None:
        """Raises ValueError for a bad mode, or when W&B is on but not installed (before any
        compute)."""
        if self.mode not in WANDB_MODES:
            raise ValueError(f"{where}.mode={self.mode!r}; expected one of {WANDB_MODES}")
        if self.enabled:
            try:
                import wandb  # noqa: F401  (optional: installed only for W&B)
            except ImportError:
                raise ValueError(f"{where}.project is set but the wandb package is not "
                                 "installed: pip install wandb") from None


class WandbWriter:
    """A W&B run for the workdir: created on the first start, continued on resumes."""

    def __init__(self, workdir: str, settings: WandbSettings, run_config: dict):
        import wandb  # optional: only when train.wandb.project is set
        self._state_path = os.path.join(workdir, WANDB_STATE)
        state = {}
        if os.path.exists(self._state_path):
            with open(self._state_path) as f:
                state = json.load(f)
        self._logged = int(state.get("logged_through", 0))
        # The first start lets W&B pick the run's id; resumes name it.
        resume = {"id": state["id"], "resume": "allow"} if state.get("id") else {}
        self._run = wandb.init(project=settings.project, entity=settings.entity or None,
                               name=settings.name or None,
                               mode=settings.mode or os.environ.get("WANDB_MODE") or None,
                               dir=workdir,
                               config=run_config, **resume)
        self._save({"id": self._run.id, "logged_through": self._logged})

    def _save(self, state: dict) -> None:
        tmp = self._state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._state_path)

    @property
    def run_id(self) -> str:
        return self._run.id

    def write(self, record: dict) -> None:
        step = record["step"]
        if step <= self._logged:  # repeated after a resume: logged before the crash
            return
        self._run.log(numbers(record), step=step)
        self._logged = step
        self._save({"id": self._run.id, "logged_through": step})

    def close(self) -> None:
        self._run.finish()


def make_writers(workdir: str, *, start: int = 0, tensorboard: bool = False,
                 wandb: WandbSettings | None = None, run_config: dict | None = None
                 ) -> list[MetricsWriter]:
    """The writers of WORKDIR/metrics.jsonl, WORKDIR/tb (when `tensorboard`) and W&B (when
    `wandb.project` is set), for a run starting after step `start`."""
    writers: list[MetricsWriter] = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    if tensorboard:
        writers.append(TensorBoardWriter(os.path.join(workdir, "tb"), start))
    if wandb is not None and wandb.enabled:
        writers.append(WandbWriter(workdir, wandb, run_config or {}))
    return writers
