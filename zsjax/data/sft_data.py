"""Supervised fine-tuning data, two kinds of jsonl rows:

- simulator pairs `{query, question, golden_answers, documents, label}`: the simulator prompt,
  then the documents, with the loss on the documents only;
- policy trajectories `{question, segments: [{text, loss}, ...]}` (the policy's warm start on
  the interaction format): the policy prompt of the question (exactly as the rollout builds it),
  then each segment's tokens, with the loss on the segments marked `loss: 1` (the policy's own
  text; information blocks are 0, as in RL).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zsjax.data.jsonl import read_objects
from zsjax.search.backend import SearchRequest
from zsjax.search.rollout import prompt_ids
from zsjax.search.simulator import encode_prompt, simulator_prompt

REQUIRED = ("query", "question", "golden_answers", "documents", "label")


@dataclasses.dataclass
class Example:
    tokens: list[int]
    loss_mask: list[int]  # 1 on the document tokens (and the closing EOS)


def read_rows(path: str) -> list[dict]:
    """Reads and validates the jsonl rows; errors name the file and line."""
    rows = []
    for n, row in read_objects(path):
        if "segments" in row:
            _check_segments(row, f"{path}:{n}")
            rows.append(row)
            continue
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {missing}; each row needs "
                             f"{list(REQUIRED)}")
        if row["label"] not in ("useful", "noisy"):
            raise ValueError(f"{path}:{n}: label must be 'useful' or 'noisy', got "
                             f"{row['label']!r}")
        if isinstance(row["golden_answers"], str):
            row["golden_answers"] = [row["golden_answers"]]
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _check_segments(row: dict, where: str) -> None:
    if not isinstance(row.get("question"), str):
        raise ValueError(f"{where}: a trajectory row needs a 'question' string")
    segs = row["segments"]
    if not isinstance(segs, list) or not segs or not all(
            isinstance(s, dict) and isinstance(s.get("text"), str) and s.get("loss") in (0, 1)
            for s in segs):
        raise ValueError(f"{where}: 'segments' must be a non-empty list of {{text: str, loss: "
                         "0 or 1}}")


def build_trajectory_example(row: dict, tokenizer, *, max_length: int = 1024,
                             use_chat_template: bool | None = None) -> Example:
    """The policy prompt of row["question"] + the segments; loss on `loss: 1` segments. Cut
    to max_length from the right."""
    tokens = prompt_ids(tokenizer, row["question"], use_chat_template)
    mask = [0] * len(tokens)
    for seg in row["segments"]:
        ids = tokenizer.encode(seg["text"], add_special_tokens=False)
        tokens += ids
        mask += [seg["loss"]] * len(ids)
    return Example(tokens[:max_length], mask[:max_length])


def build_example(row: dict, tokenizer, *, style: str = "finetuned", max_length: int = 1024,
                  use_chat_template: bool | None = None) -> Example:
    """A trajectory row: see build_trajectory_example. A simulator pair: prompt (the simulator prompt for this row's question, answer and label) + documents +
    EOS; only the documents and EOS are trained on. Documents are cut to fit max_length."""
    if "segments" in row:
        return build_trajectory_example(row, tokenizer, max_length=max_length,
                                        use_chat_template=use_chat_template)
    request = SearchRequest(row["query"], row["question"], tuple(row["golden_answers"]),
                            noisy=row["label"] == "noisy")
    prompt = simulator_prompt(request, style)
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    doc_ids = tokenizer.encode(row["documents"].strip(), add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        doc_ids.append(tokenizer.eos_token_id)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the simulator prompt alone has {len(prompt_ids)} tokens, over "
                         f"max_length={max_length}")
    doc_ids = doc_ids[:room]
    return Example(prompt_ids + doc_ids, [0] * len(prompt_ids) + [1] * len(doc_ids))


def batches(examples: list[Example], batch_size: int, *, seed: int, start: int = 0,
            length_multiple: int = 64):
    """An endless, deterministic stream of (position, tokens [B, L], attention [B, L],
    loss mask [B, L]). Position p is the p-th batch since the start: resuming at p replays
    exactly what an uninterrupted run would see next."""
    n = len(examples)
    per_epoch = max(1, n // batch_size)
    position = start
    while True:
        epoch, k = divmod(position, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        if n < batch_size:
            order = np.resize(order, batch_size)
        rows = [examples[i] for i in order[k * batch_size:(k + 1) * batch_size]]
        width = -(-max(len(r.tokens) for r in rows) // length_multiple) * length_multiple
        tokens = np.zeros((batch_size, width), np.int32)
        attn = np.zeros((batch_size, width), bool)
        mask = np.zeros((batch_size, width), np.float32)
        for i, r in enumerate(rows):
            tokens[i, :len(r.tokens)] = r.tokens
            attn[i, :len(r.tokens)] = True
            mask[i, :len(r.tokens)] = r.loss_mask
        position += 1
        yield position, tokens, attn, mask
