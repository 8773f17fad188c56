"""ZeroSearch's fixed texts. These are compatibility constants: released ZeroSearch policies and
simulators were trained on exactly these strings, so do not reformat them."""

POLICY_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n")

INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n")

INFORMATION_TEMPLATE = "\n\n<information>{documents}</information>\n\n"

STOP_STRINGS = ("</search>", "</answer>")


def normalize_question(question: str) -> str:
    """Strips the question and ends it with '?', as the reference data pipeline does."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return question


def policy_prompt(question: str) -> str:
    return POLICY_TEMPLATE.format(question=normalize_question(question))


def information_block(documents: str) -> str:
    return INFORMATION_TEMPLATE.format(documents=documents.strip())
