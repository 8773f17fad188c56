"""Diagnostic: greedy F1 with the world's search engine on training questions against the test
questions, which tells reading the documents (both high) from memorising the training answers
(training high, test low).

    python -m zsjax.experiments.train_vs_test --workdir runs/claims   # a finished full claims run
    python -m zsjax.experiments.train_vs_test --demo runs/demo        # a finished demo
    python -m zsjax.experiments.train_vs_test --demo runs/demo --model copy
    python -m zsjax.experiments.train_vs_test --demo runs/demo --model warm --sampled 4

With --workdir: 28 training questions against the 28 test questions, for the engine-,
curriculum- and no-noise-trained policies of seeds 0-2, and two failed test trajectories of
each seed-0 policy (docs/RESULTS.md quotes the output, WORKDIR/train_vs_test.json). With
--demo: every training and test question of the demo's world (its seed and settings from
summary.json), the policy after RL, per question type, with the share of questions whose first
search names the question's entity (WORKDIR/train_vs_test.json; docs/DEMO.md quotes it);
`--model copy` or `warm` scores the warm start's stages instead
(WORKDIR/train_vs_test_copy.json, ..._warm.json). `--sampled K` samples each question K
times at temperature 1, as RL's rollouts do, and adds the share of answers that name an entity
of their own documents (`answer_in_documents`): the warm start's rate is what RL starts from
(docs/DEMO.md, why the format stage has 1600 steps; ..._sampled.json). Not part of either
command.
"""
import argparse
import json
import os
import random

from zsjax.demo import run as demo
from zsjax.demo import world as W
from zsjax.evaluate import load_policy
from zsjax.search import ModelTurnGenerator, RolloutSettings, rollout
from zsjax.rl import rewards


def engine_scorer(policy_dir: str, world: W.World, docs: int, temperature: float = 0.0):
    """The policy loaded once; returns score(questions) -> (trajectories with the world's
    engine, greedy unless `temperature`, and their F1 as a NumPy array)."""
    settings = RolloutSettings(**demo._rollout(docs), temperature=temperature)
    config, params, tok = load_policy(policy_dir)
    gen = ModelTurnGenerator(config, params, tok, settings)
    engine = demo.engine_backend(world, docs)

    def score(questions: list[W.Question]):
        trajs = rollout([q.question for q in questions], [(q.answer,) for q in questions],
                        tokenizer=tok, generate_fn=gen, backend=engine, settings=settings,
                        seed=0)
        return trajs, rewards.score([t.answer for t in trajs],
                                    [t.golden_answers for t in trajs])["f1"]
    return score


def names_entity(question: W.Question, trajectory) -> bool:
    """Whether the trajectory's first search is for the entity the question names (its first
    hop), case and surrounding spaces aside."""
    return bool(trajectory.queries) and (
        trajectory.queries[0].strip().lower() == question.hops[0].lower())


def answer_in_documents(trajectory) -> bool:
    """Whether the trajectory's answer is, as whole words, in the documents its searches got
    (an empty or missing answer is not)."""
    answer = (trajectory.answer or "").strip()
    return bool(answer) and W.mentions(" ".join(trajectory.documents), answer)


def by_kind(questions: list[W.Question], f1, trajs=None, sampled: bool = False) -> dict:
    """F1 (and, given the trajectories, the share whose first search names the question's
    entity: `first_search_names_entity`; `sampled`: also the share whose answer is in their
    documents, `answer_in_documents`) over all questions and per question type."""
    out = {}
    for kind in ("all", "one_hop", "two_hop"):
        keep = [i for i, q in enumerate(questions) if kind == "all" or q.kind == kind]
        n = max(1, len(keep))
        out[kind] = {"n": len(keep), "f1": round(sum(float(f1[i]) for i in keep) / n, 3)}
        if trajs is not None:
            out[kind]["first_search_names_entity"] = round(
                sum(names_entity(questions[i], trajs[i]) for i in keep) / n, 3)
        if sampled:
            out[kind]["answer_in_documents"] = round(
                sum(answer_in_documents(trajs[i]) for i in keep) / n, 3)
    return out


DEMO_MODELS = {"rl": os.path.join("rl", "policy_hf"), "warm": "policy_warm_hf",
               "copy": "policy_copy_hf"}


def demo_workdir(workdir: str, model: str = "rl", sampled: int = 0) -> dict:
    """The demo's policy after RL (`model="rl"`), its warm start ("warm") or the warm start's
    first stage ("copy", which only learned to search for names): greedy F1 and first searches
    on every training and test question; with `sampled` K, each question K times at
    temperature 1, with the share of answers found in their documents."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    s = summary["settings"]
    world = W.make_world(seed=summary["seed"], **s["world"])
    splits = world.splits(tuple(s["splits"]))
    score = engine_scorer(os.path.join(workdir, DEMO_MODELS[model]), world, s["docs"],
                          temperature=1.0 if sampled else 0.0)
    out = {}
    for name in ("train", "test"):
        questions = [q for q in splits[name] for _ in range(max(1, sampled))]
        trajs, f1 = score(questions)
        out[name] = by_kind(questions, f1, trajs, sampled=bool(sampled))
        print(name, out[name], flush=True)
    return out


def claims_workdir(workdir: str) -> dict:
    s = demo.settings_for()
    world = W.make_world(seed=0, **s["world"])
    splits = world.splits(s["splits"])
    random.seed(0)
    train = random.sample(splits["train"], 28)
    test = splits["test"]
    out = {}
    for v in ["grpo_engine", "grpo_sim_curriculum", "grpo_sim_no_noise"]:
        for seed in (0, 1, 2):
            d = os.path.join(workdir, "runs", f"{v}_seed{seed}_steps{s['rl_steps']}", "rl",
                             "policy_hf")
            score = engine_scorer(d, world, s["docs"])
            row = {}
            for name, qs in (("train", train), ("test", test)):
                trajs, f1 = score(qs)
                row[name] = round(float(f1.mean()), 3)
                if name == "test" and seed == 0:
                    bad = [t for t, f in zip(trajs, f1) if f < 0.5][:2]
                    for t in bad:
                        print(f"--- {v} seed 0, test, golden {t.golden_answers}, "
                              f"answer {t.answer!r}")
                        print(t.response_text[:900])
            out[f"{v} seed {seed}"] = row
            print(v, seed, row, flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zsjax.experiments.train_vs_test")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="the claims command's workdir")
    where.add_argument("--demo", help="a finished demo's workdir")
    parser.add_argument("--model", choices=tuple(DEMO_MODELS), default="rl",
                        help="with --demo: the policy after RL (default), its warm start, or "
                             "the warm start's copy stage (does it copy held-out names, or did "
                             "it learn the world's names as a lookup?)")
    parser.add_argument("--sampled", type=int, default=0, metavar="K",
                        help="with --demo: sample each question K times at temperature 1 "
                             "(as RL does) instead of once greedily, and count the answers "
                             "found in their documents")
    args = parser.parse_args(argv)
    if args.workdir and (args.model != "rl" or args.sampled):
        parser.error("--model and --sampled are for --demo")
    if args.sampled < 0:
        parser.error(f"--sampled must be >= 0; got {args.sampled}")
    workdir = args.workdir or args.demo
    out = (claims_workdir(workdir) if args.workdir
           else demo_workdir(workdir, args.model, args.sampled))
    name = "train_vs_test.json" if args.model == "rl" else f"train_vs_test_{args.model}.json"
    if args.sampled:
        name = name.replace(".json", "_sampled.json")
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
