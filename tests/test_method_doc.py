"""docs/METHOD.md quotes the compatibility constants; the code must hold exactly those strings."""

import pathlib
import re

import pytest

from zsjax.search import prompts, simulator

METHOD = pathlib.Path(__file__).resolve().parents[1] / "docs" / "METHOD.md"


def _quoted(after: str) -> str:
    """The first backquoted string on the lines after `after`, with its `\\n`s made newlines."""
    text = METHOD.read_text()
    start = text.index(after) + len(after)
    match = re.search(r"`([^`]+)`", text[start:])
    assert match, f"no quoted string after {after!r} in {METHOD}"
    return match.group(1).replace("\\n", "\n")


def test_policy_prompt_and_invalid_action_match_the_doc():
    assert _quoted("gets a trailing `?` if it has none):") == prompts.POLICY_TEMPLATE
    assert _quoted("invalid-action text (compatibility constant):") == prompts.INVALID_ACTION
    information = prompts.INFORMATION_TEMPLATE.format(documents="{docs}")
    assert _quoted("the simulator's documents are appended as") == information


@pytest.mark.parametrize("kind", ["useful", "noisy"])
def test_finetuned_simulator_prompt_matches_the_doc(kind):
    useful = _quoted("- Fine-tuned simulator prompt (compatibility constant), useful variant:")
    # The doc states the noisy variant in words: "useful" -> "noisy" in its three places.
    assert useful.count("useful") + useful.count("Useful") == 3
    expected = useful.replace("useful", kind).replace("Useful", kind.capitalize())
    assert simulator.FINETUNED_TEMPLATE.replace("{kind}", kind).replace(
        "{Kind}", kind.capitalize()) == expected
