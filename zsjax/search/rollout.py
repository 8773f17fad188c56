"""The ZeroSearch interaction, batched over all trajectories of a step.

Each turn, the open trajectories generate together (stopping at `</search>` or `</answer>`). The
first action tag decides: a search sends a request to the backend and appends its documents in
an information block; an answer closes the trajectory; anything else appends the invalid-action
text. After `max_turns` turns, trajectories still open get one final generation with no further
documents. Every appended token carries a loss mask: 1 for the policy's own tokens, 0 for
information blocks and invalid-action texts (and, implicitly, the prompt).

How a turn is generated is the TurnGenerator's business. `ModelTurnGenerator` either re-prefills
the whole context each turn (kept from the right at `max_prompt_tokens`: left truncation, as the
reference does) or keeps each open trajectory's KV cache between turns and prefills only the
new observation tokens (falling back to a re-prefill when a context outgrows the limit).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from zsjax import sharding
from zsjax.sampling import GenerateResult, continue_generate, generate
from zsjax.sampling.sampler import SHRINK_ABOVE
from zsjax.search import prompts as P
from zsjax.search.actions import extract_answer, parse_action
from zsjax.search.backend import SearchBackend, SearchRequest



@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    max_turns: int = 2  # paper: 2; later reference scripts: 5
    max_response_tokens: int = 500  # per turn
    max_prompt_tokens: int = 2048  # a turn's input is kept from the right at this length
    max_obs_tokens: int = 2048  # an information block is cut to this many tokens
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    use_chat_template: bool | None = None  # None: use it when the tokenizer has one

    def __post_init__(self):
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0; got {self.max_turns}")
        for name in ("max_response_tokens", "max_prompt_tokens", "max_obs_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


@dataclasses.dataclass
class Segment:
    kind: str  # "policy" | "information" | "invalid"
    text: str


@dataclasses.dataclass
class Trajectory:
    question: str
    golden_answers: tuple[str, ...]
    prompt_ids: list[int]
    response_ids: list[int] = dataclasses.field(default_factory=list)
    response_mask: list[int] = dataclasses.field(default_factory=list)  # 1 = policy token
    response_logprobs: list[float] = dataclasses.field(default_factory=list)  # 0 where mask 0
    # The model's own at the sampling temperature, without top-k/top-p (what a training forward
    # gives); 0 where mask 0.
    response_model_logprobs: list[float] = dataclasses.field(default_factory=list)
    queries: list[str] = dataclasses.field(default_factory=list)
    documents: list[str] = dataclasses.field(default_factory=list)  # per search, as returned
    noisy: list[bool] = dataclasses.field(default_factory=list)  # per search: the curriculum draw
    segments: list[Segment] = dataclasses.field(default_factory=list)
    answered: bool = False
    turns: int = 0
    response_text: str = ""
    full_text: str = ""
    answer: str | None = None

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    @property
    def token_ids(self) -> list[int]:
        """Prompt + response."""
        return self.prompt_ids + self.response_ids

    @property
    def loss_mask(self) -> np.ndarray:
        """[len(token_ids)] int32: 1 exactly on the policy's own tokens."""
        return np.array([0] * len(self.prompt_ids) + self.response_mask, np.int32)

    @property
    def logprobs(self) -> np.ndarray:
        """[len(token_ids)] float32: the sampler's logprobs on mask-1 tokens, 0 elsewhere."""
        return np.array([0.0] * len(self.prompt_ids) + self.response_logprobs, np.float32)

    @property
    def model_logprobs(self) -> np.ndarray:
        """[len(token_ids)] float32: the model's logprobs at the sampling temperature (no
        top-k/top-p) on mask-1 tokens, 0 elsewhere."""
        return np.array([0.0] * len(self.prompt_ids) + self.response_model_logprobs,
                        np.float32)

    def to_record(self) -> dict:
        """A JSON-able summary (for trajectory logs and `zsjax.tools.make_sft_data`)."""
        return {"question": self.question, "golden_answers": list(self.golden_answers),
                "answer": self.answer, "answered": self.answered, "turns": self.turns,
                "searches": [{"query": q, "documents": d, "noisy": n}
                             for q, d, n in zip(self.queries, self.documents, self.noisy)],
                "response": self.response_text}

    def _append(self, ids, mask_value, logprobs=None, model_logprobs=None):
        self.response_ids.extend(int(t) for t in ids)
        self.response_mask.extend([mask_value] * len(ids))
        for out, lps in ((self.response_logprobs, logprobs),
                         (self.response_model_logprobs, model_logprobs)):
            out.extend([0.0] * len(ids) if lps is None else (float(x) for x in lps))


def prompt_ids(tokenizer, question: str, use_chat_template: bool | None = None) -> list[int]:
    """The policy prompt (compatibility constant), through the chat template for instruct
    models; no special tokens added (no BOS: veRL encodes with add_special_tokens=False)."""
    text = P.policy_prompt(question)
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclasses.dataclass
class TurnInputs:
    """What a turn generator sees: the open trajectories (by index) and their contexts."""

    turn: int
    rows: list[int]  # trajectory indices generating this turn
    contexts: list[list[int]]  # prompt + response so far, kept from the right
    new_tokens: list[list[int]]  # appended since the row's previous turn (the prompt on turn 0)
    dropped_eos: list[bool]  # the row's previous turn ended in an EOS the rollout dropped
    truncated: list[bool]  # the context was cut at max_prompt_tokens
    max_new_tokens: int
    seed: int
    row_seeds: list[int] | None = None  # per-row sampling seeds: the trajectories' ids


class TurnGenerator(Protocol):
    def __call__(self, inputs: TurnInputs) -> GenerateResult:
        """One generation per row of `inputs`, in order."""


MIN_SHARED_PREFIX = 32  # tokens: a shorter common prefix is prefilled with each row


class ModelTurnGenerator:
    """Generates turns with `zsjax.sampling`, re-prefilling or reusing the KV cache.
    `shrink_above`: see `zsjax.sampling.generate` (0: the batch never shrinks, from turn to
    turn either).

    With KV reuse, the first turn prefills the rows' common prefix once (the policy prompt's
    instructions, 150 of SmolLM2's 170 prompt tokens) and copies its cache to every row, which
    then prefills only its own question: `share_prefix`. The prefix's cache is kept for the
    generator's next batches."""

    def __init__(self, config, params, tokenizer, settings: RolloutSettings, *,
                 kv_reuse: bool = True, eos_token_ids: Sequence[int] | None = None,
                 shrink_above: int = SHRINK_ABOVE, share_prefix: bool = True):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.settings, self.kv_reuse, self.eos_token_ids = settings, kv_reuse, eos_token_ids
        self.shrink_above, self.share_prefix = shrink_above, share_prefix
        self._session = None
        self._rows: list[int] = []
        self._prefix: tuple[tuple[int, ...], object] | None = None  # (tokens, its session)

    def _shared_prefix(self, contexts: list[list[int]]):
        """(the session of the contexts' common prefix, its length), or (None, 0) when it is
        shorter than MIN_SHARED_PREFIX; each row keeps at least one token of its own."""
        n = min(len(c) for c in contexts) - 1
        first = contexts[0]
        for c in contexts[1:]:
            n = next((i for i in range(n) if c[i] != first[i]), n)
        if n < MIN_SHARED_PREFIX:
            return None, 0
        key = tuple(first[:n])
        if self._prefix is None or self._prefix[0] != key:
            # A one-token generation fills the prefix's cache; the token is then forgotten.
            _, session = continue_generate(self.config, self.params, [list(key)], session=None,
                                           max_new_tokens=1, tokenizer=self.tokenizer,
                                           eos_token_ids=self.eos_token_ids, shrink_above=0)
            self._prefix = (key, session.drop_last_token([0]))
        return self._prefix[1], n

    def _kwargs(self, inputs: TurnInputs):
        s = self.settings
        return dict(max_new_tokens=inputs.max_new_tokens, temperature=s.temperature,
                    top_p=s.top_p, top_k=s.top_k, stop_strings=P.STOP_STRINGS,
                    tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids, seed=inputs.seed,
                    row_seeds=inputs.row_seeds, shrink_above=self.shrink_above)

    def __call__(self, inputs: TurnInputs) -> GenerateResult:
        if not self.kv_reuse:
            return generate(self.config, self.params, inputs.contexts, **self._kwargs(inputs))
        if inputs.turn == 0 or any(inputs.truncated) or self._session is None:
            session, chunks = None, inputs.contexts  # (re)start from whole contexts
            prefix, n = (self._shared_prefix(chunks) if self.share_prefix and len(chunks) > 1
                         else (None, 0))
            if prefix is not None:  # select() copies: the prefix's own cache stays as it is
                session = prefix.select([0] * len(chunks), mesh=_mesh_of(self.params))
                chunks = [c[n:] for c in chunks]
        else:
            where = {r: k for k, r in enumerate(self._rows)}
            session = self._session.drop_last_token(
                [where[r] for r, d in zip(inputs.rows, inputs.dropped_eos) if d])
            # shrink_above 0: the continuing rows stay in a batch of the first turn's size, so
            # every turn reuses the first turn's programs (a smaller batch compiles its own).
            batch = self._session.cache.valid.shape[0] if self.shrink_above == 0 else 0
            session = session.select([where[r] for r in inputs.rows],
                                     mesh=_mesh_of(self.params), batch=batch)
            chunks = inputs.new_tokens
        result, self._session = continue_generate(self.config, self.params, chunks,
                                                  session=session, **self._kwargs(inputs))
        self._rows = list(inputs.rows)
        return result


def _mesh_of(params):
    return sharding.mesh_of(params)


def rollout(questions: Sequence[str], golden_answers: Sequence[Sequence[str]], *, tokenizer,
            generate_fn: TurnGenerator, backend: SearchBackend,
            settings: RolloutSettings = RolloutSettings(), noise_probability: float = 0.0,
            noise_rng: Callable[[int], np.random.Generator] | None = None, seed: int = 0,
            trajectory_ids: Sequence[int] | None = None) -> list[Trajectory]:
    """Runs every question through the search agent; returns one Trajectory per question.

    Trajectory i has the id `trajectory_ids[i]` (default: i). Everything it draws at random is
    keyed by that id: its tokens (the sampler's per-row seeds) and whether each of its search
    calls is noisy (probability `noise_probability`, drawn from `noise_rng(id)`; default: a
    generator seeded by (seed, id)). So a batch split into parts, e.g. over processes, gives the
    trajectories the whole batch would.
    """
    if len(questions) != len(golden_answers):
        raise ValueError(f"{len(questions)} questions but {len(golden_answers)} golden-answer "
                         "lists")
    if not 0.0 <= noise_probability <= 1.0:
        raise ValueError(f"noise_probability must be in [0, 1]; got {noise_probability}")
    traj_ids = list(range(len(questions)) if trajectory_ids is None else trajectory_ids)
    if len(traj_ids) != len(questions):
        raise ValueError(f"{len(traj_ids)} trajectory ids for {len(questions)} questions")
    if noise_rng is None:
        noise_rng = lambda tid: np.random.default_rng([seed, tid])  # noqa: E731
    rngs = [noise_rng(tid) for tid in traj_ids]
    trajs = [Trajectory(question=q, golden_answers=tuple(g),
                        prompt_ids=prompt_ids(tokenizer, q, settings.use_chat_template))
             for q, g in zip(questions, golden_answers)]
    open_idx = list(range(len(trajs)))
    pending = [list(t.prompt_ids) for t in trajs]  # tokens each row has not generated after yet
    dropped = [False] * len(trajs)
    for turn in range(settings.max_turns + 1):
        if not open_idx:
            break
        final = turn == settings.max_turns
        contexts = [trajs[i].token_ids for i in open_idx]
        result = generate_fn(TurnInputs(
            turn=turn, rows=list(open_idx),
            contexts=[c[-settings.max_prompt_tokens:] for c in contexts],
            new_tokens=[pending[i] for i in open_idx], dropped_eos=[dropped[i] for i in open_idx],
            truncated=[len(c) > settings.max_prompt_tokens for c in contexts],
            max_new_tokens=settings.max_response_tokens, seed=seed * 1_000_003 + turn,
            row_seeds=[traj_ids[i] for i in open_idx]))
        if len(result.tokens) != len(open_idx):
            raise RuntimeError(f"turn generator returned {len(result.tokens)} generations for "
                               f"{len(open_idx)} trajectories")
        requests: list[SearchRequest] = []
        owners: list[int] = []
        invalid: list[int] = []
        still_open: list[int] = []
        for i, ids, lps, mlps, reason in zip(open_idx, result.tokens, result.logprobs,
                                             result.model_logprobs, result.finish_reasons):
            t = trajs[i]
            t.turns += 1
            ids, lps, mlps = list(ids), list(lps), list(mlps)
            text_ids = ids[:-1] if reason == "eos" else ids
            # The token completing a stop string is kept whole, even with text after the tag
            # (the reference re-tokenizes the text cut at the tag): docs/METHOD.md, departures.
            text = tokenizer.decode(text_ids, skip_special_tokens=False)
            action = parse_action(text)
            done = final or action.kind == "answer"
            dropped[i] = reason == "eos" and not done
            if dropped[i]:
                # The reference decodes with skip_special_tokens and continues: EOS is dropped.
                ids, lps, mlps = text_ids, lps[:-1], mlps[:-1]
            pending[i] = []
            t._append(ids, 1, lps, mlps)
            t.segments.append(Segment("policy", text))
            if done:
                t.answered = action.kind == "answer"
                continue
            still_open.append(i)
            if action.kind == "search":
                noisy = bool(rngs[i].random() < noise_probability)
                requests.append(SearchRequest(
                    action.content, t.question, t.golden_answers, noisy,
                    sample=traj_ids[i] * (settings.max_turns + 1) + turn + 1))
                owners.append(i)
                t.queries.append(action.content)
                t.noisy.append(noisy)
            else:
                invalid.append(i)
        documents = backend.search(requests) if requests else []
        if len(documents) != len(requests):
            raise RuntimeError(f"search backend returned {len(documents)} results for "
                               f"{len(requests)} requests")
        for i, docs in zip(owners, documents):
            trajs[i].documents.append(docs)
            pending[i] = _append_observation(trajs[i], P.information_block(docs), "information",
                                             tokenizer, settings.max_obs_tokens)
        for i in invalid:
            pending[i] = _append_observation(trajs[i], P.INVALID_ACTION, "invalid", tokenizer,
                                             settings.max_obs_tokens)
        open_idx = still_open
    for t in trajs:
        t.response_text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
        t.full_text = tokenizer.decode(t.token_ids, skip_special_tokens=False)
        # Only the policy's own text counts: the invalid-action text itself contains
        # "<answer> and </answer>", and simulator documents may contain answer tags too.
        answers = [extract_answer(s.text) for s in t.segments if s.kind == "policy"]
        t.answer = next((a for a in reversed(answers) if a is not None), None)
    return trajs


def _append_observation(t: Trajectory, text: str, kind: str, tokenizer, max_tokens: int
                        ) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    t._append(ids, 0)
    t.segments.append(Segment(kind, tokenizer.decode(ids, skip_special_tokens=False)))
    return ids
