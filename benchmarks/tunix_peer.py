"""zsjax against Tunix (Google's JAX post-training library), side by side in one run, on the same
SmolLM2-135M-Instruct weights.

    python benchmarks/tunix_peer.py [--batches 1 8 32] [--new-tokens 128] [--repeats 3]
                                    [--update-batch 8 --update-length 256] [--out FILE]

Tunix is an optional dependency that pins packages zsjax pins otherwise (safetensors < 0.8,
transformers), so it gets an environment of its own, with zsjax on the path
(docs/PERFORMANCE.md, "Against Tunix"):

    python -m venv .venv-tunix && .venv-tunix/bin/pip install google-tunix==0.1.7
    PYTHONPATH=. .venv-tunix/bin/python benchmarks/tunix_peer.py

- decode: greedy, --new-tokens tokens for every row (EOS disabled on every side), the same chat
  prompts; zsjax's `zsjax.sampling.generate` and Tunix's `tunix.generate.sampler.Sampler` on
  Tunix's Llama-3 model loaded from the same safetensors folder. The two sides alternate,
  --repeats times each, after one untimed call each (compilation); the median is reported.
- update: one GRPO policy step at --update-batch rows of --update-length tokens (the first half
  a prompt, out of the loss): zsjax's jitted policy step, and Tunix's own GRPO loss
  (`tunix.rl.algo_core.grpo_loss_fn`, the loss its GRPOLearner trains with) under
  `nnx.value_and_grad` and an `nnx.Optimizer` step, jitted; both with PPO clipping 0.2, no KL
  term, global-norm clipping 1.0 and AdamW. Alternating, median of --steps each.

Where the environment has torch (`pip install torch`), transformers runs beside them: its
greedy `generate` on the same prompt ids, and the PyTorch eager GRPO step of
`benchmarks/update.py` on the same batch (--no-transformers leaves it out), in a process of its
own after the two JAX sides' rounds (PyTorch's threads in the same process slowed the JAX step by
a fifth). Every side runs float32 (JAX's default device, PyTorch's CPU). The greedy texts are compared as a check that
the two models are the same model (their float rounding differs, so long continuations may
part).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import QUESTIONS  # noqa: E402  (benchmarks/decode.py: the same prompts)
from report import write as write_report  # noqa: E402  (benchmarks/report.py)

NOT_INSTALLED = 3  # the exit status without Tunix: benchmarks/run.py reports it as skipped


def tunix_llama(model_dir: str):
    """Tunix's Llama-3 model with SmolLM2's sizes, its weights read by Tunix's own loader."""
    from tunix.models.llama3 import model as tunix_model
    from tunix.models.llama3 import params as tunix_params
    hf = json.load(open(os.path.join(model_dir, "config.json")))
    cfg = tunix_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))
    # Tunix 0.1.7's attention calls `apply_rope` without the config's rope_theta, so every
    # model gets its default of 1e6 (SmolLM2's is 1e5): pass the config's, so that both sides
    # compute the same function (the cost is the same either way).
    if "rope_theta" not in inspect.getsource(tunix_model.Attention.block):
        rope = getattr(tunix_model.apply_rope, "func", tunix_model.apply_rope)  # unpatched
        tunix_model.apply_rope = functools.partial(rope, rope_theta=cfg.rope_theta)
    model = tunix_params.create_model_from_safe_tensors(model_dir, cfg, dtype=jnp.float32)
    return cfg, model


def _alternate(fns: dict, repeats: int) -> dict:
    """{name: median seconds}: each fn called once untimed, then the fns in turn, `repeats`
    rounds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _has_torch() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def _in_child(kind: str, model_dir: str, arrays: dict, repeats: int) -> dict:
    """Runs the transformers side (`kind`: decode or update) in a process of its own, so that
    PyTorch's threads do not share a process with the JAX sides: {seconds, ...}."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, **arrays)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind,
                               model_dir, path, str(repeats)], capture_output=True, text=True,
                              check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(kind: str, model_dir: str, path: str, repeats: int) -> int:
    """The transformers side: one untimed call, then the median of `repeats`, as JSON."""
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    a = dict(np.load(path))
    if kind == "decode":
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        model.generation_config.eos_token_id = None
        ids, attn, new = torch.tensor(a["ids"]), torch.tensor(a["attn"]), int(a["new"])
        out = {}

        def call():
            with torch.no_grad():
                out["tokens"] = model.generate(
                    input_ids=ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0)[:, ids.shape[1]:].tolist()
    else:
        from update import torch_grpo_step  # benchmarks/update.py
        step = torch_grpo_step(model_dir, a["tokens"], a["mask"], a["adv"], a["old"])
        out = {}

        def call():
            out.setdefault("loss", step())
    secs = _alternate({"transformers": call}, repeats)["transformers"]
    print(json.dumps({"seconds": secs, **out}))
    return 0


def decode_rows(tok, tunix_tok, config, params, tcfg, tmodel, batches, new, repeats,
                model_dir=None):
    from tunix.generate import sampler as tunix_sampler
    from zsjax.sampling import generate
    never = [config.vocab_size + 7]  # an id no row can sample: every row makes `new` tokens
    rows = []
    for batch in batches:
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8]}],
                                         tokenize=False, add_generation_prompt=True)
                 for i in range(batch)]
        def tunix_sampler_for(size):
            return tunix_sampler.Sampler(tmodel, tunix_tok, tunix_sampler.CacheConfig(
                cache_size=size, num_layers=tcfg.num_layers, num_kv_heads=tcfg.num_kv_heads,
                head_dim=tcfg.head_dim))

        # zsjax decodes the very token ids Tunix's sampler makes of the texts
        prompts = [[int(i) for i in tunix_sampler_for(1).tokenize(t)] for t in texts]
        width = 1 << (max(map(len, prompts)) - 1).bit_length()  # Tunix pads prompts to 2^k
        sampler = tunix_sampler_for(width + new)  # the smallest cache the call accepts
        out = {}

        def zs():
            out["zsjax"] = generate(config, params, prompts, max_new_tokens=new,
                                    eos_token_ids=[]).tokens

        def tx():
            res = sampler(texts, max_generation_steps=new, max_prompt_length=width,
                          eos_tokens=never, temperature=0.0)
            out["tunix"] = [np.asarray(t) for t in res.tokens]

        secs = _alternate({"zsjax": zs, "tunix": tx}, repeats)
        if model_dir is not None:  # transformers, in its own process (_in_child)
            w = max(map(len, prompts))
            hf = _in_child("decode", model_dir, {
                "ids": np.array([[0] * (w - len(p)) + p for p in prompts]),
                "attn": np.array([[0] * (w - len(p)) + [1] * len(p) for p in prompts]),
                "new": np.array(new)}, repeats)
            secs["transformers"], out["transformers"] = hf["seconds"], hf["tokens"]
        same = np.mean([list(a[:16]) == [int(x) for x in b[:16]]
                        for a, b in zip(out["zsjax"], out["tunix"])])
        assert all(len(x) == new for x in out["zsjax"])
        rows.append({"batch": batch, "new_tokens": new,
                     "zsjax_tokens_s": round(batch * new / secs["zsjax"], 1),
                     "tunix_tokens_s": round(batch * new / secs["tunix"], 1),
                     "speedup": round(secs["tunix"] / secs["zsjax"], 2),
                     "rows_with_same_first_16_tokens": float(same)})
        if model_dir is not None:
            rows[-1].update({
                "transformers_tokens_s": round(batch * new / secs["transformers"], 1),
                "speedup_vs_transformers": round(secs["transformers"] / secs["zsjax"], 2),
                "transformers_rows_with_same_first_16_tokens": float(np.mean(
                    [list(a[:16]) == list(b[:16])
                     for a, b in zip(out["zsjax"], out["transformers"])]))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def update_row(config, params, tmodel, batch, length, steps, model_dir=None):
    """One GRPO policy step on each side, the same tokens, advantages and old logprobs."""
    import optax
    from flax import nnx
    from tunix.rl import algo_core
    from tunix.rl.grpo import grpo_learner
    from zsjax.rl import update as U
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    half = length // 2
    attn = np.ones((batch, length), bool)
    mask = np.zeros((batch, length), np.float32)
    mask[:, half:] = 1.0
    adv_row = rng.normal(size=(batch,)).astype(np.float32)
    old = np.asarray(U.logprobs_pass(config, params, tokens, attn, micro_batch=batch))

    # zsjax: the trainer's policy step (PPO-clip 0.2, no KL, no entropy bonus), AdamW
    zbatch = U.Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                     loss_mask=jnp.asarray(mask), old_logprobs=jnp.asarray(old),
                     advantages=jnp.asarray(adv_row[:, None] * mask))
    ztx = U.make_optimizer(1e-6)
    state = {"s": U.init_state(params, ztx)}
    zstep = U.make_policy_step(state["s"], zbatch, config=config, tx=ztx,
                               cfg=U.LossConfig(entropy_coef=0.0), n_micro=1,
                               logits_from=U.loss_start(mask))

    losses = {}

    def zs():
        state["s"], m = zstep(state["s"], zbatch)
        jax.block_until_ready(state["s"])
        losses.setdefault("zsjax", float(m["policy_loss"]))

    # Tunix: its GRPO loss, value_and_grad and an nnx.Optimizer step in one nnx.jit
    algo = grpo_learner.GRPOConfig(beta=0.0, epsilon=0.2, num_generations=2)
    algo.temperature = 1.0  # GRPOLearner copies it from the rollout config
    example = grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(tokens[:, :half]), prompt_mask=jnp.ones((batch, half), jnp.int32),
        completion_ids=jnp.asarray(tokens[:, half:]),
        completion_mask=jnp.ones((batch, length - half), jnp.int32),
        advantages=jnp.asarray(adv_row), ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(old[:, half:]))
    opt = nnx.Optimizer(tmodel, optax.chain(optax.clip_by_global_norm(1.0),
                                            optax.adamw(1e-6, weight_decay=0.01)),
                        wrt=nnx.Param)

    @nnx.jit
    def tunix_step(model, optimizer, ex):
        def loss_fn(m):
            loss, _ = algo_core.grpo_loss_fn(m, ex, algo, pad_id=-1, eos_id=-2)
            return loss
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def tx():
        loss = jax.block_until_ready(tunix_step(tmodel, opt, example))
        losses.setdefault("tunix", float(loss))

    secs = _alternate({"zsjax": zs, "tunix": tx}, steps)
    if model_dir is not None:  # PyTorch eager on the transformers model, in its own process
        hf = _in_child("update", model_dir, {"tokens": tokens, "mask": mask,
                                             "adv": adv_row[:, None] * mask, "old": old}, steps)
        secs["transformers"], losses["transformers"] = hf["seconds"], hf["loss"]
    row = {"batch": batch, "length": length, "zsjax_step_s": round(secs["zsjax"], 3),
           "tunix_step_s": round(secs["tunix"], 3),
           "speedup": round(secs["tunix"] / secs["zsjax"], 2),
           # the first step's loss on each side: the same loss of the same batch (every row's
           # completion is whole, so Tunix's sequence-mean-token-mean is zsjax's token mean)
           "policy_loss_zsjax": losses["zsjax"], "policy_loss_tunix": losses["tunix"]}
    if "transformers" in secs:
        row.update({"transformers_step_s": round(secs["transformers"], 3),
                    "speedup_vs_transformers": round(secs["transformers"] / secs["zsjax"], 2),
                    "policy_loss_transformers": losses["transformers"]})
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the SmolLM2 fixture")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-batch", type=int, default=8)
    parser.add_argument("--update-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument("--no-transformers", action="store_true",
                        help="leave out the transformers / PyTorch side (it runs where this "
                             "environment has torch)")
    parser.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:  # the transformers side (_in_child)
        return _child(argv[1], argv[2], argv[3], int(argv[4]))
    args = parser.parse_args(argv)
    try:
        import tunix  # noqa: F401
    except ImportError:
        print("Tunix is not installed here; see this file's docstring for its environment",
              file=sys.stderr)
        return NOT_INSTALLED
    import importlib.metadata
    import transformers
    from zsjax.models import load_hf
    from zsjax.tools.fetch_smollm2 import fetch
    model_dir = args.model or fetch()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    # Tunix's sampler takes every pad id in a prompt for padding; SmolLM2 pads with
    # <|im_end|>, which every chat prompt holds. Its copy of the tokenizer pads with a token no
    # prompt holds (without it, the rows Tunix left-pads decode other text).
    tunix_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tunix_tok.pad_token = tunix_tok.unk_token or tunix_tok.eos_token
    config, params = load_hf(model_dir)
    tcfg, tmodel = tunix_llama(model_dir)
    hf_dir = None if args.no_transformers or not _has_torch() else model_dir
    decode = decode_rows(tok, tunix_tok, config, params, tcfg, tmodel, args.batches,
                         args.new_tokens, args.repeats, model_dir=hf_dir)
    update = None if args.skip_update else update_row(
        config, params, tmodel, args.update_batch, args.update_length, args.steps,
        model_dir=hf_dir)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
                         f"({jax.default_backend()}), google-tunix "
                         f"{importlib.metadata.version('google-tunix')}, transformers "
                         f"{transformers.__version__}"
                         + (", torch " + importlib.metadata.version("torch") if hf_dir
                            else " (no torch)"),
              "model": "SmolLM2-135M-Instruct float32", "decode": decode, "update": update,
              "command": " ".join(["python"] + sys.argv)}
    lines = [f"Machine: {report['machine']}.", "",
             "| decode batch | new tokens | zsjax tok/s | Tunix tok/s | zsjax / Tunix | "
             "transformers tok/s | zsjax / transformers | rows with zsjax's first 16 tokens "
             "(Tunix / transformers) |", "|---|---|---|---|---|---|---|---|"]
    for r in decode:
        hf = (f"{r['transformers_tokens_s']} | {r['speedup_vs_transformers']}x"
              if "transformers_tokens_s" in r else "- | -")
        same = f"{r['rows_with_same_first_16_tokens']:.0%}" + (
            f" / {r['transformers_rows_with_same_first_16_tokens']:.0%}"
            if "transformers_tokens_s" in r else "")
        lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['zsjax_tokens_s']} | "
                     f"{r['tunix_tokens_s']} | {r['speedup']}x | {hf} | {same} |")
    if update:
        hf = (f"{update['transformers_step_s']} | {update['speedup_vs_transformers']}x"
              if "transformers_step_s" in update else "- | -")
        lines += ["", "| GRPO step | zsjax s | Tunix s | zsjax / Tunix | PyTorch (transformers) "
                  "s | zsjax / PyTorch |", "|---|---|---|---|---|---|",
                  f"| {update['batch']} x {update['length']} tokens | {update['zsjax_step_s']} | "
                  f"{update['tunix_step_s']} | {update['speedup']}x | {hf} |"]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
