"""Greedy evaluation of a search agent: every question rolled out, scored by F1, exact and
substring match, per dataset (`python -m zsjax.evaluate` and the trainer's periodic evaluation
call it); and answering without search, what a policy "knows" on its own."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, Sequence

import numpy as np

from zsjax.data.qa import QARow
from zsjax.progress import bar as progress_bar
from zsjax.rl import rewards
from zsjax.sampling import generate
from zsjax.search.backend import SearchBackend
from zsjax.search.curriculum import draw_rng
from zsjax.search.rollout import ModelTurnGenerator, RolloutSettings, prompt_ids, rollout


def evaluate(config, params, tokenizer, datasets: Mapping[str, Sequence[QARow]],
             backend: SearchBackend, *, settings: RolloutSettings, batch_size: int = 64,
             seed: int = 0, noise_probability: float = 0.0,
             eos_token_ids: Sequence[int] | None = None, progress: bool = False,
             records: dict | None = None, generator=ModelTurnGenerator) -> dict[str, dict]:
    """Greedy rollouts of every question, in batches; per dataset: n, exact_match,
    substring_match, f1 (means in [0, 1]), answered_fraction, searches_mean,
    response_tokens_mean and seconds. Question i of a dataset draws its noise from (seed, 0, i)
    and its search calls are numbered by i (`SearchRequest.sample`), whatever the batch size.
    `records`, a dict, gets each dataset's trajectories (`Trajectory.to_record`, with f1).
    `generator` builds the policy's turn generator (a scripted one in tests)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    settings = dataclasses.replace(settings, temperature=0.0)
    gen = generator(config, params, tokenizer, settings, eos_token_ids=eos_token_ids)
    results = {}
    for name, rows in datasets.items():
        if not rows:
            raise ValueError(f"dataset {name!r} has no rows")
        t0 = time.time()
        trajs = []
        if hasattr(backend, "new_step"):  # a sampled simulator: seeded per prompt
            backend.new_step(0)
        with progress_bar(len(rows), name, "q", disable=not progress) as bar:
            for lo in range(0, len(rows), batch_size):
                batch = rows[lo:lo + batch_size]
                # Question i is trajectory i whatever the batch size: the same draws.
                trajs += rollout([r.question for r in batch], [r.golden_answers for r in batch],
                                 tokenizer=tokenizer, generate_fn=gen, backend=backend,
                                 settings=settings, noise_probability=noise_probability,
                                 noise_rng=functools.partial(draw_rng, seed, 0), seed=seed,
                                 trajectory_ids=range(lo, lo + len(batch)))
                bar.update(len(batch))
        scores = rewards.score([t.answer for t in trajs], [t.golden_answers for t in trajs])
        if records is not None:
            records[name] = [{**t.to_record(), "f1": float(f1)}
                             for t, f1 in zip(trajs, scores["f1"])]
        results[name] = {
            "n": len(trajs),
            "exact_match": float(scores["em"].mean()),
            "substring_match": float(scores["substring"].mean()),
            "f1": float(scores["f1"].mean()),
            "answered_fraction": float(np.mean([t.answered for t in trajs])),
            "searches_mean": float(np.mean([t.num_searches for t in trajs])),
            "response_tokens_mean": float(np.mean([len(t.response_ids) for t in trajs])),
            "seconds": time.time() - t0}
    return results


def answer_without_search(config, params, tokenizer, rows: Sequence[QARow], *,
                          max_new_tokens: int = 16, batch_size: int | None = None,
                          eos_token_ids: Sequence[int] | None = None) -> dict:
    """Scores of answering at once, what the policy "knows" without searching: the policy
    prompt followed by a forced `<answer>`, greedy to `</answer>`; keys as `evaluate`'s
    (searches_mean 0). `batch_size`: rows per generation (None: all at once)."""
    if not rows:
        raise ValueError("answer_without_search: no rows")
    t0 = time.time()
    forced = tokenizer.encode("<answer>", add_special_tokens=False)
    prompts = [prompt_ids(tokenizer, r.question) + forced for r in rows]
    step = batch_size or len(prompts)
    answers = []
    for lo in range(0, len(prompts), step):
        out = generate(config, params, prompts[lo:lo + step], max_new_tokens=max_new_tokens,
                       stop_strings=["</answer>"], tokenizer=tokenizer,
                       eos_token_ids=eos_token_ids)
        answers += [tokenizer.decode(t, skip_special_tokens=True).split("</answer>")[0].strip()
                    for t in out.tokens]
    scores = rewards.score(answers, [r.golden_answers for r in rows])
    return {"n": len(rows), "exact_match": float(scores["em"].mean()),
            "substring_match": float(scores["substring"].mean()),
            "f1": float(scores["f1"].mean()), "answered_fraction": 1.0, "searches_mean": 0.0,
            "response_tokens_mean": 0.0, "seconds": time.time() - t0}


def format_table(results: Mapping[str, dict]) -> str:
    """A plain-text table (scores in %), one row per dataset, plus their unweighted average (as
    the paper averages) when there are two or more."""
    rows = dict(results)
    if len(rows) >= 2:
        rows["average"] = {key: float(np.mean([r[key] for r in results.values()]))
                           for key in ("exact_match", "substring_match", "f1", "searches_mean",
                                       "answered_fraction")}
        rows["average"]["n"] = sum(r["n"] for r in results.values())
    width = max(len("dataset"), *(len(name) for name in rows))
    substring = 'substring "EM"*'
    lines = [f"{'dataset':<{width}}  {'n':>6}  {'exact match':>11}  {substring:>16}  "
             f"{'F1':>6}  {'searches':>8}  {'answered':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}  {r['n']:>6}  {100 * r['exact_match']:>11.1f}  "
                     f"{100 * r['substring_match']:>16.1f}  {100 * r['f1']:>6.1f}  "
                     f"{r['searches_mean']:>8.2f}  {100 * r['answered_fraction']:>8.1f}")
    lines.append('* the reference\'s "EM": a normalised golden answer is a substring of the '
                 "normalised prediction. Scores and answered: % of questions; searches: mean "
                 "per question.")
    return "\n".join(lines)
