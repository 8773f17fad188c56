"""ZeroSearch RL training: rollouts against the simulator with the curriculum, F1 rewards, and
GRPO / PPO / REINFORCE++ updates, in one JAX program.

    python -m zsjax.train --config configs/tiny.py --workdir runs/tiny [--config.KEY=VALUE ...]

The workdir gets metrics.jsonl (one JSON object per step), trajectories.jsonl (one record per
trajectory), orbax checkpoints in checkpoints/ (a rerun resumes from the latest), and the final
policy as a Hugging Face folder in policy_hf/.
"""

from __future__ import annotations

import json
import os
import sys
import time


ALGORITHMS = ("grpo", "ppo", "reinforce_pp")


def _pad_batch(trajs, length_multiple: int = 64):
    import numpy as np
    width = -(-max(len(t.token_ids) for t in trajs) // length_multiple) * length_multiple
    b = len(trajs)
    tokens = np.zeros((b, width), np.int32)
    attn = np.zeros((b, width), bool)
    mask = np.zeros((b, width), np.float32)
    for i, t in enumerate(trajs):
        n = len(t.token_ids)
        tokens[i, :n], attn[i, :n], mask[i, :n] = t.token_ids, True, t.loss_mask
    return tokens, attn, mask


def run(config, workdir: str) -> list[dict]:
    """Trains per `config`; returns the per-step metrics. Importable (tests, notebooks)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from zsjax import sharding
    from zsjax.checkpointing import Checkpointer
    from zsjax.data.qa import QuestionStream, read_qa
    from zsjax.generate import load_tokenizer
    from zsjax.models import load_hf, save_hf, to_hf_dict
    from zsjax.rl import advantages as A
    from zsjax.rl import losses as L
    from zsjax.rl import rewards as R
    from zsjax.rl import update as U
    from zsjax.search import (ModelTurnGenerator, RolloutSettings, StepCache, noisy_fraction,
                              rollout)
    from zsjax.search.curriculum import draw_rng, noise_probability
    from zsjax.search.simulator import InProcessSimulator

    rl, tc = config.rl, config.train
    if rl.algorithm not in ALGORITHMS:
        raise ValueError(f"config.rl.algorithm={rl.algorithm!r} is not available in "
                         f"zsjax.train; choose one of {ALGORITHMS}")
    os.makedirs(workdir, exist_ok=True)
    policy_path, sim_path, train_path = (config.policy.path, config.simulator.path,
                                         config.data.train_path)
    if not (policy_path and sim_path and train_path):
        from zsjax.tools import tiny_fixture
        fx = tiny_fixture.make(os.path.join(workdir, "fixture"), seed=config.seed)
        policy_path = policy_path or fx["policy"]
        sim_path = sim_path or fx["simulator"]
        train_path = train_path or fx["qa"]

    mesh = sharding.mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    policy_config, params = load_hf(policy_path, dtype=config.policy.dtype, mesh=mesh)
    tokenizer = load_tokenizer(policy_path)
    ref_params = None
    if rl.kl_coef or rl.algorithm in ("reinforce_pp", "ppo"):
        ref_path = config.reference.path or policy_path
        _, ref_params = load_hf(ref_path, dtype=config.policy.dtype, mesh=mesh)
    sim_config, sim_params = load_hf(sim_path, dtype=config.simulator.dtype, mesh=mesh)
    simulator = StepCache(InProcessSimulator(
        sim_config, sim_params, load_tokenizer(sim_path), style=config.simulator.style,
        temperature=config.simulator.temperature, max_new_tokens=config.simulator.max_new_tokens,
        top_k_docs=config.simulator.top_k_docs, seed=config.seed))
    rows = read_qa(train_path)
    settings = RolloutSettings(
        max_turns=config.rollout.max_turns, max_response_tokens=config.rollout.max_response_tokens,
        max_prompt_tokens=config.rollout.max_prompt_tokens,
        max_obs_tokens=config.rollout.max_obs_tokens, temperature=config.rollout.temperature,
        top_p=config.rollout.top_p)
    loss_cfg = U.LossConfig(clip_low=rl.clip, entropy_coef=rl.entropy_coef,
                            kl_coef=rl.kl_coef if rl.algorithm == "grpo" else 0.0,
                            kl_kind=rl.kl_kind, aggregation=rl.aggregation,
                            temperature=config.rollout.temperature, value_clip=rl.value_clip)
    tx = U.make_optimizer(rl.lr, warmup_steps=rl.warmup_steps, weight_decay=rl.weight_decay,
                          grad_clip=rl.grad_clip)
    state = U.init_state(params, tx)
    critic_tx = critic_state = None
    if rl.algorithm == "ppo":
        critic_tx = U.make_optimizer(rl.critic_lr, warmup_steps=rl.warmup_steps,
                                     weight_decay=rl.weight_decay, grad_clip=rl.grad_clip)
        critic_params = U.init_critic(policy_config, jax.tree.map(jnp.copy, params))
        critic_state = U.init_state(critic_params, critic_tx)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    position = 0
    if config.resume and ckpt.latest_step() is not None:
        (state, critic_state), meta = ckpt.restore((state, critic_state))
        position = meta["data_position"]
        print(f"[train] resumed from step {int(state.step)}", file=sys.stderr)
    stream = QuestionStream(rows, rl.questions_per_step, seed=config.seed, start=position,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
    k = rl.rollouts_per_question
    step_fns: dict[int, object] = {}
    history = []
    t_start = time.time()
    for step in range(int(state.step), tc.steps):
        t0 = time.time()
        qs = stream.next()
        p = noise_probability(step, tc.steps, config.curriculum.start, config.curriculum.end,
                              config.curriculum.base)
        simulator.new_step()
        gen = ModelTurnGenerator(policy_config, state.params, tokenizer, settings,
                                 kv_reuse=config.rollout.kv_reuse)
        trajs = rollout([q.question for q in qs for _ in range(k)],
                        [q.golden_answers for q in qs for _ in range(k)], tokenizer=tokenizer,
                        generate_fn=gen, backend=simulator, settings=settings,
                        noise_probability=p, rng=draw_rng(config.seed, step),
                        seed=config.seed * 1_000_003 + step)
        t_rollout = time.time() - t0
        scores = R.score([t.answer for t in trajs], [t.golden_answers for t in trajs])
        tokens, attn, mask = _pad_batch(trajs)
        n = len(trajs)
        micro = n // rl.mini_batches // rl.micro_batches or 1
        old = U.logprobs_pass(policy_config, state.params, tokens, attn, micro_batch=micro,
                              temperature=loss_cfg.temperature, mesh=mesh)
        ref = (U.logprobs_pass(policy_config, ref_params, tokens, attn, micro_batch=micro,
                               temperature=loss_cfg.temperature, mesh=mesh)
               if ref_params is not None else None)
        mask_j = jnp.asarray(mask)
        old_values = returns = None
        if rl.algorithm == "grpo":
            adv = A.group_normalized(jnp.asarray(scores["f1"]).reshape(-1, k), eps=rl.std_eps)
            adv = adv.reshape(-1)[:, None] * mask_j
        elif rl.algorithm == "ppo":
            # KL to the reference in the reward, GAE (skipping document tokens), whitened.
            old_values = U.values_pass(policy_config, critic_state.params, tokens, attn,
                                       micro_batch=micro, mesh=mesh) * mask_j
            kl = L.kl_estimate(old, ref, "k1") * mask_j
            token_rewards = (A.place_on_last_token(jnp.asarray(scores["f1"]), mask_j)
                             - rl.kl_coef * kl)
            adv, returns = A.gae(token_rewards, old_values, mask_j, gamma=rl.gamma, lam=rl.lam)
            adv = A.masked_whiten(adv, mask_j)
        else:
            kl = L.kl_estimate(old, ref, "k1") * mask_j
            adv = A.reinforce_plus_plus(A.place_on_last_token(jnp.asarray(scores["f1"]), mask_j),
                                        kl, mask_j, kl_coef=rl.kl_coef)
        batch = U.Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                        loss_mask=mask_j, old_logprobs=old, advantages=adv, ref_logprobs=ref,
                        old_values=old_values, returns=returns)
        mb_rows = n // rl.mini_batches
        update_metrics = []
        for _ in range(rl.epochs):
            for j in range(rl.mini_batches):
                mb = jax.tree.map(lambda x: x[j * mb_rows:(j + 1) * mb_rows], batch)
                width = mb.tokens.shape[1]
                if width not in step_fns:
                    step_fns[width] = U.make_policy_step(
                        state, mb, config=policy_config, tx=tx, cfg=loss_cfg,
                        n_micro=rl.micro_batches, mesh=mesh, remat=rl.remat)
                state, m = U.run_step(step_fns[width], state, mb)
                if critic_state is not None:
                    if ("critic", width) not in step_fns:
                        step_fns[("critic", width)] = U.jit_step(
                            U.critic_step, critic_state, mb, mesh=mesh, config=policy_config,
                            tx=critic_tx, cfg=loss_cfg, n_micro=rl.micro_batches,
                            remat=rl.remat)
                    critic_state, cm = U.run_step(step_fns[("critic", width)], critic_state,
                                                  mb)
                    m.update(cm)
                update_metrics.append(m)
        seconds = time.time() - t0
        frac = noisy_fraction(trajs)
        record = {
            "step": step + 1, "reward_mean": float(scores["f1"].mean()),
            "f1_mean": float(scores["f1"].mean()), "em_mean": float(scores["em"].mean()),
            "substring_mean": float(scores["substring"].mean()), "noise_prob": p,
            "noisy_fraction": frac,
            "kl": float(np.mean([m.get("kl", 0.0) for m in update_metrics])),
            "entropy": float(np.mean([m["entropy"] for m in update_metrics])),
            "policy_loss": float(np.mean([m["policy_loss"] for m in update_metrics])),
            "clip_fraction": float(np.mean([m["clip_fraction"] for m in update_metrics])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in update_metrics])),
            "value_loss": (float(np.mean([m["value_loss"] for m in update_metrics]))
                           if critic_state is not None else None),
            "response_tokens_mean": float(np.mean([len(t.response_ids) for t in trajs])),
            "searches_mean": float(np.mean([t.num_searches for t in trajs])),
            "answered_fraction": float(np.mean([t.answered for t in trajs])),
            "cache_hits": simulator.hits,
            "tokens_per_s": float(attn.sum() * rl.epochs / seconds),
            "rollout_s": t_rollout, "step_s": seconds}
        history.append(record)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            with open(os.path.join(workdir, "trajectories.jsonl"), "a") as f:
                for t in trajs:
                    f.write(json.dumps({"step": step + 1, **t.to_record()}) + "\n")
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            print(f"[train] step {step + 1}/{tc.steps} reward {record['reward_mean']:.3f} "
                  f"noise_p {p:.3f} searches {record['searches_mean']:.2f} kl {record['kl']:.4f}"
                  f" {seconds:.1f}s ({time.time() - t_start:.0f}s total)", file=sys.stderr,
                  flush=True)
        if (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or step + 1 == tc.steps:
            ckpt.save(step + 1, (state, critic_state),
                      {"data_position": stream.position, "step": step + 1,
                       "policy_config": to_hf_dict(policy_config),
                       "tokenizer_dir": os.path.abspath(policy_path)})
    ckpt.close()
    save_hf(policy_config, jax.device_get(state.params), os.path.join(workdir, "policy_hf"),
            tokenizer_dir=policy_path)
    return history


if __name__ == "__main__":
    from zsjax.cli import run_config_program
    run_config_program(run)
