"""JSONL files read one object a line, with errors that name the file and the line: the one
reader behind QA files, corpora, evidence rows and SFT rows."""

from __future__ import annotations

import json
from typing import Iterator


def read_objects(path: str, what: str = "a row is an object") -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for each non-blank line of `path`. A line that is not JSON,
    or is JSON but not an object, is a ValueError `PATH:LINE: ...` (`what` says what an object
    should be, e.g. "a passage is an object {id, title, text}")."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})"
                                 ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: {what}; got a {type(row).__name__}")
            yield n, row
