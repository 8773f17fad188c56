"""Expands a sweep (a `get_sweep(arg)` function in a config file) into one training run each.

    python launch/sweep.py --config configs/zerosearch.py:qwen2.5-3b-base,grpo --sweep lr_kl \
        --workdir runs/lr_kl [--run] [-- --config.policy.path=... --config.data.train_path=...]

Without --run it prints the commands (one per line, for a cluster scheduler or `parallel`);
with --run it runs them one after another. Each run gets WORKDIR/NAME, NAME built from the
overrides (e.g. `rl.lr=1e-06,rl.kl_coef=0.0`). Arguments after `--` go to every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys


def load_sweep(config_spec: str, sweep: str) -> list[dict]:
    path = config_spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    # configs import each other as `configs.common`: the folder above the file's folder, and
    # the working directory (a sweep file elsewhere that imports the repository's configs)
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if root not in sys.path:
            sys.path.insert(0, root)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"error: {path} has no get_sweep(arg) function")
    try:
        return module.get_sweep(sweep)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def commands(config_spec: str, sweep: str, workdir: str, extra: list[str]) -> list[list[str]]:
    out = []
    points = load_sweep(config_spec, sweep)
    swept = {k for overrides in points for k in overrides}
    for arg in extra:  # the last of repeated flags wins: an extra one would replace the sweep's
        key = arg.split("=", 1)[0].removeprefix("--config.")
        if arg.startswith("--config.") and key in swept:
            raise SystemExit(f"error: {arg} sets {key}, which the sweep {sweep!r} varies; drop "
                             "it, or sweep another way")
    for overrides in points:
        name = ",".join(f"{k}={v}" for k, v in overrides.items())
        out.append([sys.executable, "-m", "zsjax.train", "--config", config_spec,
                    "--workdir", os.path.join(workdir, name)]
                   + [f"--config.{k}={v}" for k, v in overrides.items()] + extra)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="FILE.py[:ARG], as for zsjax.train")
    p.add_argument("--sweep", required=True, help="the argument of the file's get_sweep")
    p.add_argument("--workdir", required=True)
    p.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    args = p.parse_args(argv)
    cmds = commands(args.config, args.sweep, args.workdir, extra)
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if args.run:
            code = subprocess.call(cmd)
            if code:
                print(f"[sweep] run failed with exit code {code}", file=sys.stderr)
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
