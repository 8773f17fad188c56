"""Answer extraction and SQuAD-style normalisation (the reward computation lands with the RL
core issue)."""

from __future__ import annotations

import re
import string

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def extract_answer(response: str) -> str | None:
    """The content of the last <answer>...</answer> in the response (pass the response only,
    never the prompt, whose instructions contain an example answer). None when there is none."""
    if not isinstance(response, str):
        return None
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
