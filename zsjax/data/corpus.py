"""QA rows that carry their gold evidence, and search corpora built from that evidence.

Rows: `{id, question, golden_answers, evidence: [{title, text}], type}` a line (HotpotQA with its
supporting sentences; `type` is optional). A corpus: `{id, title, text}` a line, what
`zsjax.search.bm25` indexes. `build_corpus` keeps every distinct evidence passage: sentences that
share a title become one passage (a Wikipedia paragraph, as far as the evidence goes), and an
untitled sentence is a passage of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

from zsjax.data.jsonl import read_objects


@dataclasses.dataclass(frozen=True)
class Evidence:
    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class EvidenceRow:
    id: str
    question: str
    golden_answers: tuple[str, ...]
    evidence: tuple[Evidence, ...]
    type: str = ""


def read_evidence_rows(path: str) -> list[EvidenceRow]:
    """The rows of a JSONL file of QA rows with evidence; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QA file {path} does not exist")
    rows = []
    for n, row in read_objects(path):
        where = f"{path}:{n}"
        question, answers = row.get("question"), row.get("golden_answers")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: a row needs a non-empty 'question' string")
        if isinstance(answers, str):
            answers = [answers]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise ValueError(f"{where}: 'golden_answers' must be a non-empty list of "
                             "non-empty strings")
        evidence = row.get("evidence")
        if not isinstance(evidence, list):
            raise ValueError(f"{where}: a row needs an 'evidence' list of {{title, text}} "
                             f"(got {type(evidence).__name__}); rows without evidence "
                             "cannot build a corpus")
        items = []
        for k, e in enumerate(evidence):
            text = e.get("text") if isinstance(e, dict) else None
            title = e.get("title", "") if isinstance(e, dict) else None
            if not isinstance(text, str) or not isinstance(title, str):
                raise ValueError(f"{where}: evidence[{k}] must be {{title: str, text: str}}")
            if text.strip():
                items.append(Evidence(" ".join(title.split()), " ".join(text.split())))
        rows.append(EvidenceRow(str(row.get("id", n)), question.strip(),
                                tuple(a.strip() for a in answers), tuple(items),
                                str(row.get("type", ""))))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def build_corpus(rows: Iterable[EvidenceRow]) -> list[dict]:
    """Every distinct evidence passage of the rows, as corpus rows `{id, title, text}`: the
    distinct sentences of one title joined in order of first appearance, each untitled
    sentence alone. Ids are the passages' order ("0", "1", ...)."""
    order: list[tuple[str, str]] = []  # ("title", T) or ("text", S): a passage each
    by_title: dict[str, list[str]] = {}
    untitled: set[str] = set()
    for row in rows:
        for e in row.evidence:
            if e.title:
                if e.title not in by_title:
                    by_title[e.title] = []
                    order.append(("title", e.title))
                if e.text not in by_title[e.title]:
                    by_title[e.title].append(e.text)
            elif e.text not in untitled:
                untitled.add(e.text)
                order.append(("text", e.text))
    out = []
    for kind, key in order:
        title, text = (key, " ".join(by_title[key])) if kind == "title" else ("", key)
        out.append({"id": str(len(out)), "title": title, "text": text})
    return out


def write_corpus(paths: Sequence[str], out: str) -> int:
    """Builds the corpus of the QA files' evidence and writes it to `out` (JSONL); returns the
    number of passages."""
    rows = [r for p in paths for r in read_evidence_rows(p)]
    corpus = build_corpus(rows)
    if not corpus:
        raise ValueError(f"{', '.join(paths)}: no evidence passages to build a corpus from")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in corpus:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(corpus)
