"""The errors zsjax reports to a user, shared by the library and the command lines."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input found before any compute (a missing model folder, an impossible mesh, ...).
    The config programs print its message as one line and exit with status 2."""


class Stopped(RuntimeError):
    """A run stopped early on request (SIGTERM, or SIGINT from Ctrl-C) after checkpointing its
    last finished step. The config programs print its message as one line and exit with status
    `code`: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as if the signal had
    ended them, so that schedulers see an unfinished run."""

    def __init__(self, message: str, code: int = 143):
        super().__init__(message)
        self.code = code


def check_workdir(workdir: str) -> None:
    """A workdir is a folder, existing or not (an InputError otherwise)."""
    if not workdir or (os.path.exists(workdir) and not os.path.isdir(workdir)):
        raise InputError(f"workdir {workdir!r} must be a folder (it is created if missing)")
