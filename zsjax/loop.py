"""The skeleton that `zsjax.train` and `zsjax.sft` share: resume from the latest checkpoint,
metrics in `metrics.jsonl` (and TensorBoard, and Weights & Biases: `zsjax.metrics`), a
checkpoint every N steps and at the end, and a stop on SIGTERM or Ctrl-C that checkpoints the
step in progress first.

    loop = TrainingLoop(workdir, steps=tc.steps, checkpoint_every=tc.checkpoint_every,
                        keep=tc.keep_checkpoints, resume=config.resume)
    state, meta = loop.restore(state)            # meta None: a fresh start at step 0
    with loop:
        for step in range(loop.start, loop.steps):
            state, record = one_step(state)
            loop.log(record)
            if loop.end_step(step, state, {"data_position": ...}):
                break                             # stopped on a signal, checkpointed
    # leaving the block: the last save is flushed; a stopped run raises `Stopped` here

Everything a step computes stays in the trainer; this holds only what every trainer repeats.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from zsjax.checkpointing import Checkpointer, IncompleteCheckpoint, StopOnSignal, truncate_jsonl
from zsjax.errors import InputError
from zsjax.metrics import JsonlWriter, WandbSettings, make_writers


class TrainingLoop:
    """`lead`: this process writes the metrics (process 0 of a multi-process run).
    `tensorboard`: also write every numeric metric to WORKDIR/tb; `wandb`: and to a Weights &
    Biases run (when its project is set), with `run_config` as its config. `logs`: JSONL files
    of the workdir with a "step" key per record, cut back to the resumed step (records after the
    checkpoint are written again). `on_stop`: called before `Stopped` is raised (a barrier, so
    every process has its part of the checkpoint on disk before any exits)."""

    def __init__(self, workdir: str, *, steps: int, checkpoint_every: int, keep: int,
                 resume: bool, lead: bool = True, tensorboard: bool = False,
                 wandb: WandbSettings | None = None, run_config: dict | None = None,
                 logs: Sequence[str] = ("metrics.jsonl",),
                 on_stop: Callable[[], None] | None = None):
        self.workdir, self.steps, self.resume = workdir, steps, resume
        self.checkpoint_every, self.lead, self.on_stop = checkpoint_every, lead, on_stop
        self.logs = tuple(logs)
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep)
        self.ckpt.check_resume(resume, workdir)
        self.start = 0
        self.stopped_at: int | None = None
        self._tensorboard, self._wandb, self._run_config = tensorboard, wandb, run_config
        self._writers: list = []
        self._stop = StopOnSignal()

    # --- Before the loop ----------------------------------------------------------------------
    def restore(self, target: Any) -> tuple[Any, dict | None]:
        """(target restored from the latest checkpoint, its meta), or (target, None) when
        there is none or `resume` is off. Sets `start`, and cuts the logs back to it."""
        meta = None
        if self.resume and self.ckpt.latest_step() is not None:
            try:
                target, meta = self.ckpt.restore(target)
            except IncompleteCheckpoint as e:
                raise InputError(str(e)) from None
            self.start = meta["step"]
        for name in self.logs:
            truncate_jsonl(os.path.join(self.workdir, name), self.start)
        return target, meta

    def __enter__(self) -> "TrainingLoop":
        if self.lead:
            self._writers = make_writers(self.workdir, start=self.start,
                                         tensorboard=self._tensorboard, wandb=self._wandb,
                                         run_config=self._run_config)
        self._stop.__enter__()
        return self

    # --- Each step ----------------------------------------------------------------------------
    def log(self, record: dict, name: str = "metrics.jsonl") -> None:
        """Appends `record` (with its "step") to WORKDIR/`name`; the metrics file's records go
        to every metrics writer (JSONL, TensorBoard, W&B). Process 0 only."""
        if not self.lead:
            return
        if name != "metrics.jsonl":
            JsonlWriter(os.path.join(self.workdir, name)).write(record)
            return
        for writer in self._writers:
            writer.write(record)

    def end_step(self, step: int, state: Any, meta: dict) -> bool:
        """After step `step` (0-based) is done and logged: checkpoints it when it is due, the
        last, or a signal asked the run to stop (then returns True: leave the loop)."""
        done = step + 1
        stopping = done < self.steps and self._stop.requested()  # a collective
        if (stopping or (self.checkpoint_every and done % self.checkpoint_every == 0)
                or done == self.steps):
            self.ckpt.save(done, state, {**meta, "step": done})
        if stopping:
            self.stopped_at = done
        return stopping

    # --- After the loop -----------------------------------------------------------------------
    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.ckpt.wait()  # the last save, with the signals still caught
        finally:
            self._stop.__exit__(exc_type, *exc)
            self.ckpt.close()
            for writer in self._writers:
                writer.close()
        if exc_type is None and self.stopped_at is not None:
            if self.on_stop is not None:
                self.on_stop()
            raise self._stop.stopped(f"checkpointed step {self.stopped_at} of {self.steps} in "
                                     f"{self.workdir}; the same command resumes from it")
