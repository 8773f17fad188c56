"""Corpora built from QA evidence, and the simulator-pair and cold-start builders, on the recipe's
real HotpotQA rows and on small hand-made ones."""

import json
import os
import re
import string

import pytest

from zsjax.data import corpus as C
from zsjax.data import evidence_sft as E
from zsjax.search.bm25 import BM25Index

DATA = os.path.join(os.path.dirname(E.__file__), "..", "recipes", "data", "hotpotqa")


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _row(i, evidence, answer="A", qtype="bridge"):
    return {"id": str(i), "question": f"Question {i}?", "golden_answers": [answer],
            "evidence": [{"title": t, "text": x} for t, x in evidence], "type": qtype}


def test_corpus_groups_titles_and_drops_duplicates(tmp_path):
    a = _write(tmp_path / "a.jsonl", [
        _row(0, [("Paris", "Paris is in France."), ("", "An untitled sentence."),
                 ("Paris", "It has  the Louvre.")]),
        _row(1, [("Paris", "Paris is in France."), ("Rome", "Rome is in Italy."),
                 ("", "An untitled sentence."), ("", "Another one.")])])
    b = _write(tmp_path / "b.jsonl", [_row(2, [("Rome", "It has the Colosseum."),
                                               ("Paris", "It has the Louvre.")])])
    out = str(tmp_path / "corpus.jsonl")
    assert C.write_corpus([a, b], out) == 4
    rows = [json.loads(x) for x in open(out)]
    assert rows == [
        {"id": "0", "title": "Paris", "text": "Paris is in France. It has the Louvre."},
        {"id": "1", "title": "", "text": "An untitled sentence."},
        {"id": "2", "title": "Rome", "text": "Rome is in Italy. It has the Colosseum."},
        {"id": "3", "title": "", "text": "Another one."}]


@pytest.mark.parametrize("line, match", [
    ('{"question": "q?", "golden_answers": ["a"]}', r"r\.jsonl:2: a row needs an 'evidence' list"),
    ('{"question": "q?", "golden_answers": [], "evidence": []}', r"r\.jsonl:2: 'golden_answers'"),
    ('{"question": " ", "golden_answers": ["a"], "evidence": []}', r"r\.jsonl:2: .*'question'"),
    ('{"question": "q?", "golden_answers": ["a"], "evidence": [{"title": "t"}]}',
     r"r\.jsonl:2: evidence\[0\] must be"),
    ('{"question": "q?",', r"r\.jsonl:2: not valid JSON"),
])
def test_evidence_row_errors_name_the_line(tmp_path, line, match):
    path = _write(tmp_path / "r.jsonl", [_row(0, [("", "x")]), line])
    with pytest.raises(ValueError, match=match):
        C.read_evidence_rows(path)
    with pytest.raises(ValueError, match=match):
        C.write_corpus([path], str(tmp_path / "c.jsonl"))


@pytest.fixture(scope="module")
def hotpot(tmp_path_factory):
    """The recipe's rows and its engine for the SFT data: a BM25 index of the train split."""
    tmp = tmp_path_factory.mktemp("hotpot")
    train = C.read_evidence_rows(os.path.join(DATA, "train.jsonl"))
    test = C.read_evidence_rows(os.path.join(DATA, "test.jsonl"))
    path = str(tmp / "train_corpus.jsonl")
    C.write_corpus([os.path.join(DATA, "train.jsonl")], path)
    return train, test, BM25Index(path, verbose=False)


def _mentions(text: str, answer: str) -> bool:
    """An independent answer test: the answer's words, lower-cased and without punctuation, in
    order and on word boundaries in the text."""
    strip = str.maketrans("", "", string.punctuation)
    words = answer.lower().translate(strip).split()
    words = [w for w in words if w not in ("a", "an", "the")] or words
    return bool(words) and re.search(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b",
                                     text.lower().translate(strip)) is not None


def test_simulator_pairs_are_balanced_held_out_and_noisy_ones_lack_the_answer(hotpot):
    train, test, index = hotpot
    pairs = E.simulator_pairs(train, index, docs=3)
    test_questions = {r.question for r in test}
    test_sentences = {e.text for r in test for e in r.evidence}
    train_questions = {r.question: r for r in train}
    assert len(pairs) > 1000
    assert not {p["question"] for p in pairs} & test_questions
    assert all(p["question"] in train_questions for p in pairs)
    train_sentences = {e.text for r in train for e in r.evidence}
    for p in pairs:  # every document is a training row's evidence sentence
        texts = {line.split(": ", 1)[1] for line in p["documents"].splitlines()}
        assert texts <= train_sentences and not texts & (test_sentences - train_sentences)
    by_query = {}
    for p in pairs:
        by_query.setdefault((p["question"], p["query"]), []).append(p["label"])
    assert all(sorted(v) == ["noisy", "useful"] for v in by_query.values())
    noisy = [p for p in pairs if p["label"] == "noisy"]
    assert all(not _mentions(p["documents"], a) for p in noisy for a in p["golden_answers"])
    assert all(len(p["documents"].splitlines()) == 3 for p in noisy)
    # useful documents are the question's own gold evidence
    for p in pairs[:200]:
        if p["label"] == "useful":
            gold = {e.text for e in train_questions[p["question"]].evidence}
            assert all(line.split(": ", 1)[1] in gold for line in p["documents"].splitlines())


def test_cold_start_rows_teach_the_format_not_the_answers(hotpot):
    train, test, index = hotpot
    rows = E.cold_start_rows(train, index, per_question=2, gold_fraction=0.25, seed=3)
    assert len(rows) == 2 * len(train)
    assert not {r["question"] for r in rows} & {r.question for r in test}
    gold = 0
    for r, q in zip(rows, [q for q in train for _ in range(2)]):
        segs = r["segments"]
        assert [s["loss"] for s in segs] == [1, 0] * ((len(segs) - 3) // 2) + [1, 0, 1]
        for s in segs[:-3]:
            assert s["text"].startswith("\n\n<information>") == (s["loss"] == 0)
        text = "".join(s["text"] for s in segs[-3:])
        # the answer's words are out of the loss, the tags around them in
        assert segs[-3]["text"].endswith("<answer>") and segs[-1]["text"] == " </answer>"
        answer = re.fullmatch(r".*<answer> (.*) </answer>", text, re.DOTALL).group(1)
        assert segs[-2]["text"] == f" {answer}"
        seen = " ".join(s["text"] for s in segs[:-3] if s["loss"] == 0)
        if answer in q.golden_answers:
            gold += 1
        else:  # a span of the documents it saw, or yes/no
            assert answer in seen or answer in ("yes", "no")
    assert 0.15 < gold / len(rows) < 0.4  # a minority carries the golden answer


def test_build_corpus_tool(tmp_path, capsys):
    from zsjax.tools import build_corpus
    src = _write(tmp_path / "a.jsonl", [_row(0, [("T", "One."), ("T", "Two."), ("", "Three.")])])
    out = str(tmp_path / "c.jsonl")
    assert build_corpus.main([src, "--out", out]) == 0
    assert "2 passages" in capsys.readouterr().out
    assert [json.loads(x)["text"] for x in open(out)] == ["One. Two.", "Three."]
    assert os.path.isdir(out + ".bm25")
    bad = _write(tmp_path / "bad.jsonl", ['{"question": "q?", "golden_answers": ["a"]}'])
    assert build_corpus.main([bad, "--out", out]) == 2
    assert "bad.jsonl:1: a row needs an 'evidence' list" in capsys.readouterr().err
