"""Search backends by name: `backend.kind` in the training and evaluation configs, the flags of
`zsjax.infer`. One registry; every program builds its backend through `make_backend`.

| kind            | what                                                   | settings          |
|-----------------|--------------------------------------------------------|-------------------|
| `simulator`     | an LLM simulator in this JAX program (the default)     | the caller's      |
| `simulator_url` | a simulator behind an OpenAI-compatible server         | url, model        |
| `retriever_url` | a real engine speaking the Search-R1 retriever API     | url, top_k        |
| `bm25`          | BM25 over a local JSONL corpus (`zsjax.search.bm25`)    | corpus, top_k     |

The in-process simulator needs model weights, which each program loads its own way (its mesh,
its dtype, maybe the policy's own folder), so the caller passes it as `simulator`, a function
that builds it. A new engine is one `register_backend` call (the demo registers its world's
engine this way):

    from zsjax.search import FunctionBackend, factory
    factory.register_backend("my_engine", lambda s: FunctionBackend(
        lambda request: my_engine(request.query, k=s.top_k)))

and then `--config.backend.kind=my_engine`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from zsjax.search.backend import SearchBackend
from zsjax.search.bm25 import BM25Backend, read_corpus
from zsjax.search.http_backends import OpenAISimulatorBackend, RetrieverBackend


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """What a backend's builder and check get: the config's `backend` group, the simulator
    settings (for a simulator server), and `simulator`, a function that builds the in-process
    simulator (None where the program has none)."""
    url: str = ""
    model: str = ""
    corpus: str = ""
    top_k: int = 3
    cache_dir: Optional[str] = None
    style: str = "finetuned"
    temperature: float = 0.0
    max_new_tokens: int = 600
    top_k_docs: int = 5
    simulator: Optional[Callable[[], SearchBackend]] = None


@dataclasses.dataclass(frozen=True)
class _Kind:
    build: Callable[[BackendSettings], SearchBackend]
    check: Optional[Callable[[BackendSettings, str], None]]


_KINDS: dict[str, _Kind] = {}


def register_backend(kind: str, build: Callable[[BackendSettings], SearchBackend], *,
                     check: Callable[[BackendSettings, str], None] | None = None) -> None:
    """Adds (or replaces) the backend `kind`. `build(settings)` returns it; `check(settings,
    where)`, run before any model loads, raises ValueError for settings that cannot work
    (`where` names the config group in the message)."""
    _KINDS[kind] = _Kind(build, check)


def kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def check_backend(kind: str, *, where: str = "config.backend", **settings) -> None:
    """Raises ValueError (FileNotFoundError for a missing corpus) for settings that cannot
    work, before anything is loaded; reads a BM25 corpus through (its errors name the line)."""
    if kind not in _KINDS:
        raise ValueError(f"{where}.kind={kind!r} is unknown; choose one of {kinds()}")
    check = _KINDS[kind].check
    if check is not None:
        check(BackendSettings(**settings), where)


def make_backend(kind: str, **settings) -> SearchBackend:
    """The backend `kind` built with `settings` (the fields of `BackendSettings`), after
    `check_backend`."""
    check_backend(kind, **settings)
    return _KINDS[kind].build(BackendSettings(**settings))


# --- The built-in kinds ----------------------------------------------------------------------

def _in_process(s: BackendSettings) -> SearchBackend:
    if s.simulator is None:
        raise ValueError("kind='simulator' runs a simulator model in-process; this "
                         "program has none to give (choose another backend kind)")
    return s.simulator()


def _needs_url(s: BackendSettings, where: str, kind: str) -> None:
    if not s.url:
        raise ValueError(f"{where}.kind={kind!r} needs {where}.url (e.g. http://127.0.0.1:8000)")


def _needs_top_k(s: BackendSettings, where: str) -> None:
    if not isinstance(s.top_k, int) or s.top_k < 1:
        raise ValueError(f"{where}.top_k must be an integer >= 1; got {s.top_k!r}")


def _simulator_url(s: BackendSettings) -> SearchBackend:
    return OpenAISimulatorBackend(s.url, model=s.model or None, style=s.style,
                                  temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                                  top_k_docs=s.top_k_docs)


def _check_retriever(s: BackendSettings, where: str) -> None:
    _needs_url(s, where, "retriever_url")
    _needs_top_k(s, where)


def _retriever_url(s: BackendSettings) -> SearchBackend:
    return RetrieverBackend(s.url, topk=s.top_k)


def _check_bm25(s: BackendSettings, where: str) -> None:
    _needs_top_k(s, where)
    if not s.corpus:
        raise ValueError(f"{where}.kind='bm25' needs {where}.corpus (a JSONL file of "
                         "{id, title, text} passages; python -m zsjax.tools.build_corpus "
                         "makes one)")
    read_corpus(s.corpus)


def _bm25(s: BackendSettings) -> SearchBackend:
    return BM25Backend(s.corpus, top_k=s.top_k, cache_dir=s.cache_dir)


register_backend("simulator", _in_process)
register_backend("simulator_url", _simulator_url,
                 check=lambda s, where: _needs_url(s, where, "simulator_url"))
register_backend("retriever_url", _retriever_url, check=_check_retriever)
register_backend("bm25", _bm25, check=_check_bm25)
