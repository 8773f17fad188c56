"""ZeroSearch's claims, measured in the demo's synthetic world: several seeds per variant, one
shared world, simulator and warm-started policy, the same RL budget for every variant.

    python -m zsjax.experiments.claims --workdir runs/claims [--quick] [--seeds 3]
                                       [--only grpo_sim_curriculum grpo_engine ...]
    python -m zsjax.experiments.claims --workdir runs/claims --report-only  # runs so far

The variants (all start from the same warm-started policy; `sim` = RL against the fine-tuned
simulator, `engine` = against the world's perfect search engine):

  grpo_sim_curriculum     GRPO, simulator, noise p from 0.0 to 0.5 (base 4): the ZeroSearch recipe
  grpo_engine             GRPO, the perfect search engine (no noise)
  grpo_sim_constant       GRPO, simulator, p = 0.25 throughout
  grpo_sim_no_noise       GRPO, simulator, p = 0
  ppo_sim_curriculum      PPO, as grpo_sim_curriculum
  reinforce_pp_sim_curriculum  REINFORCE++, as grpo_sim_curriculum

Each trained policy is evaluated greedily on the test questions with the simulator's useful
documents and with the perfect search engine, and answering without search. The claims:

  1. search pays: RL against the simulator lifts test F1 far above answering without search
     and above the warm-started policy;
  2. a simulator is as good as real search: evaluated with the search engine, the
     simulator-trained policy scores at least as well as the engine-trained one;
  3. the curriculum helps: at least as good as constant noise and as no noise;
  4. the algorithms compare: GRPO, PPO and REINFORCE++, final F1 and reward over steps.

Writes WORKDIR/claims.md (the table and each claim's verdict), WORKDIR/claims.json,
WORKDIR/reward_curves.png and WORKDIR/final_f1.png. Every (variant, seed) run keeps its own
folder; a run that finished is not run again, and one that was interrupted resumes from its
last checkpoint, so the command can simply be started again after a crash. `--report-only`
writes the same files from the runs finished so far, naming the others, and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Sequence

from zsjax import train
from zsjax.demo import run as demo

VARIANTS = {
    "grpo_sim_curriculum": {"algorithm": "grpo", "backend": "simulator", "noise": (0.0, 0.5)},
    "grpo_engine": {"algorithm": "grpo", "backend": "engine", "noise": (0.0, 0.0)},
    "grpo_sim_constant": {"algorithm": "grpo", "backend": "simulator", "noise": (0.25, 0.25)},
    "grpo_sim_no_noise": {"algorithm": "grpo", "backend": "simulator", "noise": (0.0, 0.0)},
    "ppo_sim_curriculum": {"algorithm": "ppo", "backend": "simulator", "noise": (0.0, 0.5)},
    "reinforce_pp_sim_curriculum": {"algorithm": "reinforce_pp", "backend": "simulator",
                                    "noise": (0.0, 0.5)},
}
CURRICULUM_BASE = 4.0
QUICK_RL_STEPS = 40  # --quick: the demo's world and warm start, fewer RL steps per run


def _log(msg: str) -> None:
    print(f"[claims] {msg}", file=sys.stderr, flush=True)


def run_dir(workdir: str, name: str, seed: int, rl_steps: int) -> str:
    # The budget is part of the name: a rerun with another budget never reuses (or resumes)
    # a run made under a different step count and curriculum schedule.
    return os.path.join(workdir, "runs", f"{name}_seed{seed}_steps{rl_steps}")


def finished(workdir: str, name: str, seed: int, rl_steps: int) -> dict | None:
    """The saved result of a finished (variant, seed) run, or None."""
    path = os.path.join(run_dir(workdir, name, seed, rl_steps), "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_one(name: str, seed: int, s: dict, prep: dict, workdir: str) -> dict:
    """Trains one (variant, seed) and evaluates it, saving the result in result.json (see
    `finished`); an interrupted training resumes from its checkpoint."""
    out_dir = run_dir(workdir, name, seed, s["rl_steps"])
    result_path = os.path.join(out_dir, "result.json")
    v = VARIANTS[name]
    world, docs = prep["world"], s["docs"]
    paths = {"policy": prep["warm_dir"], "simulator": prep["sim_dir"],
             "train": prep["paths"]["train"]}
    c = demo.rl_config(s, paths, v["algorithm"], seed)
    c.unlock()
    c.curriculum.update(start=v["noise"][0], end=v["noise"][1], base=CURRICULUM_BASE)
    c.train.progress = False
    c.resume = True  # an interrupted run continues from its checkpoint
    if v["backend"] == "engine":  # the world's engine, chosen by name like any backend
        demo.register_engine(world, docs)
        c.backend.kind = demo.ENGINE_KIND
    c.lock()
    train.run(c, os.path.join(out_dir, "rl"))
    evaluation = demo.evaluate_policy(os.path.join(out_dir, "rl", "policy_hf"), prep["sim_dir"],
                                      world, prep["splits"]["test"], docs)
    with open(os.path.join(out_dir, "rl", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    rewards = [m["reward_mean"] for m in metrics]
    rl_seconds = sum(m["step_s"] for m in metrics)  # right across resumes too
    result = {"variant": name, "seed": seed, **v, "noise": list(v["noise"]),
              "rl_steps": s["rl_steps"], "rl_seconds": rl_seconds, "rewards": rewards,
              "eval": evaluation}
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(result_path + ".tmp", result_path)
    return result


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def summarize(results: list[dict], before: dict) -> dict:
    """Per-variant mean and spread of the test scores and of the reward curve's last tenth."""
    table = {}
    for name in VARIANTS:
        rs = [r for r in results if r["variant"] == name]
        if not rs:
            continue
        tail = lambda r: statistics.fmean(r["rewards"][-max(1, len(r["rewards"]) // 10):])  # noqa: E731
        table[name] = {
            "f1_simulator": _stats([r["eval"]["simulator"]["all"]["f1"] for r in rs]),
            "f1_engine": _stats([r["eval"]["search_engine"]["all"]["f1"] for r in rs]),
            "f1_no_search": _stats([r["eval"]["no_search"]["all"]["f1"] for r in rs]),
            "f1_two_hop_engine": _stats([r["eval"]["search_engine"]["two_hop"]["f1"]
                                         for r in rs]),
            "searches_engine": _stats([r["eval"]["search_engine"]["all"]["searches_mean"]
                                       for r in rs]),
            "final_reward": _stats([tail(r) for r in rs]),
            "rl_minutes": _stats([r["rl_seconds"] / 60 for r in rs]),
        }
    return {"before_rl": {"f1_simulator": before["simulator"]["all"]["f1"],
                          "f1_engine": before["search_engine"]["all"]["f1"],
                          "f1_no_search": before["no_search"]["all"]["f1"]},
            "variants": table}


def at_least(a: dict, b: dict) -> tuple[str, str]:
    """Does variant a score at least as well as b? From two `_stats`: "yes" when a's mean is
    not below b's; "within noise" when it is below by at most twice the standard error of the
    difference of the means over seeds (sqrt(sd_a^2 / n_a + sd_b^2 / n_b)); "no" otherwise.
    With one seed on either side there is no noise estimate, so any shortfall is "no". Also
    returns a short text with the difference and its standard error."""
    diff = a["mean"] - b["mean"]
    if a["sd"] is None or b["sd"] is None:
        return ("yes" if diff >= 0 else "no"), f"difference {diff:+.3f} (one seed)"
    se = (a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]) ** 0.5
    verdict = "yes" if diff >= 0 else ("within noise" if -diff <= 2 * se else "no")
    return verdict, f"difference {diff:+.3f} ± {se:.3f}"


def verdicts(summary: dict) -> list[tuple[str, str, str]]:
    """(claim, the comparison in numbers, verdict) with verdict "yes", "no", "within noise"
    (see `at_least`) or "reported" (claim 4 names no direction). Claims whose variants did
    not run are left out."""
    t, b = summary["variants"], summary["before_rl"]
    m = lambda v, k: t[v][k]["mean"] if v in t else None  # noqa: E731
    out = []
    main = m("grpo_sim_curriculum", "f1_simulator")
    if main is not None:
        no_search = m("grpo_sim_curriculum", "f1_no_search")
        holds = main > max(no_search, b["f1_simulator"]) + 0.1
        out.append(("1. search pays",
                    f"F1 after RL (simulator) {main:.3f} vs without search {no_search:.3f} and "
                    f"the warm start {b['f1_simulator']:.3f} (holds if above both by > 0.1)",
                    "yes" if holds else "no"))
    if "grpo_sim_curriculum" in t and "grpo_engine" in t:
        verdict, diff = at_least(t["grpo_sim_curriculum"]["f1_engine"],
                                 t["grpo_engine"]["f1_engine"])
        out.append(("2. a simulator is as good as real search",
                    f"evaluated with the search engine: simulator-trained "
                    f"{m('grpo_sim_curriculum', 'f1_engine'):.3f} vs engine-trained "
                    f"{m('grpo_engine', 'f1_engine'):.3f}, {diff}", verdict))
    for other, label in (("grpo_sim_constant", "constant p = 0.25"),
                         ("grpo_sim_no_noise", "no noise")):
        if main is not None and other in t:
            verdict, diff = at_least(t["grpo_sim_curriculum"]["f1_simulator"],
                                     t[other]["f1_simulator"])
            out.append((f"3. the curriculum helps (vs {label})",
                        f"F1 (simulator) curriculum {main:.3f} vs {label} "
                        f"{m(other, 'f1_simulator'):.3f}, {diff}", verdict))
    algos = {a: m(f"{a}_sim_curriculum", "f1_simulator")
             for a in ("grpo", "ppo", "reinforce_pp")}
    if all(v is not None for v in algos.values()):
        out.append(("4. the algorithms compare",
                    ", ".join(f"{a} {v:.3f}" for a, v in algos.items())
                    + " (F1, simulator): reported, no direction claimed", "reported"))
    return out


def write_report(workdir: str, summary: dict, results: list[dict], command: str,
                 s: dict, missing: Sequence[str] = ()) -> str:
    t, b = summary["variants"], summary["before_rl"]
    fmt = lambda st: (f"{st['mean']:.3f} ± {st['sd']:.3f}" if st["sd"] is not None  # noqa: E731
                      else f"{st['mean']:.3f} (one seed)")
    seeds = sorted({r["seed"] for r in results})
    lines = ["# ZeroSearch's claims in the synthetic world", "",
             f"`{command}`: {s['rl_steps']} RL steps per run, {s['questions']} questions x "
             f"{s['rollouts']} rollouts a step, seeds {seeds}, test set of "
             f"{results[0]['eval']['simulator']['all']['n']} questions. Mean ± "
             "sample standard deviation over seeds.", "",
             f"Before RL (the shared warm start): F1 {b['f1_simulator']:.3f} with the simulator, "
             f"{b['f1_engine']:.3f} with the search engine, {b['f1_no_search']:.3f} without "
             "search.", ""]
    if missing:
        lines += [f"**Partial report:** {len(results)} of {len(results) + len(missing)} runs "
                  f"have finished. Not finished: {', '.join(missing)}.", ""]
    lines += ["| variant | F1, simulator | F1, search engine | F1 two-hop, engine | searches "
             "(engine) | F1 without search | reward, last 10% of steps | RL min |",
             "|---|---|---|---|---|---|---|---|"]
    for name, st in t.items():
        lines.append(f"| {name} | {fmt(st['f1_simulator'])} | {fmt(st['f1_engine'])} | "
                     f"{fmt(st['f1_two_hop_engine'])} | {st['searches_engine']['mean']:.2f} | "
                     f"{fmt(st['f1_no_search'])} | {fmt(st['final_reward'])} | "
                     f"{st['rl_minutes']['mean']:.1f} |")
    lines += ["", "| claim | measured (means over seeds) | holds |", "|---|---|---|"]
    for claim, text, verdict in verdicts(summary):
        lines.append(f"| {claim} | {text} | {'**no**' if verdict == 'no' else verdict} |")
    lines += ["", "A claim of \"at least as well\" is *within noise* when the mean falls short "
              "by no more than twice the standard error of the difference over seeds."]
    lines += ["", "Per-seed F1 (simulator): " + "; ".join(
        f"{name} {', '.join(f'{x:.3f}' for x in st['f1_simulator']['values'])}"
        for name, st in t.items()), ""]
    text = "\n".join(lines)
    with open(os.path.join(workdir, "claims.md"), "w") as f:
        f.write(text)
    return text


def plot(workdir: str, summary: dict, results: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name in names:
        curves = np.array([r["rewards"] for r in results if r["variant"] == name])
        k = min(5, curves.shape[1])  # moving average over steps
        smooth = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves])
        x = np.arange(smooth.shape[1]) + k
        ax.plot(x, smooth.mean(0), label=name)
        ax.fill_between(x, smooth.min(0), smooth.max(0), alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("training reward (F1), 5-step mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "reward_curves.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for i, (key, label) in enumerate((("f1_simulator", "simulator"),
                                      ("f1_engine", "search engine"))):
        means = [summary["variants"][n][key]["mean"] for n in names]
        ax.bar(np.arange(len(names)) + (i - 0.5) * width, means, width, label=label)
        for j, n in enumerate(names):
            vals = summary["variants"][n][key]["values"]
            ax.plot([j + (i - 0.5) * width] * len(vals), vals, "k.", ms=4)
    ax.axhline(summary["before_rl"]["f1_simulator"], color="gray", ls="--",
               label="warm start (simulator)")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=7)
    ax.set_ylabel("test F1 (dots: seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "final_f1.png"), dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zsjax.experiments.claims",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_RL_STEPS} RL steps per run instead of the demo's full budget")
    p.add_argument("--seeds", type=int, default=3, help="RL seeds per variant (at least 3 for "
                   "a spread)")
    p.add_argument("--rl-steps", type=int, default=None, help="override the RL budget")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report and plots from the runs finished so "
                        "far (say, while a long run is still going in another process); pass "
                        "the same --quick/--rl-steps, --seeds and --only as the runs")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    s = demo.settings_for()
    s["rl_steps"] = args.rl_steps or (QUICK_RL_STEPS if args.quick else s["rl_steps"])
    start = time.time()
    before_path = os.path.join(args.workdir, "shared", "eval_before.json")
    names = list(dict.fromkeys(args.only)) if args.only else list(VARIANTS)
    todo = [(n, seed) for seed in range(args.seeds) for n in names]
    results, missing = [], []
    if args.report_only:
        for name, seed in todo:
            r = finished(args.workdir, name, seed, s["rl_steps"])
            if r is None:
                missing.append(f"{name} seed {seed}")
            else:
                results.append(r)
        if not results:
            p.error(f"no finished runs of {s['rl_steps']} steps in {args.workdir}: nothing to "
                    "report (run without --report-only first; pass --quick or --rl-steps to "
                    "match the budget of the runs)")
        if not os.path.exists(before_path):
            p.error(f"{before_path} is missing (the warm start's evaluation, written before "
                    "the first run): is this the workdir the runs were made in?")
        with open(before_path) as f:
            before = json.load(f)
    else:
        os.makedirs(args.workdir, exist_ok=True)
        prep = demo.prepare(os.path.join(args.workdir, "shared"), s, seed=0)
        if os.path.exists(before_path):
            with open(before_path) as f:
                before = json.load(f)
        else:
            before = demo.evaluate_policy(prep["warm_dir"], prep["sim_dir"], prep["world"],
                                          prep["splits"]["test"], s["docs"])
            with open(before_path, "w") as f:
                json.dump(before, f, indent=1)
        for i, (name, seed) in enumerate(todo):
            t = time.time()
            r = finished(args.workdir, name, seed, s["rl_steps"])
            took = "finished earlier"
            if r is None:
                r = run_one(name, seed, s, prep, args.workdir)
                took = f"{time.time() - t:.0f} s"
            results.append(r)
            _log(f"[{i + 1}/{len(todo)}] {name} seed {seed}: test F1 "
                 f"{r['eval']['simulator']['all']['f1']:.3f} (simulator), "
                 f"{r['eval']['search_engine']['all']['f1']:.3f} (engine); {took}; "
                 f"{(time.time() - start) / 60:.1f} min so far")
    summary = summarize(results, before)
    # The command that made the runs (a --report-only call reports on runs made without it).
    command = "python -m zsjax.experiments.claims " + " ".join(
        a for a in (argv or sys.argv[1:]) if a != "--report-only")
    with open(os.path.join(args.workdir, "claims.json"), "w") as f:
        json.dump({"command": command, "settings": s, "summary": summary,
                   "verdicts": verdicts(summary), "missing": missing}, f, indent=1)
    print(write_report(args.workdir, summary, results, command, s, missing))
    plot(args.workdir, summary, results)
    _log(f"done in {(time.time() - start) / 60:.1f} min: claims.md, claims.json, "
         f"reward_curves.png, final_f1.png in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
