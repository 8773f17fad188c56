"""Parsing the policy's action out of one turn of generated text, and its answer out of its
turns (the one answer parser of zsjax: rollouts, rewards and evaluation use it)."""

from __future__ import annotations

import dataclasses
import re

_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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


def extract_answer(response: str) -> str | None:
    """The content of the last <answer>...</answer> in the response (pass the policy's own text
    only, never the prompt, whose instructions contain an example answer). None when there is
    none."""
    if not isinstance(response, str):
        return None
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None
