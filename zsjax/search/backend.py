"""The search interface: a batch of requests in, one documents string per request out."""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One search call. `question` and `golden_answers` are those of the trajectory that made it
    (the simulator's prompt needs them); `noisy` is the curriculum's draw for this call."""

    query: str
    question: str
    golden_answers: tuple[str, ...]
    noisy: bool = False


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
