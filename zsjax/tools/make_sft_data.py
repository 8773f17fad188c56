"""Logged trajectories -> simulator fine-tuning rows.

    python -m zsjax.tools.make_sft_data --trajectories runs/x/trajectories.jsonl --out pairs.jsonl

Each search of a trajectory that searched a *real* engine (or the synthetic world's retriever)
becomes one row `{query, question, golden_answers, documents, label}`, labelled `useful` when
the trajectory's final answer was right and `noisy` otherwise (ZeroSearch's labelling). Input
rows are `Trajectory.to_record()` dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from zsjax.rl.rewards import score

CRITERIA = ("substring", "em", "f1")


def label_rows(records: list[dict], *, criterion: str = "substring", f1_threshold: float = 0.5,
               balance: bool = False, seed: int = 0) -> list[dict]:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    if not records:
        return []
    scores = score([r.get("answer") for r in records], [r["golden_answers"] for r in records])
    right = (scores["f1"] >= f1_threshold) if criterion == "f1" else scores[criterion] > 0
    rows = []
    for rec, ok in zip(records, right):
        for s in rec.get("searches", []):
            if not s.get("documents"):
                continue
            rows.append({"query": s["query"], "question": rec["question"],
                         "golden_answers": rec["golden_answers"], "documents": s["documents"],
                         "label": "useful" if ok else "noisy"})
    if balance and rows:
        rng = np.random.default_rng(seed)
        by = {lab: [r for r in rows if r["label"] == lab] for lab in ("useful", "noisy")}
        n = min(len(v) for v in by.values())
        rows = [r for lab in by for r in (
            [by[lab][i] for i in sorted(rng.choice(len(by[lab]), n, replace=False))])]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectories", required=True, help="jsonl of Trajectory.to_record()")
    p.add_argument("--out", required=True)
    p.add_argument("--criterion", choices=CRITERIA, default="substring",
                   help="what counts as a right answer")
    p.add_argument("--f1-threshold", type=float, default=0.5)
    p.add_argument("--balance", action="store_true", help="equal numbers of useful and noisy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        with open(args.trajectories) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        p.error(f"--trajectories {args.trajectories}: {e}")
    if records and not any("searches" in r for r in records):
        p.error(f"{args.trajectories} holds no trajectories (rows without searches): expected "
                "the trajectories.jsonl of a zsjax.train run that searched a real engine")
    rows = label_rows(records, criterion=args.criterion, f1_threshold=args.f1_threshold,
                      balance=args.balance, seed=args.seed)
    if not rows:
        p.error(f"no (query, documents) pairs from {len(records)} trajectories"
                + (" (--balance with only one label present)" if args.balance else ""))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out: folder {out_dir} does not exist")
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    useful = sum(r["label"] == "useful" for r in rows)
    print(f"{len(rows)} rows ({useful} useful, {len(rows) - useful} noisy) from {len(records)} "
          f"trajectories -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
