"""Search backends by name, for the programs that take one from a config or flags (`zsjax.train`,
`zsjax.evaluate`, `zsjax.infer`):

| kind            | what                                                   | settings          |
|-----------------|--------------------------------------------------------|-------------------|
| `simulator`     | an LLM simulator in this JAX program (the default)     | the caller's      |
| `simulator_url` | a simulator behind an OpenAI-compatible server         | url, model        |
| `retriever_url` | a real engine speaking the Search-R1 retriever API     | url, top_k        |
| `bm25`          | BM25 over a local JSONL corpus (`zsjax.search.bm25`)    | corpus, top_k     |

The in-process simulator needs model weights, which each program loads its own way (its mesh,
its dtype, maybe the policy's own folder), so the caller passes it as `simulator`, a function
that builds it.
"""

from __future__ import annotations

from typing import Callable

from zsjax.search.backend import SearchBackend

KINDS = ("simulator", "simulator_url", "retriever_url", "bm25")


def check_backend(kind: str, *, url: str = "", corpus: str = "", top_k: int = 3,
                  where: str = "config.backend") -> None:
    """Raises ValueError (FileNotFoundError for a missing corpus) for settings that cannot
    work, before anything is loaded; reads a BM25 corpus through (its errors name the line)."""
    if kind not in KINDS:
        raise ValueError(f"{where}.kind={kind!r} is unknown; choose one of {KINDS}")
    if kind in ("simulator_url", "retriever_url") and not url:
        raise ValueError(f"{where}.kind={kind!r} needs {where}.url "
                         "(e.g. http://127.0.0.1:8000)")
    if kind in ("retriever_url", "bm25") and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}.top_k must be an integer >= 1; got {top_k!r}")
    if kind == "bm25":
        if not corpus:
            raise ValueError(f"{where}.kind='bm25' needs {where}.corpus (a JSONL file of "
                             "{id, title, text} passages; python -m zsjax.tools.build_corpus "
                             "makes one)")
        from zsjax.search.bm25 import read_corpus
        read_corpus(corpus)


def make_backend(kind: str, *, url: str = "", model: str = "", corpus: str = "",
                 top_k: int = 3, cache_dir: str | None = None, style: str = "finetuned",
                 temperature: float = 0.0, max_new_tokens: int = 600, top_k_docs: int = 5,
                 simulator: Callable[[], SearchBackend] | None = None) -> SearchBackend:
    """The backend `kind` with its settings (see the table above); `style`, `temperature`,
    `max_new_tokens` and `top_k_docs` are the simulator server's; `cache_dir` is where a BM25
    index is kept (default: beside the corpus)."""
    check_backend(kind, url=url, corpus=corpus, top_k=top_k)
    if kind == "simulator":
        if simulator is None:
            raise ValueError("kind='simulator' runs a simulator model in-process; this "
                             "program has none to give (choose another backend kind)")
        return simulator()
    if kind == "simulator_url":
        from zsjax.search.http_backends import OpenAISimulatorBackend
        return OpenAISimulatorBackend(url, model=model or None, style=style,
                                      temperature=temperature, max_new_tokens=max_new_tokens,
                                      top_k_docs=top_k_docs)
    if kind == "retriever_url":
        from zsjax.search.http_backends import RetrieverBackend
        return RetrieverBackend(url, topk=top_k)
    from zsjax.search.bm25 import BM25Backend
    return BM25Backend(corpus, top_k=top_k, cache_dir=cache_dir)
