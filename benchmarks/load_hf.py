"""Load time and peak host memory of a Hugging Face folder: zsjax.load_hf vs transformers.

Run each under `/usr/bin/time -v` (peak RSS is "Maximum resident set size"):

    /usr/bin/time -v python benchmarks/load_hf.py --impl zsjax DIR
    /usr/bin/time -v python benchmarks/load_hf.py --impl transformers DIR
    /usr/bin/time -v python benchmarks/load_hf.py --impl none DIR   # imports only: the baseline
"""

import argparse
import json
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--impl", choices=("zsjax", "transformers", "none"), default="zsjax")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import torch  # noqa: F401  (same imports in every mode, so baselines compare)
    import transformers
    from zsjax.models import load_hf
    jnp.zeros(1).block_until_ready()
    start = time.perf_counter()
    n = 0
    if args.impl == "zsjax":
        _, params = load_hf(args.dir, dtype=args.dtype)
        jax.block_until_ready(params)
        n = sum(x.size for x in jax.tree.leaves(params))
    elif args.impl == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=args.dtype)
        n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"impl": args.impl, "load_s": round(time.perf_counter() - start, 3),
                      "params": int(n)}))


if __name__ == "__main__":
    main()
