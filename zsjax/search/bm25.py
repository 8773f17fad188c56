"""A local search engine: BM25 over a JSONL corpus of passages, one `{id, title, text}` a line.

    backend = BM25Backend("corpus.jsonl", top_k=3)       # index built once, cached beside it
    backend.search([SearchRequest("Florida Senate members", "", ())])
    # ['Doc 1(Title: Florida Senate) The Senate has 40 members, ...\\nDoc 2(Title: ...) ...']

Scoring, tokenization (lower case, English stop words, Snowball stemming) and the index are
`bm25s`'s (Lucene's BM25, k1 1.5, b 0.75); this module reads and checks the corpus, caches the
index next to it (`CORPUS.bm25/`, rebuilt when the corpus or the settings change) and formats
the hits as the reference formats real search results (`format_passages`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Sequence

from zsjax.data.jsonl import read_objects
from zsjax.search.backend import SearchRequest

K1, B = 1.5, 0.75  # bm25s's defaults (Lucene's BM25)
NO_RESULTS = "No results found."


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def read_corpus(path: str) -> list[Passage]:
    """The passages of a JSONL corpus; a missing, empty or malformed file is a ValueError (or
    FileNotFoundError) that names the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus {path} does not exist; expected a JSONL file of "
                                "{id, title, text} passages (zsjax.tools.build_corpus makes "
                                "one from QA files with evidence)")
    passages, seen = [], {}
    for n, row in read_objects(path, "a passage is an object {id, title, text}"):
        text, title = row.get("text"), row.get("title", "")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: a passage needs a non-empty 'text' string")
        if not isinstance(title, str):
            raise ValueError(f"{path}:{n}: 'title' must be a string; got "
                             f"{type(title).__name__}")
        pid = str(row.get("id", n))
        if pid in seen:
            raise ValueError(f"{path}:{n}: id {pid!r} was already used on line {seen[pid]}")
        seen[pid] = n
        passages.append(Passage(pid, title.strip(), " ".join(text.split())))
    if not passages:
        raise ValueError(f"corpus {path} has no passages")
    return passages


def format_passages(passages: Sequence[Passage]) -> str:
    """Search results as the reference (Search-R1's retrieval tool) shows them to the policy:
    `Doc {i}(Title: {title}) {text}` lines. A passage without a title is `Doc {i}: {text}`,
    the simulator's document format."""
    lines = []
    for i, p in enumerate(passages, 1):
        lines.append(f"Doc {i}(Title: {p.title}) {p.text}" if p.title else f"Doc {i}: {p.text}")
    return "\n".join(lines)


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """bm25s's tokenization: lower case, words, English stop words out, Snowball stems."""
    import bm25s
    import Stemmer
    return bm25s.tokenize(list(texts), lower=True, stopwords="en",
                          stemmer=Stemmer.Stemmer("english"), return_ids=False,
                          show_progress=False)


def _indexed_text(p: Passage) -> str:
    return f"{p.title}\n{p.text}" if p.title else p.text


def _fingerprint(path: str) -> str:
    import bm25s
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    settings = {"k1": K1, "b": B, "method": "lucene", "tokenize": "en-stop-snowball",
                "bm25s": bm25s.__version__}
    return digest.hexdigest() + json.dumps(settings, sort_keys=True)


class BM25Index:
    """BM25 over a corpus file's passages. The index is built on first use and saved in
    `cache_dir` (default: `CORPUS.bm25` beside the corpus; where that folder is read-only, the
    index is built in memory each time, with a warning); a later index of the same corpus
    file, settings and bm25s version loads it instead."""

    def __init__(self, corpus_path: str, *, cache_dir: str | None = None,
                 verbose: bool = True):
        import bm25s
        self.corpus_path = corpus_path
        self.passages = read_corpus(corpus_path)
        self.cache_dir = cache_dir or corpus_path + ".bm25"
        key = _fingerprint(corpus_path)
        stamp = os.path.join(self.cache_dir, "zsjax_fingerprint.txt")
        self.retriever, self.built = None, False
        if os.path.isfile(stamp) and open(stamp).read() == key:
            try:
                self.retriever = bm25s.BM25.load(self.cache_dir, show_progress=False,
                                                 verbosity=0)
            except (OSError, ValueError):  # removed or rewritten meanwhile: build it again
                self.retriever = None
        if self.retriever is None:
            tokens = tokenize([_indexed_text(p) for p in self.passages])
            if not any(tokens):
                raise ValueError(f"corpus {corpus_path}: no passage has a word BM25 can index "
                                 "(all are English stop words or punctuation)")
            self.retriever = bm25s.BM25(k1=K1, b=B, method="lucene")
            self.retriever.index(tokens, show_progress=False)
            self.built = True
            self._save(key, stamp, verbose)

    def _save(self, key: str, stamp: str, verbose: bool) -> None:
        tmp = f"{self.cache_dir}.tmp{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            self.retriever.save(tmp, show_progress=False)
            with open(os.path.join(tmp, "zsjax_fingerprint.txt"), "w") as f:
                f.write(key)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            os.replace(tmp, self.cache_dir)  # a crash never leaves a half-written index
        except OSError as e:  # a read-only folder: the index works, it is just not cached
            shutil.rmtree(tmp, ignore_errors=True)
            if verbose:
                print(f"[bm25] could not cache the index in {self.cache_dir} ({e}); it will "
                      "be rebuilt next time", file=sys.stderr)
            return
        if verbose:
            print(f"[bm25] indexed {len(self.passages)} passages of {self.corpus_path} into "
                  f"{self.cache_dir}", file=sys.stderr)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[Passage, float]]]:
        """The top-k passages of each query with their scores, best first; passages that
        share no term with the query are left out."""
        if not queries:
            return []
        k = min(k, len(self.passages))
        ids, scores = self.retriever.retrieve(tokenize(queries), k=k, show_progress=False,
                                              n_threads=1)
        return [[(self.passages[int(i)], float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids, scores)]


class BM25Backend:
    """A SearchBackend over a local corpus: each request's query goes to BM25 and its top_k
    passages come back formatted (`format_passages`); useful/noisy draws are ignored, as a real
    engine would. Results are fixed, so `StepCache` serves identical queries once."""

    def __init__(self, corpus_path: str, *, top_k: int = 3, cache_dir: str | None = None,
                 index: BM25Index | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        self.index = index or BM25Index(corpus_path, cache_dir=cache_dir)
        self.top_k = top_k

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        hits = self.index.search([r.query for r in requests], self.top_k)
        return [format_passages([p for p, _ in h]) if h else NO_RESULTS for h in hits]
