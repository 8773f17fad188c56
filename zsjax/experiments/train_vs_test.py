"""Diagnostic for the claims run: greedy F1 with the world's search engine on 28 training
questions against the 28 test questions, for the engine-, curriculum- and no-noise-trained
policies of a finished full run, and two failed test trajectories of each seed-0 policy.

    python -m zsjax.experiments.train_vs_test --workdir runs/claims

Not part of the claims command; docs/RESULTS.md quotes its output (WORKDIR/train_vs_test.json).
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True, help="the claims command's workdir")
    workdir = parser.parse_args().workdir
    s = demo.settings_for()
    world = W.make_world(seed=0, **s["world"])
    splits = world.splits(s["splits"])
    random.seed(0)
    train = random.sample(splits["train"], 28)
    test = splits["test"]
    settings = RolloutSettings(**demo._rollout(s["docs"]), temperature=0.0)
    engine = demo.engine_backend(world, s["docs"])
    out = {}
    for v in ["grpo_engine", "grpo_sim_curriculum", "grpo_sim_no_noise"]:
        for seed in (0, 1, 2):
            d = os.path.join(workdir, "runs", f"{v}_seed{seed}_steps{s['rl_steps']}", "rl",
                             "policy_hf")
            config, params, tok = load_policy(d)
            gen = ModelTurnGenerator(config, params, tok, settings)
            row = {}
            for name, qs in (("train", train), ("test", test)):
                trajs = rollout([q.question for q in qs], [(q.answer,) for q in qs],
                                tokenizer=tok, generate_fn=gen, backend=engine,
                                settings=settings, seed=0)
                f1 = rewards.score([t.answer for t in trajs],
                                   [t.golden_answers for t in trajs])["f1"]
                row[name] = round(float(f1.mean()), 3)
                if name == "test" and seed == 0:
                    bad = [t for t, f in zip(trajs, f1) if f < 0.5][:2]
                    for t in bad:
                        print(f"--- {v} seed 0, test, golden {t.golden_answers}, "
                              f"answer {t.answer!r}")
                        print(t.response_text[:900])
            out[f"{v} seed {seed}"] = row
            print(v, seed, row, flush=True)
    with open(os.path.join(workdir, "train_vs_test.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
