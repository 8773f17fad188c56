"""The search interface: a batch of requests in, one documents string per request out."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One search call. `question` and `golden_answers` are those of the trajectory that made it
    (the simulator's prompt needs them); `noisy` is the curriculum's draw for this call.

    `sample` tells identical requests apart: a sampling backend gives requests that differ only
    in it their own documents, and may generate the same (request, sample) once. The rollout
    numbers every search call by its trajectory and turn, so each call samples its own
    documents, as the reference's one-call-per-query simulator server does;
    `StepCache(share=True)` sets it to 0, so identical requests of a step share one."""

    query: str
    question: str
    golden_answers: tuple[str, ...]
    noisy: bool = False
    sample: int = 0


class SearchBackend(Protocol):
    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        """Documents for each request, in order (one string each, e.g. five `Doc i:` lines)."""


class FunctionBackend:
    """Wraps a plain function `request -> documents` (scripted backends in tests and demos)."""

    def __init__(self, fn: Callable[[SearchRequest], str]):
        self.fn = fn
        self.calls: list[list[SearchRequest]] = []

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        self.calls.append(list(requests))
        return [self.fn(r) for r in requests]


class StepCache:
    """Wraps a backend so that, within one training step, identical requests (query, question,
    first golden answer, which the simulator's prompt states, noisy, and `sample`) are
    generated once, across all turns. With `share=True`, or a backend that does not sample
    (its `samples` attribute missing or false), the requests' `sample` is set to 0 first:
    identical search calls of a step, say from rollouts of one question, then get the same
    documents (less simulator work; the reference's sampling simulator samples each call
    anew). Call `new_step(step)` between steps: it is passed on to the backend when it has a
    `new_step` (the in-process simulator seeds its sampling from the step, so a resumed run
    samples the same documents). `seconds` is the time spent in the backend this step."""

    def __init__(self, backend: SearchBackend, *, share: bool = False):
        self.backend, self.share = backend, share
        self._cache: dict[tuple, str] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0

    def new_step(self, step: int | None = None) -> None:
        self._cache.clear()
        self.hits = self.misses = 0
        self.seconds = 0.0
        if step is not None and hasattr(self.backend, "new_step"):
            self.backend.new_step(step)

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        # A backend with fixed results (a retriever, a greedy simulator: no `samples` attribute
        # or a false one) gives identical requests the same documents: generate them once.
        if self.share or not getattr(self.backend, "samples", False):
            requests = [dataclasses.replace(r, sample=0) for r in requests]
        keys = [(r.query, r.question, tuple(r.golden_answers[:1]), r.noisy, r.sample)
                for r in requests]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            first = {k: r for k, r in zip(keys, requests)}
            start = time.perf_counter()
            for k, docs in zip(todo, self.backend.search([first[k] for k in todo])):
                self._cache[k] = docs
            self.seconds += time.perf_counter() - start
        return [self._cache[k] for k in keys]


def noisy_fraction(trajectories) -> float | None:
    """The realised fraction of search calls that were noisy (None if nobody searched)."""
    flags = [n for t in trajectories for n in t.noisy]
    return sum(flags) / len(flags) if flags else None
