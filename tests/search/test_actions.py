"""Action parsing and answer extraction against plain-Python expectations."""

from hypothesis import given, strategies as st

from zsjax.rl.rewards import normalize_answer
from zsjax.search import parse_action
from zsjax.search.actions import extract_answer
from zsjax.search import prompts as P

TAGS = st.sampled_from(["<search>", "</search>", "<answer>", "</answer>", "<think>", "x", " ",
                        "\n", "<", ">", "/"])


@given(st.text())
def test_parse_action_never_raises_on_arbitrary_text(text):
    assert parse_action(text).kind in ("search", "answer", "invalid")


@given(st.lists(TAGS, max_size=30).map("".join))
def test_parse_action_on_tag_soup_matches_a_scan(text):
    action = parse_action(text)
    # reference: the earliest position where a complete, matching pair closes
    best = None
    for kind in ("search", "answer"):
        start = text.find(f"<{kind}>")
        while start != -1:
            end = text.find(f"</{kind}>", start + len(kind) + 2)
            if end != -1 and (best is None or start < best[1]):
                best = (kind, start, text[start + len(kind) + 2:end].strip())
                break
            start = text.find(f"<{kind}>", start + 1)
    if best is None:
        assert action.kind == "invalid"
    else:
        assert (action.kind, action.content) == (best[0], best[2])


def test_first_action_decides():
    assert parse_action("<search> a </search> <answer> b </answer>").content == "a"
    assert parse_action("<answer>\nParis\n</answer>").kind == "answer"
    assert parse_action("<search> a </answer>").kind == "invalid"
    assert parse_action(None).kind == "invalid"


def test_extract_answer_takes_the_last_answer_of_the_response():
    assert extract_answer("<answer> a </answer> then <answer> b </answer>") == "b"
    assert extract_answer("no answer") is None
    assert extract_answer(None) is None
    # the prompt's own example is an answer tag: pass the response only
    assert extract_answer(P.policy_prompt("q")) == "Beijing"


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("") == ""


def test_question_normalisation():
    assert P.normalize_question("  who? ") == "who?"
    assert P.normalize_question("who") == "who?"
    assert P.policy_prompt("who").endswith("Question: who?\n")


def test_policy_texts_are_byte_exact():
    # Transcribed by hand from the design reference (section 1, "Policy interaction").
    expect = (
        "Answer the given question. You must conduct reasoning inside <think> and </think> "
        "first every time you get new information. After reasoning, if you find you lack some "
        "knowledge, you can call a search engine by <search> query </search> and it will return "
        "the top searched results between <information> and </information>. You can search as "
        "many times as your want. If you find no further external knowledge needed, you can "
        "directly provide the answer inside <answer> and </answer>, without detailed "
        "illustrations. For example, <answer> Beijing </answer>. Question: Who is Zed?\n")
    assert P.policy_prompt("Who is Zed") == expect
    assert P.INVALID_ACTION == (
        "\nMy previous action is invalid. If I want to search, I should put the query between "
        "<search> and </search>. If I want to give the final answer, I should put the answer "
        "between <answer> and </answer>. Let me try again.\n")
    assert P.information_block(" docs ") == "\n\n<information>docs</information>\n\n"
