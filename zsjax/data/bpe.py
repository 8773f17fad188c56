"""A byte-level BPE tokenizer trained on the spot with the `tokenizers` library, as a
transformers fast tokenizer: what the tiny fixture, the demo's world and the tests build their
models' tokenizers with. Nothing is downloaded; the same texts give the same tokenizer."""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# ChatML's special tokens and a ChatML chat template of the SmolLM2 / Qwen2.5 kind (a default
# system message when the chat has none), written here, not copied from a model: for tokenizers
# that must apply chat templates as instruct models' do.
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_bpe(texts: Sequence[str], *, vocab_size: int, specials: Sequence[str], eos: str,
              pad: str, extra_specials: Sequence[str] = (),
              chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (no prefix space; every byte in the alphabet, so any text encodes)
    trained on `texts` up to `vocab_size`, with `specials` as its first ids; `eos` and `pad`
    name two of them, `extra_specials` others the tokenizer must keep whole."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = {"additional_special_tokens": list(extra_specials)} if extra_specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token=pad, **extra)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
