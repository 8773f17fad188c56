"""QA rows `(question, golden_answers)` from jsonl or ZeroSearch / Search-R1 / veRL parquet, and a
deterministic, resumable, per-process question stream."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from zsjax.rl.rewards import normalize_answer

_TEMPLATE_QUESTION = re.compile(r"Question:\s*(.*?)\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class QARow:
    question: str
    golden_answers: tuple[str, ...]


def _question_of(row: dict) -> str | None:
    if isinstance(row.get("question"), str):
        return row["question"]
    extra = row.get("extra_info") or {}
    if isinstance(extra, dict) and isinstance(extra.get("question"), str):
        return extra["question"]
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            text = str(users[-1].get("content", ""))
            # ZeroSearch files hold the whole instruction; the question follows "Question:".
            m = _TEMPLATE_QUESTION.search(text) if "Question:" in text else None
            return m.group(1) if m else text
    return None


def _answers_of(row: dict) -> list[str] | None:
    def one(a):  # a string, or a number (a year, a count), as its text
        if isinstance(a, str):
            return a
        if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            return str(a)
        if isinstance(a, (float, np.floating)) and np.isfinite(a):
            return str(int(a)) if float(a).is_integer() else str(a)  # 2019.0 -> "2019"
        raise ValueError(f"a golden answer is {a!r} ({type(a).__name__}); answers are "
                         "strings or numbers")

    def as_list(x):
        if isinstance(x, (list, tuple, np.ndarray)):
            return [one(a) for a in x]
        return [one(x)]

    if row.get("golden_answers") is not None:
        return as_list(row["golden_answers"])
    reward = row.get("reward_model") or {}
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if isinstance(truth, dict) and truth.get("target") is not None:
        return as_list(truth["target"])
    extra = row.get("extra_info") or {}
    if isinstance(extra, dict) and extra.get("answer") is not None:
        return as_list(extra["answer"])
    if truth is not None:
        return as_list(truth)
    return None


def read_qa(path: str) -> list[QARow]:
    """Reads a `.jsonl` (`{question, golden_answers}` a line), `.json` (a list of such rows) or
    `.parquet` (ZeroSearch: prompt + reward_model.ground_truth.target; veRL: ground_truth as a
    string) QA file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"QA file {path} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".json"):
        with open(path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); a .json QA file holds a list "
                                 f"of rows, a .jsonl file one row a line") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json QA file holds a list of rows; got a "
                             f"{type(rows).__name__}")
    elif path.endswith(".jsonl"):
        rows, lines = [], []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column "
                                         f"{e.colno})") from None
                    lines.append(n)
    else:
        raise ValueError(f"{path}: unknown QA file type; expected .jsonl, .json or .parquet")
    out, unscorable = [], []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}" + (f" (line {lines[i]})" if path.endswith(".jsonl") else "")
        if not isinstance(row, dict):
            raise ValueError(f"{where} is a {type(row).__name__}, not an object")
        q = _question_of(row)
        try:
            a = _answers_of(row)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if a and q is not None and q.strip() and not any(normalize_answer(x) for x in a):
            unscorable.append(f"{where.split(': ', 1)[1]} {a!r}")
            continue
        # an answer that normalises to nothing ("", "the", "---") would score any prediction
        # as a substring match and an empty one as an exact match
        a = [x for x in a or () if normalize_answer(x)]
        if q is None or not q.strip() or not a:
            raise ValueError(
                f"{where} has no {'question' if q is None or not q.strip() else 'golden answers'}"
                "; looked for question / extra_info.question / prompt[user].content and "
                "golden_answers / reward_model.ground_truth(.target) / extra_info.answer (an "
                "answer must be a non-empty string or a number); the row has columns "
                f"{sorted(row)}")
        out.append(QARow(q.strip(), tuple(a)))
    if unscorable:  # e.g. NQ's test row "how many breeds of pigs are there in the uk": "---"
        print(f"[qa] {path}: skipped {len(unscorable)} row(s) whose every golden answer "
              f"normalises to nothing, so no prediction can be scored against it: "
              f"{'; '.join(unscorable[:3])}{' ...' if len(unscorable) > 3 else ''}",
              file=sys.stderr)
    if not out:
        raise ValueError(f"{path} has no rows")
    return out


def dataset_name(spec: str) -> str:
    """`nq.test` for .../nq.test.jsonl, `NAME_SPLIT` for a tfds spec: how metrics name a set."""
    if spec.startswith("tfds:"):
        name, split = spec[len("tfds:"):].split("@", 1)[0].split("/", 1)
        return f"{name.split(':')[0]}_{split}"
    name = os.path.basename(spec)
    for ext in (".jsonl", ".json", ".parquet"):
        name = name.removesuffix(ext)
    return name


def dataset_names(specs: Sequence[str]) -> list[str]:
    """`dataset_name` of each spec; files that share a name are told apart by their folder
    (`nq/test.jsonl` and `bamboogle/test.jsonl`: `nq.test` and `bamboogle.test`). The same
    file twice is an error."""
    base = [dataset_name(s) for s in specs]
    names = list(base)
    for i, s in enumerate(specs):
        folder = os.path.basename(os.path.dirname(os.path.abspath(s)))
        if base.count(base[i]) > 1 and not s.startswith("tfds:") and folder:
            names[i] = f"{folder}.{base[i]}"
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ValueError(f"{specs[names.index(name)]!r} and {specs[i]!r} would both be "
                             f"named {name!r}; rename one or list it once")
    return names


class QuestionStream:
    """An endless, deterministic stream of question batches, reshuffled each epoch.

    `position` counts batches drawn; a stream built with the same seed and `start=position`
    continues exactly where the first stopped. With several processes, process i of n takes
    the i-th of n contiguous blocks of each global batch (its rows of the global array).
    """

    def __init__(self, rows: list[QARow], batch_size: int, *, seed: int, start: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} "
                             "processes")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.position = start
        self.process_index, self.process_count = process_index, process_count

    def next(self) -> list[QARow]:
        n = len(self.rows)
        per_epoch = max(1, n // self.batch_size)
        epoch, k = divmod(self.position, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        if n < self.batch_size:
            order = np.resize(order, self.batch_size)
        idx = order[k * self.batch_size:(k + 1) * self.batch_size]
        self.position += 1
        per = self.batch_size // self.process_count
        return [self.rows[i] for i in idx[self.process_index * per:(self.process_index + 1) * per]]
