"""The memory plan of docs/SCALE_OUT.md: bytes per device of every array of a ZeroSearch step,
from the model shapes (no weights needed).

    python -m zsjax.tools.memory_plan [--lora-rank 16]

Assumptions: configs/zerosearch.py's recipe (docs/METHOD.md): 64 questions x 5 rollouts a
step, all rolled out at once, in the sampler's bucketed batch; the trained policy weights,
their gradients and AdamW's moments in float32 (`policy.param_dtype`), the rollout copy, the
reference and the simulator in bfloat16; trajectories up to 4096 tokens, simulator prompts +
600 new tokens up to 1024; the update's logits in float32.

With `--lora-rank R` (`policy.lora.rank`, zsjax/models/lora.py), the plan of a LoRA run on
the default targets (every attention and MLP projection): the base in bfloat16 is the only copy
of the policy's weights on the training mesh and is also the KL reference; the adapters, their
gradients and AdamW's moments are float32 and replicated; the update differentiates the merged
weights W + s A B (bfloat16), whose backward pass forms the adapted kernels' gradients before
reducing them to the adapters' (counted in float32, all at once: an upper bound).
"""

from __future__ import annotations

import argparse

from zsjax.sampling.sampler import bucket

GB = 1e9
QWEN = {  # Qwen2.5 config.json values
    "7B": dict(vocab=152064, d=3584, ff=18944, layers=28, heads=28, kv=4, hd=128),
    "14B": dict(vocab=152064, d=5120, ff=13824, layers=48, heads=40, kv=8, hd=128),
}


def n_params(m) -> int:
    attn = m["d"] * m["hd"] * (m["heads"] * 2 + m["kv"] * 2) + m["hd"] * (m["heads"] + 2 * m["kv"])
    mlp = 3 * m["d"] * m["ff"]
    return m["layers"] * (attn + mlp + 2 * m["d"]) + 2 * m["vocab"] * m["d"] + m["d"]


def kernels(m) -> list[tuple[int, int]]:
    """(fan in, fan out) of one layer's projections: q, k, v, o, gate, up, down."""
    q, kv = m["heads"] * m["hd"], m["kv"] * m["hd"]
    return [(m["d"], q), (m["d"], kv), (m["d"], kv), (q, m["d"]), (m["d"], m["ff"]),
            (m["d"], m["ff"]), (m["ff"], m["d"])]


def n_lora(m, rank: int) -> int:
    """Adapter params of rank `rank` on every projection: r x (in + out) each."""
    return m["layers"] * sum(rank * (i + o) for i, o in kernels(m))


def n_adapted(m) -> int:
    """Params of the adapted kernels (every projection)."""
    return m["layers"] * sum(i * o for i, o in kernels(m))


def kv_bytes_per_token(m, dtype_bytes) -> int:
    return 2 * m["kv"] * m["hd"] * m["layers"] * dtype_bytes


def plan(name, *, devices, per_process, train_shards, rollout_tensor, sim_tensor,
         trajectories=320, traj_tokens=4096, sim_tokens=1024, rows_per_device=1, pb=2,
         master=4, lora_rank=0) -> float:
    """Prints the plan's table; returns its total in GB per device."""
    pol, sim = QWEN["7B"], QWEN["14B"]
    p, s = n_params(pol), n_params(sim)
    local_trajs = trajectories * per_process // devices
    batch = bucket(local_trajs, 1)  # the sampler pads its batch to a bucket
    if lora_rank:
        a = n_lora(pol, lora_rank)
        rows = [
            ("policy base params, bf16 (training mesh; also the KL reference)",
             pb * p / train_shards),
            (f"LoRA adapters (rank {lora_rank}, {a / 1e6:.1f}M) + gradients + AdamW m + v, "
             "fp32, replicated", 4 * master * a),
            ("merged weights in the update, bf16 (transient)", pb * n_adapted(pol) / train_shards),
            ("adapted kernels' gradients through the merge, fp32 (transient, at most)",
             master * n_adapted(pol) / train_shards),
        ]
    else:
        rows = [
            ("policy params, fp32 (training mesh)", master * p / train_shards),
            ("AdamW m + v, fp32", 2 * master * p / train_shards),
            ("gradients, fp32 (transient)", master * p / train_shards),
            ("reference params, bf16", pb * p / train_shards),
        ]
    rows += [
        ("policy copy for rollouts, bf16 (rollout mesh)", pb * p / rollout_tensor),
        (f"policy KV cache, bf16 ({batch} rows)",
         batch * traj_tokens * kv_bytes_per_token(pol, pb) / per_process),
        ("simulator params, bf16 (simulator mesh)", 2 * s / sim_tensor),
        (f"simulator KV cache, bf16 ({batch} rows)",
         batch * sim_tokens * kv_bytes_per_token(sim, 2) / per_process),
        ("update logits + their gradient, fp32, one row", rows_per_device * 2 * traj_tokens
         * pol["vocab"] * 4),
    ]
    if devices > per_process:  # several processes: the gather to the rollout mesh
        rows.append(("largest leaf replicated while resharding, bf16",
                     pb * pol["vocab"] * pol["d"]))
    print(f"\n{name}: policy {p / 1e9:.2f}B params, simulator {s / 1e9:.2f}B; "
          f"{local_trajs} trajectories per process"
          + (f"; LoRA rank {lora_rank}" if lora_rank else ""))
    print("| array | GB per device |\n|---|---:|")
    for label, b in rows:
        print(f"| {label} | {b / GB:.2f} |")
    total = sum(b for _, b in rows) / GB
    print(f"| **total** | **{total:.1f}** |")
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m zsjax.tools.memory_plan",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="the plan of a LoRA run of this rank (policy.lora.rank); 0: full")
    args = ap.parse_args(argv)
    if args.lora_rank < 0:
        ap.error(f"--lora-rank must be >= 0; got {args.lora_rank}")
    # v5p-64: 32 chips (one JAX device each), 8 hosts x 4 chips.
    plan("TPU v5p-64 (32 chips x 95 GB)", devices=32, per_process=4, train_shards=32,
         rollout_tensor=4, sim_tensor=4, lora_rank=args.lora_rank)
    # 8 x H100: one host; rollouts on data=2 x tensor=4, the simulator shares it.
    plan("8 x H100 (80 GB each)", devices=8, per_process=8, train_shards=8, rollout_tensor=4,
         sim_tensor=4, lora_rank=args.lora_rank)


if __name__ == "__main__":
    main()
