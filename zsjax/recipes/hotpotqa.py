"""A real model learns to search: SmolLM2-135M-Instruct on real HotpotQA questions, with the whole
ZeroSearch recipe at the size a 2-core CPU can run.

    python -m zsjax.recipes.hotpotqa --workdir DIR [--quick] [--data DIR] [--model DIR]

Stages (a rerun skips the finished ones; an interrupted fine-tune or RL run resumes):
1. corpus: every distinct evidence passage of the train and test rows (`zsjax.data.corpus`), and
   its BM25 index (`zsjax.search.bm25`), cached beside it. The test passages are the engine's
   documents, as Wikipedia holds the answers of any benchmark; no test question is trained on.
2. simulator: `zsjax.sft` of SmolLM2 on (query, documents) pairs built from the train split only:
   useful = the question's gold evidence, noisy = BM25 hits of other questions' evidence without
   the answer, balanced (`zsjax.data.evidence_sft`). Then, on held-out test questions, greedy:
   how often its useful and its noisy documents contain the golden answer, against the
   prompt-only simulator (SmolLM2 as it is, with the prompt-only prompts).
3. cold_start: a short format SFT of the policy on train-split trajectories (think, search, BM25's
   documents with loss 0, answer a span of them, 30% with the golden answer, the answer's
   words out of the loss: the format is taught, the answer is left to the model).
4. rl: GRPO from the cold start against the fine-tuned simulator with the noise curriculum
   (configs/hotpotqa.py), and (not with --quick) the same run against BM25.
5. eval: greedy, on the held-out test rows (all 700; --quick: the first 150), per question type:
   each policy with BM25, with the simulator and without search; the policy before and after RL
   with the simulator on NQ, PopQA and Bamboogle (not with --quick).

The workdir ends with simulator_hf/, cold_start_hf/ (the policy before RL), policy_hf/ (after
RL against the simulator), summary.json, curves.png (RL) and results.png (test F1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

from zsjax import sft, train
from zsjax.cli import repo_config
from zsjax.data import evidence_sft as E
from zsjax.data.corpus import read_evidence_rows, write_corpus
from zsjax.data.evidence_sft import contains_answer
from zsjax.data.qa import read_qa
from zsjax.errors import InputError, Stopped
from zsjax.evaluate import load_policy
from zsjax.search import RolloutSettings, SearchRequest
from zsjax.search.bm25 import BM25Backend, BM25Index
from zsjax.search.evaluation import answer_without_search, evaluate
from zsjax.search.simulator import InProcessSimulator
from zsjax.tools import fetch_smollm2

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOP_10_OF_30 = r"embed|layers_([0-9]|1[0-9])'"  # param paths of SmolLM2's layers 0-19
BACKENDS = ("bm25", "simulator", "none")
OOD = ("nq", "popqa", "bamboogle")


def settings_for(quick: bool) -> dict:
    """Sizes and hyper-parameters of the full and the --quick recipe (the same stages; --quick
    takes fewer steps and questions, and skips the BM25-trained run and the other datasets)."""
    s = {
        "docs": 3,  # documents per search, from BM25 and from the simulator
        "sim_steps": 60, "sim_batch": 8, "sim_lr": 5e-5,
        "cold_steps": 60, "cold_batch": 8, "cold_lr": 5e-5, "gold_fraction": 0.3,
        # Fine-tunes and RL train SmolLM2's top 10 of 30 layers: the frozen embeddings and
        # lower layers need no backward pass (2.8x faster steps on a CPU).
        "freeze": TOP_10_OF_30,
        "test_rows": 700, "ood_rows": 100, "quality_rows": 64, "rl_bm25": True,
        "eval_batch": 64, "dtype": "bfloat16",
        # token budgets: a policy turn, the simulator's documents, an SFT row
        "response_tokens": 64, "sim_tokens": 160, "max_length": 768, "length_multiple": 128,
        "rl": {},  # overrides of configs/hotpotqa.py's values, {"group.key": value}
    }
    if quick:
        # The cold start keeps its 60 steps: after 20, SmolLM2 wrote the format's template
        # sentences into its searches and answers ("<answer> I can answer now. </answer>") and
        # scored F1 0.000 on 131 held-out questions with BM25.
        s.update(sim_steps=30, test_rows=150, ood_rows=0, quality_rows=32, rl_bm25=False)
    return s


def _log(msg: str) -> None:
    print(f"[hotpotqa] {msg}", file=sys.stderr, flush=True)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _write_jsonl(path: str, rows) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Stages:
    """Runs each stage once: its result (JSON) is kept in WORKDIR/stages/NAME.json, with the
    seconds it took and the process's peak memory so far; a rerun returns it without running."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def run(self, name: str, fn) -> dict:
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            _log(f"{name}: done in an earlier run ({result['seconds']:.0f} s), skipping")
            return result
        _log(f"{name}: starting")
        t = time.time()
        result = fn()
        result.update(seconds=time.time() - t, peak_rss_gb=_peak_rss_gb())
        _write_json(path, result)
        _log(f"{name}: done in {result['seconds']:.0f} s (peak memory {result['peak_rss_gb']:.1f}"
             " GB)")
        return result


# --- 1. data and corpus --------------------------------------------------------------------

def prepare_data(data_dir: str, workdir: str, s: dict) -> dict:
    """QA files for training and evaluation, the corpus of every evidence passage and the
    train-only corpus (the SFT data's engine); both indexed."""
    src = {split: os.path.join(data_dir, "hotpotqa", f"{split}.jsonl")
           for split in ("train", "test")}
    train, test = (read_evidence_rows(src[k]) for k in ("train", "test"))
    overlap = {r.question for r in train} & {r.question for r in test}
    if overlap:
        raise ValueError(f"{len(overlap)} test questions are also training questions, e.g. "
                         f"{sorted(overlap)[0]!r}")
    out = os.path.join(workdir, "data")
    os.makedirs(out, exist_ok=True)
    qa = lambda rows: [{"question": r.question, "golden_answers": list(r.golden_answers)}  # noqa
                       for r in rows]
    _write_jsonl(os.path.join(out, "train.jsonl"), qa(train))
    test = test[:s["test_rows"]]
    types = sorted({r.type or "untyped" for r in test})
    for kind in types:  # evaluated and reported by question type
        _write_jsonl(os.path.join(out, f"test_{kind}.jsonl"),
                     qa([r for r in test if (r.type or "untyped") == kind]))
    n = write_corpus([src["train"], src["test"]], os.path.join(out, "corpus.jsonl"))
    n_train = write_corpus([src["train"]], os.path.join(out, "train_corpus.jsonl"))
    for name in ("corpus", "train_corpus"):
        BM25Index(os.path.join(out, f"{name}.jsonl"))
    _log(f"corpus: {n} passages ({n_train} from the train split); {len(train)} train and "
         f"{len(test)} test questions")
    return {"passages": n, "train_passages": n_train, "train_questions": len(train),
            "test_questions": len(test),
            "test_types": {k: sum((r.type or "untyped") == k for r in test) for k in types}}


# --- 2-3. fine-tunes -----------------------------------------------------------------------

def finetune(model_dir: str, rows_path: str, workdir: str, export: str, *, steps: int,
             batch: int, lr: float, s: dict) -> None:
    """`zsjax.sft` of model_dir on rows_path, exported to `export` (an interrupted fine-tune
    resumes from its checkpoint)."""
    c = repo_config("sft_simulator", model_dir)
    c.unlock()
    c.model.dtype = s["dtype"]
    c.data.update(path=rows_path, max_length=s["max_length"],
                  length_multiple=s["length_multiple"])
    c.train.update(steps=steps, batch_size=batch, micro_batches=2, lr=lr, warmup_steps=5,
                   weight_decay=0.0, log_every=5, checkpoint_every=10, keep_checkpoints=1,
                   freeze=s["freeze"])
    c.mesh.update(data=1)
    c.export_dir = export
    c.lock()
    sft.run(c, workdir)


def simulator_quality(sim_dir: str, base_dir: str, rows, s: dict) -> dict:
    """On held-out test questions (the question as the query, greedy): the fraction of useful
    and of noisy responses (and of their documents) that contain a golden answer, for the
    fine-tuned simulator and for the prompt-only one (the base model, prompt-only prompts)."""
    out = {}
    for name, path, style in (("finetuned", sim_dir, "finetuned"),
                              ("prompt_only", base_dir, "prompt_only")):
        config, params, tok = load_policy(path, dtype=s["dtype"])
        sim = InProcessSimulator(config, params, tok, style=style, temperature=0.0,
                                 max_new_tokens=s["sim_tokens"], top_k_docs=s["docs"])
        res = {}
        for label in ("useful", "noisy"):
            reqs = [SearchRequest(r.question, r.question, r.golden_answers, label == "noisy")
                    for r in rows]
            texts = sim.search(reqs)
            docs = [[d for d in t.splitlines() if d.strip()] for t in texts]
            res[label] = {
                "responses_with_answer": sum(contains_answer(t, r.golden_answers)
                                             for t, r in zip(texts, rows)) / len(rows),
                "documents_with_answer": (sum(contains_answer(d, r.golden_answers)
                                              for ds, r in zip(docs, rows) for d in ds)
                                          / max(1, sum(map(len, docs)))),
                "documents_per_response": sum(map(len, docs)) / len(rows),
                "example": {"query": rows[0].question, "answer": rows[0].golden_answers[0],
                            "documents": texts[0]}}
        out[name] = res
        _log(f"simulator ({name}): useful responses with the answer "
             f"{res['useful']['responses_with_answer']:.0%}, noisy "
             f"{res['noisy']['responses_with_answer']:.0%}")
    out["n"] = len(rows)
    return out


# --- 4. RL ---------------------------------------------------------------------------------

def rl(workdir: str, name: str, backend: str, quick: bool, paths: dict, s: dict) -> str:
    """GRPO (configs/hotpotqa.py) from the cold start; returns its exported policy folder."""
    c = repo_config("hotpotqa", backend + (",quick" if quick else ""))
    c.unlock()
    for key, value in s["rl"].items():
        group, field = key.split(".")
        c[group][field] = value
    c.policy.path = paths["cold_start"]
    c.data.train_path = paths["train"]
    if backend == "simulator":
        c.simulator.path = paths["simulator"]
    else:
        c.backend.corpus = paths["corpus"]
    c.lock()
    out = os.path.join(workdir, name)
    train.run(c, out)
    return os.path.join(out, "policy_hf")


# --- 5. evaluation -------------------------------------------------------------------------

def _combine(parts: dict) -> dict:
    """The question-weighted mean of per-type results."""
    n = sum(r["n"] for r in parts.values())
    keys = ("f1", "exact_match", "substring_match", "searches_mean", "answered_fraction")
    return {"n": n, **{k: sum(r[k] * r["n"] for r in parts.values()) / n for k in keys}}


class Evaluator:
    """Greedy evaluation of the policies, each (policy, backend, dataset) result kept in
    WORKDIR/eval/ (results and per-question records) so that a rerun skips it."""

    def __init__(self, workdir: str, s: dict, paths: dict):
        self.dir = os.path.join(workdir, "eval")
        os.makedirs(self.dir, exist_ok=True)
        self.s, self.paths = s, paths
        self.settings = RolloutSettings(max_turns=2, max_response_tokens=s["response_tokens"],
                                        max_prompt_tokens=1024, max_obs_tokens=256,
                                        temperature=0.0)
        self._backends: dict = {}

    def backend(self, kind: str):
        if kind not in self._backends:
            if kind == "bm25":
                self._backends[kind] = BM25Backend(self.paths["corpus"], top_k=self.s["docs"])
            else:  # the fine-tuned simulator's useful documents, greedy
                config, params, tok = load_policy(self.paths["simulator"], dtype=self.s["dtype"])
                self._backends[kind] = InProcessSimulator(
                    config, params, tok, temperature=0.0, max_new_tokens=self.s["sim_tokens"],
                    top_k_docs=self.s["docs"])
        return self._backends[kind]

    def run(self, policy: str, backend: str, datasets: dict) -> dict:
        """{dataset: results} of one policy (a name of self.paths) with one backend (or none)."""
        todo = {name: rows for name, rows in datasets.items()
                if not os.path.exists(self._path(policy, backend, name, "json"))}
        if todo:
            config, params, tok = load_policy(self.paths[policy], dtype=self.s["dtype"])
            _log(f"eval: {policy} with {backend}: {', '.join(f'{k} ({len(v)})' for k, v in todo.items())}")
            for name, rows in todo.items():
                records: dict = {}
                if backend == "none":
                    res = answer_without_search(config, params, tok, rows,
                                                batch_size=self.s["eval_batch"])
                else:
                    res = evaluate(config, params, tok, {name: rows}, self.backend(backend),
                                   settings=self.settings, batch_size=self.s["eval_batch"],
                                   progress=True, records=records)[name]
                _write_jsonl(self._path(policy, backend, name, "jsonl"), records.get(name, []))
                _write_json(self._path(policy, backend, name, "json"), res)
                _log(f"eval: {policy} / {backend} / {name}: F1 {res['f1']:.3f}, answered "
                     f"{res['answered_fraction']:.0%}, searches {res['searches_mean']:.2f} "
                     f"({res['seconds']:.0f} s)")
        out = {}
        for name in datasets:
            with open(self._path(policy, backend, name, "json")) as f:
                out[name] = json.load(f)
        return out

    def _path(self, policy: str, backend: str, dataset: str, ext: str) -> str:
        return os.path.join(self.dir, f"{policy}__{backend}__{dataset}.{ext}")

    def records(self, policy: str, backend: str, dataset: str) -> list[dict]:
        with open(self._path(policy, backend, dataset, "jsonl")) as f:
            return [json.loads(line) for line in f]


def evaluate_all(ev: Evaluator, policies: list[str], data_dir: str, workdir: str,
                 s: dict, types: list[str]) -> dict:
    test = {k: read_qa(os.path.join(workdir, "data", f"test_{k}.jsonl")) for k in types}
    table = {}
    for policy in policies:
        table[policy] = {}
        backends = BACKENDS if policy != "policy_bm25" else ("bm25",)
        for backend in backends:
            parts = ev.run(policy, backend, test)
            table[policy][backend] = {**parts, "all": _combine(parts)}
    ood = {}
    if s["ood_rows"]:
        sets = {name: read_qa(os.path.join(data_dir, "qa", f"{name}.test.jsonl"))[:s["ood_rows"]]
                for name in OOD}
        for policy in ("cold_start", "policy"):
            ood[policy] = ev.run(policy, "simulator", sets)
    return {"hotpotqa_test": table, "other_datasets": ood}


def example_trajectories(ev: Evaluator, types: list[str]) -> dict:
    """One held-out question, with BM25: the cold start's trajectory and the RL policy's, on a
    question the RL policy answered right and the cold start did not (the first such)."""
    for kind in types:
        before = ev.records("cold_start", "bm25", kind)
        after = ev.records("policy", "bm25", kind)
        for b, a in zip(before, after):
            if a["f1"] > b["f1"] and a["f1"] == 1.0:
                return {"type": kind, "question": a["question"],
                        "golden_answers": a["golden_answers"], "before_rl": b, "after_rl": a}
    return {}


# --- plots ---------------------------------------------------------------------------------

def _smooth(xs, k: int = 5):
    out = []
    for i in range(len(xs)):
        window = [x for x in xs[max(0, i - k + 1):i + 1] if x is not None]
        out.append(sum(window) / len(window) if window else None)
    return out


def plot_curves(runs: dict, out: str) -> None:
    """RL curves of each run: reward, valid-answer rate, searches, the curriculum."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for name, path in runs.items():
        if not os.path.exists(path):
            continue
        rows = [json.loads(x) for x in open(path)]
        steps = [r["step"] for r in rows]
        line, = ax[0].plot(steps, [r["reward_mean"] for r in rows], alpha=0.35)
        ax[0].plot(steps, _smooth([r["reward_mean"] for r in rows]), color=line.get_color(),
                   label=f"{name} (5-step mean)")
        ax[1].plot(steps, _smooth([r["valid_answer_rate"] for r in rows]),
                   color=line.get_color(), label=name)
        ax[2].plot(steps, _smooth([r["searches_mean"] for r in rows]), color=line.get_color(),
                   label=name)
        ax[3].plot(steps, [r["noise_prob"] for r in rows], color=line.get_color(),
                   label=f"{name}: noise probability")
    titles = ("training reward (F1 of sampled rollouts)", "answered (valid format)",
              "searches per rollout", "curriculum")
    ylabels = ("F1", "fraction of rollouts", "searches", "probability a search is noisy")
    for a, title, ylabel in zip(ax, titles, ylabels):
        a.set_title(title)
        a.set_xlabel("RL step")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_results(table: dict, out: str) -> None:
    """Held-out test F1 of each policy with each backend, by question type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    labels = {"cold_start": "cold start (before RL)", "policy": "RL vs simulator",
              "policy_bm25": "RL vs BM25"}
    types = [t for t in next(iter(table.values()))["bm25"] if t != "all"]
    cols = [(b, t) for b in BACKENDS for t in ["all"] + types]
    fig, ax = plt.subplots(figsize=(13, 4.2))
    width = 0.8 / len(table)
    for i, (policy, by_backend) in enumerate(table.items()):
        ys = [by_backend.get(b, {}).get(t, {}).get("f1", np.nan) for b, t in cols]
        xs = np.arange(len(cols)) + i * width
        bars = ax.bar(xs, ys, width, label=labels.get(policy, policy))
        for x, y in zip(xs, ys):
            if not np.isnan(y):
                ax.text(x, y + 0.005, f"{y:.2f}", ha="center", fontsize=7)
        del bars
    ax.set_xticks(np.arange(len(cols)) + width * (len(table) - 1) / 2)
    ax.set_xticklabels([f"{'search: ' + b if b != 'none' else 'no search'}\n{t}"
                        for b, t in cols], fontsize=8)
    ax.set_ylabel("held-out test F1")
    ax.set_title("HotpotQA (hard) test F1, greedy: evaluated with BM25, with the fine-tuned "
                 "simulator, and without search")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- the pipeline --------------------------------------------------------------------------

def _link(target: str, link: str) -> None:
    """`link` -> `target` (relative, so the workdir can move); a copy where links fail."""
    if os.path.islink(link) or os.path.exists(link):
        return
    try:
        os.symlink(os.path.relpath(target, os.path.dirname(link)), link)
    except OSError:
        shutil.copytree(target, link)


def run(workdir: str, *, quick: bool = False, data_dir: str = DATA,
        model_dir: str | None = None, overrides: dict | None = None) -> dict:
    """Runs (or finishes) the recipe in `workdir`; returns the summary. `overrides` replace
    values of `settings_for(quick)` (the tests' tiny runs)."""
    t_start = time.time()
    s = {**settings_for(quick), **(overrides or {})}
    os.makedirs(workdir, exist_ok=True)
    _claim(workdir, quick, data_dir, model_dir)
    stages = Stages(workdir)
    data = os.path.join(workdir, "data")
    if model_dir is None:
        model_dir = fetch_smollm2.fetch()
    paths = {"base": model_dir, "train": os.path.join(data, "train.jsonl"),
             "corpus": os.path.join(data, "corpus.jsonl"),
             "simulator": os.path.join(workdir, "simulator_hf"),
             "cold_start": os.path.join(workdir, "cold_start_hf"),
             "policy": os.path.join(workdir, "policy_hf"),
             "policy_bm25": os.path.join(workdir, "rl_bm25", "policy_hf")}
    results = {"corpus": stages.run("corpus", lambda: prepare_data(data_dir, workdir, s))}
    train_rows = read_evidence_rows(os.path.join(data_dir, "hotpotqa", "train.jsonl"))
    test_rows = read_evidence_rows(os.path.join(data_dir, "hotpotqa", "test.jsonl"))

    def simulator_stage():
        index = BM25Index(os.path.join(data, "train_corpus.jsonl"))
        pairs = E.simulator_pairs(train_rows, index, docs=s["docs"])
        rows_path = _write_jsonl(os.path.join(data, "simulator_pairs.jsonl"), pairs)
        _log(f"simulator: fine-tuning on {len(pairs)} (query, documents) pairs from the train "
             f"split, {s['sim_steps']} steps of {s['sim_batch']}")
        finetune(model_dir, rows_path, os.path.join(workdir, "simulator_sft"),
                 paths["simulator"], steps=s["sim_steps"], batch=s["sim_batch"], lr=s["sim_lr"],
                 s=s)
        quality = simulator_quality(paths["simulator"], model_dir,
                                    test_rows[:s["quality_rows"]], s)
        return {"pairs": len(pairs), "steps": s["sim_steps"], "quality": quality}
    results["simulator"] = stages.run("simulator", simulator_stage)

    def cold_start_stage():
        index = BM25Index(os.path.join(data, "train_corpus.jsonl"))
        rows = E.cold_start_rows(train_rows, index, docs=s["docs"],
                                 gold_fraction=s["gold_fraction"])
        rows_path = _write_jsonl(os.path.join(data, "cold_start.jsonl"), rows)
        _log(f"cold start: format SFT on {len(rows)} train-split trajectories, "
             f"{s['cold_steps']} steps of {s['cold_batch']}")
        finetune(model_dir, rows_path, os.path.join(workdir, "cold_start_sft"),
                 paths["cold_start"], steps=s["cold_steps"], batch=s["cold_batch"],
                 lr=s["cold_lr"], s=s)
        return {"rows": len(rows), "steps": s["cold_steps"],
                "gold_fraction": s["gold_fraction"]}
    results["cold_start"] = stages.run("cold_start", cold_start_stage)

    def rl_stage(name, backend):
        def fn():
            exported = rl(workdir, name, backend, quick, paths, s)
            return {"policy_hf": exported, "steps": _last_step(workdir, name)}
        return fn
    results["rl"] = stages.run("rl", rl_stage("rl_simulator", "simulator"))
    _link(os.path.join(workdir, "rl_simulator", "policy_hf"), paths["policy"])
    policies = ["cold_start", "policy"]
    if s["rl_bm25"]:
        results["rl_bm25"] = stages.run("rl_bm25", rl_stage("rl_bm25", "bm25"))
        policies.append("policy_bm25")

    ev = Evaluator(workdir, s, paths)
    types = list(results["corpus"]["test_types"])
    results["eval"] = stages.run(
        "eval", lambda: evaluate_all(ev, policies, data_dir, workdir, s, types))
    example = example_trajectories(ev, types)
    runs = {"vs simulator": os.path.join(workdir, "rl_simulator", "metrics.jsonl"),
            "vs BM25": os.path.join(workdir, "rl_bm25", "metrics.jsonl")}
    plot_curves(runs, os.path.join(workdir, "curves.png"))
    table = results["eval"]["hotpotqa_test"]
    plot_results(table, os.path.join(workdir, "results.png"))
    summary = _summary(results, table, example, s, quick, t_start)
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(format_summary(summary))
    return summary


def _last_step(workdir: str, name: str) -> int:
    path = os.path.join(workdir, name, "metrics.jsonl")
    with open(path) as f:
        return max(json.loads(x)["step"] for x in f)


def _summary(results: dict, table: dict, example: dict, s: dict, quick: bool,
             t_start: float) -> dict:
    f1 = lambda p, b: table.get(p, {}).get(b, {}).get("all", {}).get("f1")  # noqa: E731
    stage_seconds = {k: v["seconds"] for k, v in results.items() if "seconds" in v}
    return {
        "quick": quick, "settings": s,
        "headline": {
            "test_f1_bm25": {p: f1(p, "bm25") for p in table},
            "test_f1_simulator": {p: f1(p, "simulator") for p in table},
            "test_f1_no_search": {p: f1(p, "none") for p in table},
            "rl_gain_bm25": (f1("policy", "bm25") - f1("cold_start", "bm25")),
            "rl_gain_simulator": (f1("policy", "simulator") - f1("cold_start", "simulator")),
            "cold_start_answered": table["cold_start"]["bm25"]["all"]["answered_fraction"],
            "policy_answered": table["policy"]["bm25"]["all"]["answered_fraction"]},
        "simulator_quality": results["simulator"]["quality"],
        "results": results["eval"], "example": example,
        "stage_seconds": stage_seconds,
        "peak_rss_gb": max(v.get("peak_rss_gb", 0) for v in results.values()),
        "minutes_this_run": (time.time() - t_start) / 60,
        "minutes_all_stages": sum(stage_seconds.values()) / 60}


def format_summary(summary: dict) -> str:
    h = summary["headline"]
    names = {"cold_start": "cold start", "policy": "RL vs simulator",
             "policy_bm25": "RL vs BM25"}
    lines = ["", "held-out HotpotQA test F1 (greedy)",
             f"{'policy':<18} {'BM25':>6} {'simulator':>10} {'no search':>10}"]
    for p in h["test_f1_bm25"]:
        vals = [h[k].get(p) for k in ("test_f1_bm25", "test_f1_simulator", "test_f1_no_search")]
        lines.append(f"{names.get(p, p):<18} " + " ".join(
            f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}" for v, w in zip(vals, (6, 10, 10))))
    q = summary["simulator_quality"]
    lines.append(f"simulator: useful responses with the answer {q['finetuned']['useful']['responses_with_answer']:.0%}"
                 f" fine-tuned, {q['prompt_only']['useful']['responses_with_answer']:.0%} prompt-only")
    lines.append(f"all stages: {summary['minutes_all_stages']:.1f} min; peak memory "
                 f"{summary['peak_rss_gb']:.1f} GB")
    return "\n".join(lines)


def _claim(workdir: str, quick: bool, data_dir: str, model_dir: str | None) -> None:
    """A workdir holds one recipe: a --quick one and a full one, or runs on other data or
    another model, do not share stages."""
    path = os.path.join(workdir, "recipe.json")
    mine = {"recipe": "hotpotqa", "quick": quick, "data": os.path.abspath(data_dir),
            "model": os.path.abspath(model_dir) if model_dir else None}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            diff = ", ".join(f"{k} {theirs.get(k)!r}" for k in mine if theirs.get(k) != mine[k])
            raise InputError(f"{workdir} holds a run of the recipe with {diff}; rerun it with "
                             "the same options, or pick another workdir")
        return
    _write_json(path, mine)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zsjax.recipes.hotpotqa",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and test questions, no BM25-trained run, no other datasets")
    p.add_argument("--data", default=DATA,
                   help="a folder with hotpotqa/{train,test}.jsonl and qa/{nq,popqa,bamboogle}"
                        ".test.jsonl (default: the copies in the package)")
    p.add_argument("--model", default=None,
                   help="SmolLM2-135M-Instruct as a Hugging Face folder (default: fetched by "
                        "zsjax.tools.fetch_smollm2)")
    args = p.parse_args(argv)
    for name in ("train", "test"):
        path = os.path.join(args.data, "hotpotqa", f"{name}.jsonl")
        if not os.path.isfile(path):
            p.error(f"--data {args.data}: {path} not found")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        os.environ.get("ZSJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "zsjax")),
        "jax_compile"))
    try:
        run(args.workdir, quick=args.quick, data_dir=args.data, model_dir=args.model)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
