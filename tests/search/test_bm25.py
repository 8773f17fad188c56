"""The local BM25 engine: its ranking against a plain-Python BM25, the reference's result format,
the index cache, corpus errors, and its selection by name."""

import json
import math
import os

import numpy as np
import pytest

from zsjax.search import SearchRequest
from zsjax.search import bm25 as B
from zsjax.search.factory import check_backend, make_backend

WORDS = ("river castle violin harbour comet glacier orchard lantern meadow falcon quarry "
         "tundra beacon canyon marble saddle thistle vapour walnut zephyr").split()


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _random_corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"d{i}", "title": "", "text": " ".join(rng.choice(WORDS, rng.integers(4, 30)))}
            for i in range(n)]


def plain_bm25(docs: list[list[str]], query: list[str], k1=B.K1, b=B.B) -> list[float]:
    """Lucene's BM25 (Kamphuis et al., 2020), written out term by term."""
    n = len(docs)
    avg = sum(map(len, docs)) / n
    scores = []
    for d in docs:
        total = 0.0
        for t in set(query):
            df = sum(t in other for other in docs)
            if not df:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            total += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg))
        scores.append(total)
    return scores


def test_ranking_equals_a_plain_python_bm25(tmp_path):
    rows = _random_corpus()
    index = B.BM25Index(_write(tmp_path / "c.jsonl", rows), verbose=False)
    docs = B.tokenize([r["text"] for r in rows])
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(WORDS, 3, replace=False)) for _ in range(20)]
    for query, hits in zip(queries, index.search(queries, 5)):
        want = plain_bm25(docs, B.tokenize([query])[0])
        order = sorted(range(len(rows)), key=lambda i: -want[i])[:5]
        assert [p.id for p, _ in hits] == [rows[i]["id"] for i in order if want[i] > 0]
        np.testing.assert_allclose([s for _, s in hits], [want[i] for i in order], rtol=1e-5)


def test_results_are_formatted_as_the_reference_formats_search_results(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [
        {"id": "a", "title": "Florida Senate", "text": "The Senate has 40 members."},
        {"id": "b", "title": "", "text": "Ken Pruitt was a member of the Florida Senate."},
        {"id": "c", "title": "Moby-Dick", "text": "A novel by Herman Melville."}])
    backend = make_backend("bm25", corpus=corpus, top_k=2)
    docs = backend.search([SearchRequest("Florida Senate members", "q", ("40",)),
                           SearchRequest("zzz unknown words", "q", ("x",))])
    assert docs[0] == ("Doc 1(Title: Florida Senate) The Senate has 40 members.\n"
                       "Doc 2: Ken Pruitt was a member of the Florida Senate.")
    assert docs[1] == B.NO_RESULTS
    assert not getattr(backend, "samples", False)  # fixed results: StepCache serves repeats once


def test_index_is_built_once_and_rebuilt_when_the_corpus_changes(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", _random_corpus(10))
    assert B.BM25Index(corpus, verbose=False).built
    again = B.BM25Index(corpus, verbose=False)
    assert not again.built and os.path.isdir(corpus + ".bm25")
    query = ["river castle"]
    assert again.search(query, 3)[0] == B.BM25Index(corpus, verbose=False).search(query, 3)[0]
    _write(corpus, _random_corpus(12, seed=5))
    changed = B.BM25Index(corpus, verbose=False)
    assert changed.built and len(changed.passages) == 12


@pytest.mark.parametrize("lines, match", [
    ([], "has no passages"),
    (['{"id": "1", "text": "fine"}', '{"id": "2", "text": '], r"c\.jsonl:2: not valid JSON"),
    (['{"id": "1", "title": "t"}'], r"c\.jsonl:1: a passage needs a non-empty 'text'"),
    (['["a list"]'], r"c\.jsonl:1: a passage is an object"),
    (['{"id": "1", "text": "a"}', '', '{"id": "1", "text": "b"}'],
     r"c\.jsonl:3: id '1' was already used on line 1"),
    (['{"id": "1", "text": "a", "title": 3}'], r"c\.jsonl:1: 'title' must be a string"),
])
def test_bad_corpus_lines_are_named(tmp_path, lines, match):
    corpus = _write(tmp_path / "c.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        B.read_corpus(corpus)
    with pytest.raises(ValueError, match=match):
        check_backend("bm25", corpus=corpus)


def test_backend_selection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_backend("bm25", corpus=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="needs config.backend.corpus"):
        check_backend("bm25")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        check_backend("bm25", corpus="x", top_k=0)
    with pytest.raises(ValueError, match="is unknown"):
        check_backend("google")
    with pytest.raises(ValueError, match="needs config.backend.url"):
        check_backend("retriever_url")


def test_a_corpus_of_stop_words_is_a_clear_error(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"id": "1", "text": "The and of."},
                                           {"id": "2", "text": "it is."}])
    with pytest.raises(ValueError, match="no passage has a word BM25 can index"):
        B.BM25Index(corpus, verbose=False)
