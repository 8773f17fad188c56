"""The memory plan of docs/SCALE_OUT.md: bytes per device of every array of a ZeroSearch step,
from the model shapes (no weights needed).

    python -m zsjax.tools.memory_plan

Assumptions: configs/zerosearch.py's recipe (docs/METHOD.md): 64 questions x 5 rollouts a
step, all rolled out at once, in the sampler's bucketed batch; the trained policy weights,
their gradients and AdamW's moments in float32 (`policy.param_dtype`), the rollout copy, the
reference and the simulator in bfloat16; trajectories up to 4096 tokens, simulator prompts +
600 new tokens up to 1024; the update's logits in float32.
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


def kv_bytes_per_token(m, dtype_bytes) -> int:
    return 2 * m["kv"] * m["hd"] * m["layers"] * dtype_bytes


def plan(name, *, devices, per_process, train_shards, rollout_tensor, sim_tensor,
         trajectories=320, traj_tokens=4096, sim_tokens=1024, rows_per_device=1, pb=2,
         master=4):
    pol, sim = QWEN["7B"], QWEN["14B"]
    p, s = n_params(pol), n_params(sim)
    local_trajs = trajectories * per_process // devices
    batch = bucket(local_trajs, 1)  # the sampler pads its batch to a bucket
    rows = [
        ("policy params, fp32 (training mesh)", master * p / train_shards),
        ("AdamW m + v, fp32", 2 * master * p / train_shards),
        ("gradients, fp32 (transient)", master * p / train_shards),
        ("reference params, bf16", pb * p / train_shards),
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
          f"{local_trajs} trajectories per process")
    print("| array | GB per device |\n|---|---:|")
    for label, b in rows:
        print(f"| {label} | {b / GB:.2f} |")
    print(f"| **total** | **{sum(b for _, b in rows) / GB:.1f}** |")


def main(argv=None):
    argparse.ArgumentParser(prog="python -m zsjax.tools.memory_plan",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    # v5p-64: 32 chips (one JAX device each), 8 hosts x 4 chips.
    plan("TPU v5p-64 (32 chips x 95 GB)", devices=32, per_process=4, train_shards=32,
         rollout_tensor=4, sim_tensor=4)
    # 8 x H100: one host; rollouts on data=2 x tensor=4, the simulator shares it.
    plan("8 x H100 (80 GB each)", devices=8, per_process=8, train_shards=8, rollout_tensor=4,
         sim_tensor=4)


if __name__ == "__main__":
    main()
