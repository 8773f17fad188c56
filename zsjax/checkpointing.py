"""Orbax checkpoints of a training state plus a small JSON record (data position, RNG, ...).

Saves are asynchronous; the last `keep` steps are kept; restoring places every array on the
sharding of the abstract state it is given, so a run resumes onto its own mesh.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from zsjax.errors import InputError, Stopped


class IncompleteCheckpoint(ValueError):
    """A step folder that lost one of its items (copied or synced in part)."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def save(self, step: int, state: Any, meta: dict) -> None:
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if not saved:  # orbax skips, without a word, a step at or below the latest on disk
            raise RuntimeError(f"checkpoint step {step} was not saved: {self.directory} "
                               f"already holds step {self.latest_step()}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def check_resume(self, resume: bool, workdir: str) -> None:
        """Checkpoints already here need `resume` (a fresh run would have every save at or
        below their latest step skipped by orbax); an InputError otherwise."""
        if self.latest_step() is not None and not resume:
            raise InputError(f"{workdir} already holds checkpoints (up to step "
                             f"{self.latest_step()}); set --config.resume=True to continue the "
                             "run, or pick a new workdir")

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """(state, meta) of `step` (default: the latest), or None when there is no checkpoint.
        `abstract_state` is a tree of arrays or ShapeDtypeStructs carrying the target shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding",
                                                                              None)),
            abstract_state)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except KeyError as e:  # a step folder that lost an item (copied or synced in part)
            raise self._incomplete(step, e) from None
        return out.state, out.meta

    def _incomplete(self, step: int, e: KeyError) -> "IncompleteCheckpoint":
        return IncompleteCheckpoint(f"checkpoint {os.path.join(self.directory, str(step))} is "
                                    f"incomplete ({e}); remove that folder to resume from the "
                                    "one before")

    def restore_meta(self, step: int | None = None) -> dict | None:
        """The JSON record of `step` (default: the latest), without reading any array."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except KeyError as e:
            raise self._incomplete(step, e) from None

    def restore_raw(self, step: int | None = None) -> dict | None:
        """{"state": the saved tree as nested dicts / lists of NumPy arrays, "meta": ...} with
        no target structure needed (evaluation, inspection)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = os.path.join(self.directory, str(step), "state")
        meta = os.path.join(self.directory, str(step), "meta")
        with ocp.PyTreeCheckpointer() as reader:
            metadata = reader.metadata(path)
            tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        return {"state": state, "meta": self.restore_meta(step) if os.path.exists(meta) else None}

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops the records of a JSONL log whose "step" is after `last_step`: written after the
    checkpoint a run resumes from, they would be written again. A line cut by a crash ends it."""
    if not os.path.exists(path):
        return
    tmp = path + ".tmp"
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            try:
                if json.loads(line)["step"] <= last_step:
                    dst.write(line)
            except (ValueError, KeyError):
                break  # a line cut by a crash ends the file
    os.replace(tmp, path)


class WorkdirLock:
    """An exclusive lock on `WORKDIR/.lock` while entered, taken by process 0 of a run (the
    other processes belong to the same run). A workdir another run holds is an InputError.
    The operating system releases the lock when its process ends, however it ends."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        if jax.process_index() != 0:
            return self
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no locks on this file system
                print(f"[zsjax] cannot lock {self.path} ({e.strerror}); running without the "
                      "one-run-per-workdir check", file=sys.stderr)
                return self
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise InputError(f"another run ({holder}) is using {os.path.dirname(self.path)}; "
                             "wait for it to finish or pick another workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


class StopOnSignal:
    """While entered, SIGTERM (a preemption notice, `scancel`, `kill`) and SIGINT (Ctrl-C) are
    recorded rather than fatal, for a training loop to checkpoint its current step and stop
    (`requested`). A second signal ends the process at once. Installed only from the main
    thread (signal handlers cannot be set elsewhere); from another thread this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise SystemExit(128 + signum)
        self.signum = signum

    def stopped(self, message: str):
        """The `cli.Stopped` to raise once the step is checkpointed: named after this
        process's signal (SIGTERM when another process of the run got it), exit status
        128 + its number."""
        signum = self.signum or signal.SIGTERM
        return Stopped(f"{signal.Signals(signum).name}: {message}", code=128 + signum)

    def requested(self) -> bool:
        """Whether any process of the run received SIGTERM. A collective in a multi-process
        run: every process calls it at the same point of each step."""
        if jax.process_count() == 1:
            return self.received
        return bool(np.any(multihost_utils.process_allgather(np.array([self.received]))))
