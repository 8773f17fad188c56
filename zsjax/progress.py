"""Progress of long work on stderr: a tqdm bar in a terminal, and in a log file (stderr not a
terminal) a plain line at most every `every` seconds and at the end, since tqdm's carriage
returns would pile up there into one line thousands of characters long."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, *, initial: int = 0, disable: bool = False,
        every: float = 30.0):
    """A progress object with tqdm's `update`, `set_postfix`, `close` and context manager."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    file=sys.stderr, disable=disable)
    return LineProgress(total, desc, unit, initial=initial, every=every)


class LineProgress:
    """`desc: n/total unit (p%), t s, postfix` lines, at most one every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0,
                 every: float = 30.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.postfix = every, ""
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every or self.n >= self.total:
            self._last = now
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self, now: float) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, "
              f"{now - self._start:.0f} s{post}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
