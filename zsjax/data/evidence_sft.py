"""Fine-tuning data built from QA rows with gold evidence (`zsjax.data.corpus`) and a BM25 index
over the training rows' evidence (`zsjax.search.bm25`), for `zsjax.sft`:

- `simulator_pairs`: the paper's simulator fine-tuning on real documents. For each training
  question, the queries a policy would issue (the question, the entities it names, the subjects
  of its evidence); for each query one *useful* row (the question's gold evidence) and one
  *noisy* row (BM25 hits from other questions' evidence that do not contain the golden answer),
  so the two labels are balanced.
- `cold_start_rows`: format-only trajectories for a policy that does not emit the interaction
  format: think, search, the engine's documents (loss 0, as in RL), answer. The answer is a
  span of the documents, only a minority of rows (`gold_fraction`) answer with the golden
  answer, and the answer's words are out of the loss (the tags around them are in): the cold
  start teaches the format, and choosing the answer is left to the model and then to RL.

Only the rows given are used: pass training rows, never test rows.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from zsjax.data.corpus import EvidenceRow
from zsjax.rl.rewards import normalize_answer
from zsjax.search import prompts as P
from zsjax.search.bm25 import BM25Index, Passage, format_passages

# Entity-like spans: runs of capitalised words joined by a few lower-case particles
# ("University of Florida", "Jean de la Fontaine"), or a number ("1755", "12,500").
_WORD = r"[A-Z][\w'’.&-]*"
SPAN = re.compile(_WORD + r"(?:\s+(?:(?:of|the|de|la|von|van|and|du|del)\s+)*" + _WORD
                  + r")*|\d[\d,.]*\d|\d")
_YES_NO = re.compile(r"^(are|is|was|were|do|does|did|can|could|has|have|had|will|would)\b",
                     re.IGNORECASE)


# Capitalised only because they open a sentence: dropped from the front of a span.
_OPENERS = frozenset(
    "what which who whom whose where when why how is are was were do does did can could has "
    "have had will would the a an in on at it its he she they his her their this that these "
    "those there after before during both either".split())


def spans(text: str) -> list[str]:
    """The entity-like spans of a text, in order, without repeats, trailing punctuation or a
    sentence-opening word ("Which Emmett's Mark" -> "Emmett's Mark")."""
    out = []
    for m in SPAN.finditer(text):
        words = m.group(0).strip(" .,;:'’").split()
        while words and words[0].lower() in _OPENERS and (
                len(words) == 1 or words[0].lower() != "the"):
            words = words[1:]
        s = " ".join(words)
        if s and s not in out:
            out.append(s)
    return out


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """A normalised golden answer is a substring of the normalised text (the reference's
    "EM" test, applied to a document)."""
    norm = f" {normalize_answer(text)} "
    return any(f" {a} " in norm for a in (normalize_answer(x) for x in answers) if a)


def policy_queries(row: EvidenceRow, max_entities: int = 2, *,
                   evidence_subjects: bool = True) -> list[str]:
    """The queries a policy would issue for a question: the question itself, the entities it
    names (longest first), and (`evidence_subjects`: the queries of a second hop, which may
    name the answer) the titles, or untitled the opening entity, of its evidence."""
    queries = [row.question]
    named = sorted((s for s in spans(row.question) if len(s) > 3 and not s.isdigit()),
                   key=len, reverse=True)
    queries += named[:max_entities]
    for e in row.evidence if evidence_subjects else ():
        subject = e.title or next(iter(spans(e.text)), "")
        if subject and len(subject) > 3:
            queries.append(subject)
    return list(dict.fromkeys(q for q in queries if q.strip()))


def _own_passage(p: Passage, row: EvidenceRow) -> bool:
    return any(e.text in p.text for e in row.evidence)


def simulator_pairs(rows: Sequence[EvidenceRow], index: BM25Index, *, docs: int = 3,
                    max_queries: int = 4, seed: int = 0) -> list[dict]:
    """`zsjax.sft` simulator rows `{query, question, golden_answers, documents, label}`: per
    query (at most `max_queries` of `policy_queries` a question) one useful and one noisy row.
    Useful documents are the question's gold evidence, the passages most relevant to the query
    first (at most `docs`); noisy ones are the query's BM25 hits that are neither the question's
    evidence nor contain a golden answer. A query without `docs` such hits is skipped (both
    labels, to keep them balanced)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        if not row.evidence:
            continue
        queries = policy_queries(row)
        keep = queries[:1] + rng.sample(queries[1:], min(len(queries) - 1, max_queries - 1))
        evidence = list(dict.fromkeys(row.evidence))
        for query, hits in zip(keep, index.search(keep, docs * 8 + 8)):
            def rank(e):  # the first hit holding this evidence sentence
                return next((i for i, (p, _) in enumerate(hits) if e.text in p.text),
                            len(hits))
            gold = sorted(evidence, key=rank)[:docs]
            noisy = [p for p, _ in hits if not _own_passage(p, row)
                     and not contains_answer(f"{p.title} {p.text}", row.golden_answers)][:docs]
            if len(noisy) < docs:
                continue
            common = {"query": query, "question": row.question,
                      "golden_answers": list(row.golden_answers)}
            out.append({**common, "label": "useful", "documents": format_passages(
                [Passage("", e.title, e.text) for e in gold])})
            out.append({**common, "label": "noisy", "documents": format_passages(noisy)})
    return out


# Short thoughts: every token a turn decodes costs rollout time.
THINK_SEARCH = "<think> I need to search for this. </think>\n"
THINK_AGAIN = "<think> I should also look up {entity}. </think>\n"
THINK_ANSWER = "<think> I can answer now. </think>\n"


def _answer_candidates(row: EvidenceRow, documents: Sequence[Passage]) -> list[str]:
    """Spans of the documents that could be an answer: not already in the question (unless the
    question compares two things), plus yes and no for a yes/no question."""
    comparison = row.type == "comparison"
    question = normalize_answer(row.question)
    out = []
    for p in documents:
        for s in spans(f"{p.title}. {p.text}" if p.title else p.text):
            if comparison or normalize_answer(s) not in question:
                out.append(s)
    if _YES_NO.match(row.question):
        out += ["yes", "no"]
    return list(dict.fromkeys(out))


def cold_start_rows(rows: Sequence[EvidenceRow], index: BM25Index, *, per_question: int = 2,
                    docs: int = 3, gold_fraction: float = 0.25, second_search: float = 0.25,
                    question_query: float = 0.7, seed: int = 0) -> list[dict]:
    """`zsjax.sft` trajectory rows `{question, segments}`, `per_question` a question: think,
    search (the question itself with probability `question_query`, else an entity it names),
    the index's top `docs` passages as an information block (loss 0), with probability
    `second_search` a second search for an entity of those documents, then think and answer.
    The answer is the golden answer with probability `gold_fraction`, else a span of the
    documents that is not a golden answer; its words have loss 0, `<answer>` and `</answer>`
    around them loss 1."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        queries = policy_queries(row, evidence_subjects=False)
        for _ in range(per_question):
            query = (row.question if rng.random() < question_query or len(queries) == 1
                     else rng.choice(queries[1:]))
            segments, seen = [], []
            for hop in range(2):
                found = [p for p, _ in index.search([query], docs)[0]]
                seen += found
                think = THINK_SEARCH if hop == 0 else THINK_AGAIN.format(entity=query)
                segments.append({"text": f"{think}<search> {query} </search>", "loss": 1})
                segments.append({"text": P.information_block(
                    format_passages(found) if found else "No results found."), "loss": 0})
                entities = [s for s in _answer_candidates(row, found) if s not in ("yes", "no")
                            and s != query and len(s) > 3 and not s[0].isdigit()]
                if hop == 1 or not entities or rng.random() >= second_search:
                    break
                query = rng.choice(entities)
            wrong = [s for s in _answer_candidates(row, seen)
                     if not any(normalize_answer(s) == normalize_answer(a)
                                for a in row.golden_answers)]
            if rng.random() < gold_fraction or not wrong:
                span = row.golden_answers[0]
            else:
                span = rng.choice(wrong)
            # The answer's words stay out of the loss: the rows teach where an answer goes
            # and that it is short, not which span it is.
            segments += [{"text": f"{THINK_ANSWER}<answer>", "loss": 1},
                         {"text": f" {span}", "loss": 0}, {"text": " </answer>", "loss": 1}]
            out.append({"question": row.question, "segments": segments})
    return out
