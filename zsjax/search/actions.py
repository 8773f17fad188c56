"""Parsing the policy's action out of one turn of generated text."""

from __future__ import annotations

import dataclasses
import re

_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "search" | "answer" | "invalid"
    content: str = ""


def parse_action(text: str) -> Action:
    """The first complete <search>...</search> or <answer>...</answer> decides; else invalid.

    Never raises, whatever the text.
    """
    if not isinstance(text, str):
        return Action("invalid")
    match = _ACTION.search(text)
    if match is None:
        return Action("invalid")
    return Action(match.group(1), match.group(2).strip())
