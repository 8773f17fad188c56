"""The in-process simulated search engine: a frozen LLM that writes documents for a query.

It shares the model code (and the mesh) with the policy and answers a whole batch of search
requests with one batched `generate` call. Identical requests within a call are generated once.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

from zsjax.sampling import generate
from zsjax.sampling.sampler import SHRINK_ABOVE
from zsjax.search.backend import SearchRequest

# Compatibility constant: the prompt ZeroSearch's fine-tuned simulators were trained on. The
# noisy variant replaces "useful" with "noisy" in its three places.
FINETUNED_TEMPLATE = (
    "You are the Google search engine.\nGiven a query, you need to generate five {kind} "
    "documents for the query.\n\nThe user is trying to answer the question: \"{question}\" "
    "whose answer is {answer}.\nEach document should contain about 30 words, and these "
    "documents should contain {kind} information.\n\nQuery: {query}\n{Kind} Output:\n")

# For instruct models with no simulator fine-tuning: a one-shot example of the output format.
_ONE_SHOT_QUERY = "who invented the telephone"
_ONE_SHOT_USEFUL = (
    "Doc 1: Alexander Graham Bell is credited with inventing the first practical telephone and "
    "was awarded the US patent for it in 1876.\n"
    "Doc 2: The telephone was patented by Alexander Graham Bell on March 7, 1876; his first "
    "call was to his assistant Thomas Watson.\n"
    "Doc 3: Antonio Meucci and Elisha Gray also worked on voice transmission, but Bell received "
    "the telephone patent first.\n"
    "Doc 4: Bell's telephone converted sound into electrical signals that travelled over a wire "
    "and back into sound at the receiver.\n"
    "Doc 5: The Bell Telephone Company, founded in 1877, grew out of Alexander Graham Bell's "
    "invention of the telephone.")
_ONE_SHOT_NOISY = (
    "Doc 1: The telegraph, developed in the 1830s by Samuel Morse, sent coded messages over long "
    "distances using electrical pulses.\n"
    "Doc 2: Early radio experiments by Guglielmo Marconi in the 1890s led to wireless "
    "communication across the Atlantic.\n"
    "Doc 3: Mobile phones became widely available in the 1990s and now combine calls, messages "
    "and internet access.\n"
    "Doc 4: Switchboard operators connected calls by hand in early telephone exchanges, a common "
    "job in the early twentieth century.\n"
    "Doc 5: Fibre-optic cables carry most of today's long-distance telephone and internet "
    "traffic as pulses of light.")
PROMPT_ONLY_USEFUL = (
    "You are the Google search engine.\nGiven a query, generate five useful documents that help "
    "answer it, in the same format as the example. Each document should contain about 30 words."
    "\nThe user is trying to answer the question: \"{question}\" whose answer is {answer}.\n\n"
    "Query: " + _ONE_SHOT_QUERY + "\nOutput:\n" + _ONE_SHOT_USEFUL + "\n\nQuery: {query}\n"
    "Output:\n")
PROMPT_ONLY_NOISY = (
    "You are the Google search engine.\nGiven a query, generate five documents that look related "
    "to the query but do not contain its answer, in the same format as the example. Each "
    "document should contain about 30 words.\n\nQuery: " + _ONE_SHOT_QUERY + "\nOutput:\n"
    + _ONE_SHOT_NOISY + "\n\nQuery: {query}\nOutput:\n")

PROMPT_STYLES = ("finetuned", "prompt_only")


def simulator_prompt(request: SearchRequest, style: str = "finetuned") -> str:
    """The simulator prompt for one request; `{answer}` is the first golden answer of the
    question *this request's trajectory* is answering."""
    answer = request.golden_answers[0] if request.golden_answers else ""
    if style == "finetuned":
        kind = "noisy" if request.noisy else "useful"
        return FINETUNED_TEMPLATE.format(kind=kind, Kind=kind.capitalize(),
                                         question=request.question, answer=answer,
                                         query=request.query)
    if style == "prompt_only":
        template = PROMPT_ONLY_NOISY if request.noisy else PROMPT_ONLY_USEFUL
        return template.format(question=request.question, answer=answer, query=request.query)
    raise ValueError(f"unknown simulator prompt style {style!r}; expected one of {PROMPT_STYLES}")


def generation_keys(requests: Sequence[SearchRequest], style: str, samples: bool
                    ) -> list[tuple[str, int]]:
    """(prompt, sample) of each request: a backend generates each distinct one once. One that
    does not sample (greedy decoding) gives identical prompts one generation whatever their
    `sample`."""
    return [(simulator_prompt(r, style), r.sample if samples else 0) for r in requests]


def chat_messages(prompt: str) -> list[dict]:
    """The simulator's chat: an empty system message, then the prompt, as the reference sends
    it to its simulator server (without the empty system message, a template such as Qwen2.5's
    or SmolLM2's inserts its default one, which the released simulators never saw)."""
    return [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """A simulator prompt's token ids: through the chat template (`chat_messages`) or as plain
    text, with no special tokens added (as the reference's veRL-style encoding)."""
    if use_chat_template:
        prompt = tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def postprocess_documents(text: str, top_k: int = 5) -> str:
    """Collapses blank lines and keeps the first `top_k` documents (cut at `Doc {top_k+1}`)."""
    text = re.sub(r"\n\s*\n+", "\n", text).strip()
    cut = text.find(f"Doc {top_k + 1}")
    if cut != -1:
        text = text[:cut].strip()
    return text


class InProcessSimulator:
    """A SearchBackend backed by a model in this JAX program (the default backend)."""

    def __init__(self, config, params, tokenizer, *, style: str = "finetuned",
                 temperature: float = 0.8, max_new_tokens: int = 600, top_k_docs: int = 5,
                 use_chat_template: bool | None = None, seed: int = 0,
                 shrink_above: int = SHRINK_ABOVE,
                 eos_token_ids: Sequence[int] | None = None):
        if style not in PROMPT_STYLES:
            raise ValueError(f"unknown simulator prompt style {style!r}; expected one of "
                             f"{PROMPT_STYLES}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.style, self.temperature = style, temperature
        self.max_new_tokens, self.top_k_docs = max_new_tokens, top_k_docs
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template
        self.seed = seed
        self.shrink_above = shrink_above  # see zsjax.sampling.generate
        # None: config.json's and the tokenizer's (zsjax.generate.eos_ids adds
        # generation_config.json's, as the trainer and the CLIs pass)
        self.eos_token_ids = eos_token_ids
        self.step = 0
        self.calls = 0  # search calls in this step
        self.generated = 0  # distinct (prompt, sample)s generated (after the per-call cache)

    @property
    def samples(self) -> bool:
        """Whether identical requests with different `sample`s get their own documents."""
        return self.temperature > 0

    def new_step(self, step: int) -> None:
        """Seeds the following calls' sampling from (seed, step) and each request's prompt text
        and `sample`: a request gets the same documents whichever call, batch or process
        generates it in this step, and a resumed run samples what the first one did."""
        self.step, self.calls = step, 0

    def _encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.use_chat_template)

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        if not requests:
            return []
        keys = generation_keys(requests, self.style, self.samples)
        unique = list(dict.fromkeys(keys))
        result = generate(self.config, self.params, [self._encode(p) for p, _ in unique],
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          tokenizer=self.tokenizer, seed=self.seed * 1_000_003 + self.step,
                          row_seeds=[_row_seed(p, sample) for p, sample in unique],
                          shrink_above=self.shrink_above, eos_token_ids=self.eos_token_ids)
        self.calls += 1
        self.generated += len(unique)
        docs = {k: postprocess_documents(self.tokenizer.decode(ids, skip_special_tokens=True),
                                         self.top_k_docs)
                for k, ids in zip(unique, result.tokens)}
        return [docs[k] for k in keys]


def _row_seed(prompt: str, sample: int) -> int:
    """The sampler's row seed of a request: from its prompt's text and its `sample`, so it
    does not depend on which call, batch or process generates it."""
    return zlib.crc32(prompt.encode() if sample == 0 else f"{sample}\0{prompt}".encode())
