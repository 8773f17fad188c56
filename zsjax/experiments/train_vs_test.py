"""Diagnostic: greedy F1 with the world's search engine on training questions against the test
questions, which tells reading the documents (both high) from memorising the training answers
(training high, test low).

    python -m zsjax.experiments.train_vs_test --workdir runs/claims   # a finished full claims run
    python -m zsjax.experiments.train_vs_test --demo runs/demo        # a finished demo

With --workdir: 28 training questions against the 28 test questions, for the engine-,
curriculum- and no-noise-trained policies of seeds 0-2, and two failed test trajectories of
each seed-0 policy (docs/RESULTS.md quotes the output, WORKDIR/train_vs_test.json). With
--demo: every training and test question of the demo's world (its seed and settings from
summary.json), the policy after RL, per question type (WORKDIR/train_vs_test.json;
docs/DEMO.md quotes it). Not part of either command.
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


def engine_scorer(policy_dir: str, world: W.World, docs: int):
    """The policy loaded once; returns score(questions) -> (greedy trajectories with the
    world's engine, their F1 as a NumPy array)."""
    settings = RolloutSettings(**demo._rollout(docs), temperature=0.0)
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


def by_kind(questions: list[W.Question], f1) -> dict:
    out = {"all": {"n": len(questions), "f1": round(float(f1.mean()), 3)}}
    for kind in ("one_hop", "two_hop"):
        xs = [float(f) for q, f in zip(questions, f1) if q.kind == kind]
        out[kind] = {"n": len(xs), "f1": round(sum(xs) / max(1, len(xs)), 3)}
    return out


def demo_workdir(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    s = summary["settings"]
    world = W.make_world(seed=summary["seed"], **s["world"])
    splits = world.splits(tuple(s["splits"]))
    score = engine_scorer(os.path.join(workdir, "rl", "policy_hf"), world, s["docs"])
    out = {}
    for name in ("train", "test"):
        _, f1 = score(splits[name])
        out[name] = by_kind(splits[name], f1)
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
    args = parser.parse_args(argv)
    workdir = args.workdir or args.demo
    out = claims_workdir(workdir) if args.workdir else demo_workdir(workdir)
    with open(os.path.join(workdir, "train_vs_test.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
