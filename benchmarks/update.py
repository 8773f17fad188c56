"""GRPO update throughput: zsjax's jitted step vs a PyTorch eager reference, one run.

    python benchmarks/update.py [--batch 8] [--length 128] [--steps 3] [--micro 1]
                                [--model DIR] [--dtype float32|bfloat16] [--remat]
                                [--scan-layers]

Same SmolLM2-135M-Instruct weights (float32; --model: another Hugging Face folder), same batch
(a prompt and an information block masked out of the loss), same loss (PPO-clip + entropy bonus,
token mean), global-norm clipping and AdamW. PyTorch runs the transformers model in eager mode.
zsjax computes no logits at the prompt's positions, as the trainer does (`--full-logits`
computes them). MFU counts 6 x params x tokens against the matmul rate measured in the same run
(in --dtype).
--dtype bfloat16 computes in bfloat16 with float32 trained weights, as the trainer's
`policy.dtype`; PyTorch then runs its float32 model under autocast to bfloat16.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)


def peak_memory() -> dict:
    """The accelerator's peak bytes in use (GPU/TPU), or this process's peak RSS (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"zsjax_peak_device_gb": round(stats["peak_bytes_in_use"] / 1e9, 2)}
    import resource
    return {"zsjax_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                                       2)}


def torch_grpo_step(model_dir, tokens, mask, adv, old, *, device="cpu", bfloat16=False,
                    entropy_coef=0.0, lr=1e-6):
    """The PyTorch eager reference of a GRPO policy step on a transformers model: PPO-clip
    0.2 with an entropy bonus, token mean over `mask`, global-norm clipping 1.0, AdamW;
    `bfloat16`: float32 weights under autocast. Returns step() -> the policy loss."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    tt, tm, ta, to = (torch.tensor(x, device=device)
                      for x in (tokens.astype(np.int64), mask, adv, old))

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bfloat16):
            logits = model(tt).logits[:, :-1].float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, tt[:, 1:, None])[..., 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        m_, a_, o_ = tm[:, 1:], ta[:, 1:], to[:, 1:]
        ratio = torch.exp(logp - o_)
        pg = torch.maximum(-a_ * ratio, -a_ * ratio.clamp(0.8, 1.2))
        loss = ((pg - entropy_coef * ent) * m_).sum() / m_.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(((pg * m_).sum() / m_.sum()).detach())
    return step


def none(value, suffix="", fmt=""):
    """A table cell: '-' where the reference was skipped."""
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=1, help="zsjax micro-batches per step")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--scan-layers", action="store_true",
                        help="the layers as one scan over stacked params (model.scan_layers)")
    parser.add_argument("--small", action="store_true",
                        help="a random ~6M-param Llama (d256, 4 layers, vocab 8192) instead of "
                             "SmolLM2, like the design prototype's small decoder")
    parser.add_argument("--full-logits", action="store_true",
                        help="compute logits at the prompt's positions too (as PyTorch does); "
                             "by default zsjax skips them like the trainer (logits_from)")
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (the trained weights stay float32)")
    parser.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip PyTorch (e.g. JAX on a GPU with a CPU-only torch)")
    args = parser.parse_args()

    import torch
    import transformers
    from zsjax.models import load_hf
    from zsjax.rl import update as U
    from zsjax.tools.fetch_smollm2 import fetch
    torch.set_num_threads(os.cpu_count())
    if args.small:
        import tempfile
        small = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=4, tie_word_embeddings=True)
        model_dir = tempfile.mkdtemp()
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(small).save_pretrained(model_dir)
    else:
        model_dir = args.model or fetch()
    config, params = load_hf(model_dir, dtype=args.dtype, param_dtype="float32",
                             scan_layers=args.scan_layers)
    b, t = args.batch, args.length
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)
    attn = np.ones((b, t), bool)
    mask = np.ones((b, t), np.float32)
    mask[:, : t // 4] = 0
    mask[:, t // 2: t // 2 + t // 8] = 0
    adv = (rng.normal(size=(b, 1)) * mask).astype(np.float32)
    old = np.asarray(U.logprobs_pass(config, params, tokens, attn, micro_batch=b))
    batch = U.Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                    loss_mask=jnp.asarray(mask), old_logprobs=jnp.asarray(old),
                    advantages=jnp.asarray(adv))
    cfg = U.LossConfig(entropy_coef=0.001)
    from decode import matmul_rate  # benchmarks/decode.py
    ceiling = matmul_rate(dtype=args.dtype)
    flops = 6 * config.num_params() * b * t

    # zsjax
    tx = U.make_optimizer(1e-6)
    state = U.init_state(params, tx)
    logits_from = 0 if args.full_logits else U.loss_start(mask)
    step = U.make_policy_step(state, batch, config=config, tx=tx, cfg=cfg, n_micro=args.micro,
                              remat=args.remat, logits_from=logits_from)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    zs = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(state)
        zs.append(time.perf_counter() - t0)
    zs_loss = float(m["policy_loss"])
    peak = peak_memory()  # before PyTorch loads anything

    # PyTorch eager reference (on CUDA when JAX runs on a GPU and torch has it)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # JAX runs float32 matmuls on a GPU with TF32; let torch do the same
        torch.backends.cuda.matmul.allow_tf32 = True
    ts, torch_loss = [], float("nan")
    if not args.no_reference:
        torch_step = torch_grpo_step(model_dir, tokens, mask, adv, old, device=device,
                                     bfloat16=args.dtype == "bfloat16", entropy_coef=0.001)
        torch_step()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            torch_loss = torch_step()  # float() synchronises
            ts.append(time.perf_counter() - t0)

    z = statistics.median(zs)
    p = statistics.median(ts) if ts else float("nan")
    report = {
        "machine": f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), "
                   f"torch {torch.__version__} ({'skipped' if args.no_reference else device})",
        "model": "random 6M Llama" if args.small else (
            os.path.basename(os.path.normpath(args.model)) if args.model
            else "SmolLM2-135M-Instruct"), "dtype": args.dtype,
        "params": config.num_params(),
        "batch": f"{b} x {t} tokens ({int(mask.sum())} in the loss)", "micro_batches": args.micro,
        "remat": args.remat, "scan_layers": args.scan_layers, "logits_from": logits_from,
        "matmul_gflop_s": round(ceiling / 1e9, 1),
        "zsjax_step_s": round(z, 3), "torch_step_s": round(p, 3),
        "zsjax_tokens_s": round(b * t / z, 1), "torch_tokens_s": round(b * t / p, 1),
        "speedup": round(p / z, 2), "zsjax_compile_s": round(first - z, 1),
        "zsjax_mfu": round(flops / z / ceiling, 3), "torch_mfu": round(flops / p / ceiling, 3),
        "policy_loss_zsjax": zs_loss, "policy_loss_torch": torch_loss, **peak,
        "command": " ".join(["python"] + sys.argv)}
    report = {k: None if isinstance(v, float) and v != v else v for k, v in report.items()}
    print(json.dumps(report, indent=2))
    mem = ", ".join(f"{k} {v}" for k, v in peak.items())
    lines = [f"{report['model']} ({args.dtype} compute), batch {report['batch']}, "
             f"{report['machine']}; matmul {report['matmul_gflop_s']} GFLOP/s (same run); "
             f"{mem}", "",
             "| zsjax step s | PyTorch step s | speedup | zsjax tokens/s | PyTorch tokens/s | "
             "MFU zsjax / PyTorch | zsjax compile s | policy loss zsjax / PyTorch |",
             "|---|---|---|---|---|---|---|---|",
             f"| {report['zsjax_step_s']} | {none(report['torch_step_s'])} | "
             f"{none(report['speedup'], 'x')} | {report['zsjax_tokens_s']} | "
             f"{none(report['torch_tokens_s'])} | {report['zsjax_mfu']} / "
             f"{none(report['torch_mfu'])} | {report['zsjax_compile_s']} | {zs_loss:.6g} / "
             f"{none(report['policy_loss_torch'], fmt='.6g')} |"]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, report, lines)


if __name__ == "__main__":
    main()
