"""`zsjax.train` on configs/tiny.py: metrics, the curriculum's realised noise, resume, export."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from zsjax import train
from zsjax.cli import InputError
from zsjax.sampling import GenerateResult
from zsjax.search.prompts import INVALID_ACTION


class ScriptedGenerator:
    """Stands in for ModelTurnGenerator: searches on the first turn, then answers correctly
    for Zorland and wrongly otherwise (so rewards differ within a group)."""

    def __init__(self, config, params, tokenizer, settings, **kwargs):
        self.tok = tokenizer

    def __call__(self, inputs):
        out = GenerateResult([], [], [], [])
        for ctx in inputs.contexts:
            text = self.tok.decode(ctx)
            question = text.rsplit("Question: ", 1)[1].split("?")[0]
            if inputs.turn == 0:
                reply = f"<search> {question} </search>"
            else:
                reply = "<answer> Vex </answer>" if "Zorland" in question else "<answer> x </answer>"
            ids = self.tok.encode(reply, add_special_tokens=False)
            out.tokens.append(ids)
            out.logprobs.append(np.full(len(ids), -1.0))
            out.model_logprobs.append(np.full(len(ids), -1.0))
            out.finish_reasons.append("stop")
        return out


def _lines(path):
    return [json.loads(x) for x in open(path)]


def test_tiny_run_logs_metrics_resumes_and_exports(tmp_path):
    config = tiny.get_config()
    config.train.steps = 2
    workdir = str(tmp_path / "run")
    history = train.run(config, workdir)
    assert [h["step"] for h in history] == [1, 2]
    required = {"step", "reward_mean", "f1_mean", "noise_prob", "kl", "entropy",
                "response_tokens_mean", "searches_mean", "tokens_per_s", "noisy_fraction",
                "valid_answer_rate", "clip_fraction", "grad_norm", "time_rollout_s",
                "time_simulator_s", "time_logprobs_s", "time_update_s", "skipped_updates"}
    for rec in _lines(os.path.join(workdir, "metrics.jsonl")):
        assert required <= set(rec)
        assert np.isfinite(rec["entropy"]) and rec["tokens_per_s"] > 0
        assert np.isfinite(rec["kl"])  # kl_coef > 0: measured against the reference
    assert os.path.exists(os.path.join(workdir, "policy_hf", "config.json"))
    config.train.steps = 3  # a rerun resumes from the step-2 checkpoint
    history = train.run(config, workdir)
    assert [h["step"] for h in history] == [3]
    assert [r["step"] for r in _lines(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3]


# GRPO and PPO (the trainer's critic path) by default; the other estimators differ only in
# functions tests/rl tests directly.
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"] + [
    pytest.param(a, marks=pytest.mark.slow) for a in ("dr_grpo", "rloo", "reinforce_pp")])
def test_noise_fraction_and_rewards_logged_per_step(tmp_path, algorithm):
    config = tiny.get_config()
    config.train.steps = 4
    config.rl.algorithm = algorithm
    config.rl.questions_per_step = 8
    config.curriculum.update(start=0.5, end=0.5)  # constant p: a binomial check per step
    workdir = str(tmp_path / algorithm)
    train.run(config, workdir, generator=ScriptedGenerator)
    metrics = _lines(os.path.join(workdir, "metrics.jsonl"))
    trajs = _lines(os.path.join(workdir, "trajectories.jsonl"))
    for rec in metrics:
        flags = [s["noisy"] for t in trajs if t["step"] == rec["step"] for s in t["searches"]]
        assert len(flags) == 16 and rec["searches_mean"] == 1.0
        assert rec["noisy_fraction"] == pytest.approx(np.mean(flags))
        assert rec["noise_prob"] == 0.5
        # exactly the Zorland rollouts answer right
        assert rec["reward_mean"] == pytest.approx(2 / 16)
        mine = [t for t in trajs if t["step"] == rec["step"]]
        assert rec["format_valid_rate"] == np.mean(
            [t["answer"] is not None and INVALID_ACTION not in t["response"] for t in mine])
    assert 0.2 < np.mean([r["noisy_fraction"] for r in metrics]) < 0.8
    assert (metrics[-1]["value_loss"] is not None) == (algorithm == "ppo")


def _spy_generation_kwarg(monkeypatch, name: str):
    """Records the keyword `name` that the trainer passes to the policy's turn generator
    (scripted here, and given to the trainer) and to the simulator's `generate`: returns
    ({"policy": ..., "simulator": ...}, the turn generator to give)."""
    import zsjax.search.simulator as sim_module
    seen, real_generate = {}, sim_module.generate

    class Spy(ScriptedGenerator):
        def __init__(self, *args, **kwargs):
            seen["policy"] = kwargs.get(name)
            super().__init__(*args, **kwargs)

    def generate(*args, **kwargs):
        seen["simulator"] = kwargs.get(name)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sim_module, "generate", generate)
    return seen, Spy


@pytest.mark.slow
def test_shrink_above_reaches_the_policy_and_simulator_generation(tmp_path, monkeypatch):
    """rollout.shrink_above and simulator.shrink_above are passed on to the two generators."""
    seen, spy = _spy_generation_kwarg(monkeypatch, "shrink_above")
    config = tiny.get_config()
    config.train.steps = 1
    config.rollout.shrink_above = 0
    config.simulator.shrink_above = 3
    train.run(config, str(tmp_path / "run"), generator=spy)
    assert seen == {"policy": 0, "simulator": 3}
    config.simulator.shrink_above = -1
    with pytest.raises(InputError, match="simulator.shrink_above must be >= 0"):
        train.run(config, str(tmp_path / "bad"), generator=spy)


@pytest.mark.slow
def test_reference_mini_batches_the_last_one_smaller(tmp_path, monkeypatch):
    """rl.mini_batch_size cuts a step's trajectories as the reference does (320 -> 256 + 64):
    here 8 -> 6 + 2, one optimizer step each, in micro-batches of 2 rows. Bad splits are
    input errors."""
    from zsjax.rl import update as U
    seen, real = [], U.run_step

    def run_step(fn, state, batch):
        seen.append((batch.tokens.shape[0], int(state.step)))
        return real(fn, state, batch)

    monkeypatch.setattr(U, "run_step", run_step)
    config = tiny.get_config()  # 4 questions x 2 rollouts
    config.train.steps = 1
    config.rl.update(mini_batch_size=6, micro_batches=3)
    assert train._update_plan(config.rl) == ([6, 2], 2)
    train.run(config, str(tmp_path / "run"), generator=ScriptedGenerator)
    assert seen == [(6, 0), (2, 1)]  # two optimizer steps: 6 rows, then the other 2
    for changes, match in ((dict(mini_batch_size=5, micro_batches=1), "last mini-batch, 3"),
                           (dict(mini_batch_size=6, micro_batches=4), "into rl.micro_batches=4"),
                           (dict(mini_batch_size=-1), "mini_batch_size must be >= 0")):
        config.rl.update(**changes)
        with pytest.raises(InputError, match=match):
            train.run(config, str(tmp_path / "bad"), generator=ScriptedGenerator)


def test_rollouts_stop_on_generation_config_eos_ids(tmp_path, monkeypatch):
    """The policy's and the simulator's generation stop on the EOS ids of config.json, of
    generation_config.json and of the tokenizer, as zsjax.evaluate and zsjax.generate do
    (Qwen2.5-Instruct lists <|endoftext|> only in generation_config.json)."""
    from zsjax.models.tokenizer import load_tokenizer
    from zsjax.models.config import read_hf_config
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))
    for role, extra in (("policy", 7), ("simulator", 9)):
        with open(os.path.join(fx[role], "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [extra]}, f)
    seen, spy = _spy_generation_kwarg(monkeypatch, "eos_token_ids")
    config = tiny.get_config()
    config.train.steps = 1
    config.policy.path, config.simulator.path = fx["policy"], fx["simulator"]
    config.data.train_path = fx["qa"]
    train.run(config, str(tmp_path / "run"), generator=spy)
    for role, extra in (("policy", 7), ("simulator", 9)):
        own = set(read_hf_config(fx[role]).eos_token_ids) | {load_tokenizer(fx[role]).eos_token_id}
        assert set(seen[role]) == own | {extra}, role


def test_a_given_backend_replaces_the_simulator(tmp_path):
    """`train.run(backend=...)` searches that backend (the claims' "real search engine"): its
    documents reach the trajectories, and no simulator model is loaded (its path is bogus)."""
    from zsjax.search import FunctionBackend
    config = tiny.get_config()
    config.train.steps = 1
    config.simulator.path = str(tmp_path / "no_such_simulator")
    config.rl.kl_coef = 0.0  # GRPO without a reference model: no KL is measured
    seen = []

    def engine(request):
        seen.append(request.query)
        return f"Doc 1: engine result for {request.query}"
    workdir = str(tmp_path / "engine")
    train.run(config, workdir, backend=FunctionBackend(engine), generator=ScriptedGenerator)
    trajs = _lines(os.path.join(workdir, "trajectories.jsonl"))
    assert seen and len(trajs) == config.rl.questions_per_step * config.rl.rollouts_per_question
    for t in trajs:
        assert t["searches"] and "engine result for" in json.dumps(t)
    assert _lines(os.path.join(workdir, "metrics.jsonl"))[0]["kl"] is None  # not 0.0


def test_backend_by_name_bm25(tmp_path):
    """`backend.kind=bm25` searches a local corpus: its passages reach the trajectories in the
    reference's format, and no simulator model is loaded (its path is bogus); a corpus with a
    bad line is refused before anything runs."""
    corpus = tmp_path / "corpus.jsonl"
    from zsjax.data.tiny_fixture import COUNTRIES
    corpus.write_text("".join(json.dumps({"id": str(i), "title": c, "text": f"{c} is a land."})
                              + "\n" for i, c in enumerate(COUNTRIES)))
    config = tiny.get_config()
    config.train.steps = 1
    config.simulator.path = str(tmp_path / "no_such_simulator")
    config.rl.kl_coef = 0.0
    config.backend.update(kind="bm25", corpus=str(corpus), top_k=2)
    workdir = str(tmp_path / "bm25")
    train.run(config, workdir, generator=ScriptedGenerator)
    trajs = _lines(os.path.join(workdir, "trajectories.jsonl"))
    assert trajs and all(t["searches"] for t in trajs)
    for t in trajs:  # the scripted policy searches its question: "What is the capital of C"
        country = t["question"].split()[-1].rstrip("?")
        docs = t["searches"][0]["documents"].splitlines()
        assert docs == [f"Doc 1(Title: {country}) {country} is a land."]  # no other matches
    corpus.write_text('{"id": "1", "text": "fine"}\n{"id": "2"}\n')
    with pytest.raises(InputError, match=r"corpus.jsonl:2: a passage needs a non-empty 'text'"):
        train.run(config, str(tmp_path / "bad"), generator=ScriptedGenerator)


def test_an_estimator_and_a_reward_registered_from_outside_the_package(tmp_path, monkeypatch):
    """Extending zsjax as the README shows: one function and one registration each, no file of
    the package edited."""
    from zsjax.rl import algorithms, rewards
    seen = []

    def centred(x):  # every trajectory against the batch's mean reward
        seen.append(np.asarray(x.rewards))
        return (x.rewards - x.rewards.mean())[:, None] * x.mask, None

    def answer_length(predictions, golden):  # 0.1 per character of the answer
        return np.array([0.1 * len(p or "") for p in predictions], np.float32)

    monkeypatch.setitem(algorithms.ALGORITHMS, "centred", None)  # removed after the test
    algorithms.register("centred", algorithms.Algorithm(centred))
    monkeypatch.setitem(rewards.REWARDS, "answer_length", None)
    rewards.register_reward("answer_length", answer_length)
    from zsjax.search import FunctionBackend, factory
    monkeypatch.setitem(factory._KINDS, "echo", None)
    factory.register_backend("echo", lambda s: FunctionBackend(
        lambda request: f"Doc 1: {request.query} ({s.top_k})"))
    config = tiny.get_config()
    config.rl.update(algorithm="centred", reward="answer_length", questions_per_step=8)
    config.backend.update(kind="echo", top_k=7)
    config.train.steps = 2
    history = train.run(config, str(tmp_path), generator=ScriptedGenerator)
    trajs = _lines(os.path.join(tmp_path, "trajectories.jsonl"))
    docs = [d["documents"] for t in trajs for d in t["searches"]]  # 2 steps x 16, 1 search
    assert len(docs) == 32 and all(d.startswith("Doc 1: ") and d.endswith("(7)") for d in docs)
    assert len(seen) == 2 and all(r.shape == (16,) for r in seen)
    # the scripted policy answers "Vex" for the 2 Zorland rollouts of 16, "x" for the others
    for r, h in zip(seen, history):
        np.testing.assert_allclose(np.sort(r), [0.1] * 14 + [0.3] * 2, rtol=1e-6)
        assert h["reward"] == "answer_length"
        assert h["reward_mean"] == pytest.approx((14 * 0.1 + 2 * 0.3) / 16)
        assert h["f1_mean"] == pytest.approx(2 / 16)


def test_unknown_reward(tmp_path):
    config = tiny.get_config()
    config.rl.reward = "bleu"
    with pytest.raises(InputError, match="config.rl.reward='bleu' is not available"):
        train.run(config, str(tmp_path))


def test_unknown_algorithm(tmp_path):
    config = tiny.get_config()
    config.rl.algorithm = "dpo"
    with pytest.raises(InputError, match="config.rl.algorithm='dpo' is not available"):
        train.run(config, str(tmp_path))


def _events(tb_dir):
    """(tag, step, value) of every scalar in the TensorBoard event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


@pytest.mark.slow
def test_checkpoint_layout_tensorboard_and_keep_last(tmp_path):
    config = tiny.get_config()
    config.train.update(steps=3, checkpoint_every=1, keep_checkpoints=2, eval_every=2)
    workdir = str(tmp_path / "run")
    config.data.eval_paths = os.path.join(workdir, "fixture", "qa.jsonl")
    config.data.eval_limit = 4
    history = train.run(config, workdir, generator=ScriptedGenerator)
    # periodic evaluation at step 2 and at the end
    assert [h["step"] for h in history if "eval/qa/f1" in h] == [2, 3]
    evals = _lines(os.path.join(workdir, "eval.jsonl"))
    assert [e["step"] for e in evals] == [2, 3] and evals[0]["results"]["qa"]["n"] == 4
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
    assert {"state", "meta"} <= set(os.listdir(os.path.join(ckpt_dir, "3")))
    from zsjax.checkpointing import Checkpointer
    meta = Checkpointer(ckpt_dir).restore_meta()
    assert meta["step"] == 3 and meta["data_position"] == 3
    assert meta["rng"]["seed"] == 0 and meta["curriculum"]["total_steps"] == 3
    assert meta["policy_config"]["model_type"] == "qwen2"
    scalars = _events(os.path.join(workdir, "tb"))
    rewards = [(step, v) for tag, step, v in scalars if tag == "reward_mean"]
    assert rewards == [(h["step"], pytest.approx(h["reward_mean"], abs=1e-6)) for h in history]


@pytest.mark.slow
def test_overrides_and_misspelt_keys_from_the_command_line(tmp_path):
    import subprocess
    import sys
    base = [sys.executable, "-m", "zsjax.train", "--config", "configs/tiny.py",
            "--workdir", str(tmp_path / "w")]
    bad = subprocess.run(base + ["--config.rl.lrr=0.1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        """error: unknown config key 'lrr' Did you mean "lr" instead of "lrr"?"""]
    # a preset the file does not know, a missing config file: one line each, status 2
    for spec, match in (("configs/zerosearch.py:qwen3", "expected MODEL"),
                        ("configs/nonexist.py", "No such file")):
        bad = subprocess.run(base[:4] + [spec] + base[5:], capture_output=True, text=True)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and match in lines[0], bad.stderr
    # the config file by absolute path from another folder: it still imports configs.common
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = subprocess.run(
        [sys.executable, "-m", "zsjax.train", "--config", os.path.join(root, "configs",
                                                                        "tiny.py"),
         "--workdir", str(tmp_path / "w0"), "--config.rl.lrr=0.1"], capture_output=True,
        text=True, cwd=str(tmp_path))
    assert "lrr" in elsewhere.stderr and "No module named" not in elsewhere.stderr
    ok = subprocess.run(base + ["--config.train.steps=1", "--config.rl.algorithm=reinforce_pp",
                                "--config.train.tensorboard=False"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    rec = _lines(str(tmp_path / "w" / "metrics.jsonl"))
    assert [r["step"] for r in rec] == [1] and not os.path.exists(tmp_path / "w" / "tb")
    bad = subprocess.run(base[:-1] + [str(tmp_path / "w2"), "--config.mesh.data=3"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def _break(path, how):
    if how == "missing":
        import shutil
        shutil.rmtree(path)
    elif how == "malformed":
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write("{not json")
    elif how == "no_weights":
        os.remove(os.path.join(path, "model.safetensors"))
    elif how == "truncated":
        weights = os.path.join(path, "model.safetensors")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)


@pytest.mark.parametrize("how,match", [
    ("missing", "policy model: .*does not exist"),
    ("malformed", "policy model: .*not valid JSON"),
    ("no_weights", "safetensors"),
    ("truncated", "policy model: .*truncated"),
])
def test_bad_model_folders_fail_before_compute(tmp_path, how, match):
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))
    _break(fx["policy"], how)
    config = tiny.get_config()
    config.policy.path = fx["policy"]
    with pytest.raises(InputError, match=match):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_other_bad_inputs(tmp_path):
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))
    # a tokenizer from another model: SmolLM2-sized vocab against a 640-entry embedding
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(1000)}
    big = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    bad_tok = str(tmp_path / "bad_tok")
    import shutil
    shutil.copytree(fx["simulator"], bad_tok)
    os.remove(os.path.join(bad_tok, "tokenizer.json"))
    os.remove(os.path.join(bad_tok, "tokenizer_config.json"))
    PreTrainedTokenizerFast(tokenizer_object=big).save_pretrained(bad_tok)
    config = tiny.get_config()
    config.simulator.path = bad_tok
    with pytest.raises(InputError, match=r"tokenizer has 10\d\d tokens"):
        train.run(config, str(tmp_path / "a"))

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Who?", "golden_answers": ["x"]}) + "\n"
                    + json.dumps({"question": "Where?"}) + "\n")
    config = tiny.get_config()
    config.data.train_path = str(rows)
    with pytest.raises(InputError, match="QA data: .*row 1 \\(line 2\\) has no golden answers"):
        train.run(config, str(tmp_path / "b"))

    config = tiny.get_config()
    config.mesh.update(data=3, fsdp=1, tensor=1)  # 8 devices
    with pytest.raises(InputError, match="needs 3 devices|devices"):
        config.mesh.update(data=16)
        train.run(config, str(tmp_path / "c"))
    config = tiny.get_config()
    config.rl.mini_batches = 3  # 8 trajectories
    with pytest.raises(InputError, match="do not split"):
        train.run(config, str(tmp_path / "d"))
    config = tiny.get_config()
    config.mesh.update(data=1, fsdp=8, tensor=1)  # 8 rows over 8 devices is fine,
    config.rl.micro_batches = 2  # but micro-batches of 4 rows are not
    with pytest.raises(InputError, match="data x fsdp = 8"):
        train.run(config, str(tmp_path / "e"))
    config = tiny.get_config()
    config.rollout.temperature = 0.0  # greedy rollouts: the loss would divide by 0
    with pytest.raises(InputError, match="rollout.temperature must be > 0"):
        train.run(config, str(tmp_path / "f"))
    config = tiny.get_config()
    config.seed = -1
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        train.run(config, str(tmp_path / "g"))
    config = tiny.get_config()
    config.rl.freeze = "zzz"
    with pytest.raises(InputError, match="rl.freeze: freeze='zzz' matches no parameter"):
        train.run(config, str(tmp_path / "h"))


@pytest.mark.parametrize("key,value,match", [
    ("rl.kl_kind", "k9", r"rl.kl_kind='k9'; expected one of \('k1'"),
    ("rl.aggregation", "foo", "rl.aggregation='foo'"),
    ("rl.score_baseline", "question", "rl.score_baseline='question'"),
    ("rl.kl_placement", "reward", "rl.kl_placement='reward'"),
    ("rl.score_baseline", "group", "is for the algorithms that score in the reward"),
    ("policy.dtype", "float8", "policy.dtype='float8'"),
    ("simulator.style", "bogus", "simulator.style='bogus'"),
    ("rollout.top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("rollout.max_response_tokens", 0, "max_response_tokens must be an integer >= 1"),
    ("train.eval_batch_size", 0, "eval_batch_size must be"),
    ("train.keep_checkpoints", 0, "keep_checkpoints must be"),
    ("rl.questions_per_step", 0, "questions_per_step must be"),
    ("rl.epochs", 0, "rl.epochs must be"),
    ("rl.mini_batch_size", 16, "more than the step's 8 trajectories"),
    ("mesh.fsdp", 0, "mesh sizes are integers >= 1, or -1"),
    ("train.log_every", -1, "log_every must be an integer >= 0"),
    ("curriculum.base", 1.0, "base must be > 0 and not 1"),
    ("policy.scan_layers", "maybe", "expected auto, yes or no"),
])
def test_bad_values_fail_before_anything_runs(tmp_path, key, value, match):
    config = tiny.get_config()
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(InputError, match=match):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "fixture")  # nothing built


def test_a_workdir_holds_one_run_at_a_time(tmp_path):
    from zsjax.checkpointing import WorkdirLock
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with WorkdirLock(workdir):  # as another run would hold it
        with pytest.raises(InputError, match=f"another run .*pid {os.getpid()}.* is using"):
            train.run(tiny.get_config(), workdir)
    with WorkdirLock(workdir):  # released
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="must be a folder"):
        train.run(tiny.get_config(), str(tmp_path / "file"))


@pytest.mark.slow
def test_sampler_old_logprobs_train_like_recomputed_ones(tmp_path):
    """rl.old_logprobs="sampler" takes the rollouts' own model logprobs (before top-p) as the
    PPO ratio's denominator: the same run as recomputing them with the training forward, to
    float32 rounding (same rollouts, same losses and gradients), with top-p sampling (0.95)."""
    runs = {}
    for mode in ("recompute", "sampler"):
        config = tiny.get_config()
        config.train.update(steps=2, tensorboard=False)
        config.rl.old_logprobs = mode
        runs[mode] = train.run(config, str(tmp_path / mode))
    for a, b in zip(runs["recompute"], runs["sampler"]):
        assert a["reward_mean"] == b["reward_mean"]
        assert a["response_tokens_mean"] == b["response_tokens_mean"]
        for key in ("policy_loss", "grad_norm", "kl", "entropy", "clip_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
        # 0.5 (logp - old)^2 over the policy's tokens: the policy's move over the step's
        # updates, plus (for the sampler's logprobs) their rounding difference
        assert a["approx_kl_old"] == pytest.approx(b["approx_kl_old"], rel=1e-2, abs=1e-9)
    config = tiny.get_config()
    config.rl.old_logprobs = "both"
    with pytest.raises(InputError, match="'recompute' or 'sampler'"):
        train.run(config, str(tmp_path / "bad"))


def test_existing_checkpoints_need_resume(tmp_path):
    config = tiny.get_config()
    config.train.steps = 1
    train.run(config, str(tmp_path), generator=ScriptedGenerator)
    config.resume = False
    with pytest.raises(InputError, match="already holds checkpoints"):
        train.run(config, str(tmp_path), generator=ScriptedGenerator)


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    import zsjax.rl.advantages as A
    from zsjax.checkpointing import Checkpointer
    real = A.group_normalized
    calls = []

    def poisoned(rewards, **kw):  # NaN advantages on the steps in `bad`
        calls.append(1)
        out = real(rewards, **kw)
        return out * jnp.nan if len(calls) in bad else out

    monkeypatch.setattr(A, "group_normalized", poisoned)
    bad = {2}
    config = tiny.get_config()
    config.train.update(steps=3, checkpoint_every=1, keep_checkpoints=5)
    workdir = str(tmp_path / "one")
    history = train.run(config, workdir, generator=ScriptedGenerator)
    assert [h["skipped_updates"] for h in history] == [0, 2, 0]  # 2 mini-batches
    assert history[1]["policy_loss"] is None and history[2]["policy_loss"] is not None
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    like = ckpt.restore_raw(1)["state"][0]["params"]
    p1, p2, p3 = (ckpt.restore_raw(s)["state"][0]["params"] for s in (1, 2, 3))
    same = jax.tree.map(lambda a, b: bool((a == b).all()), p1, p2)
    assert all(jax.tree.leaves(same))  # the NaN step left the params alone
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), p2, p3)))
    del like

    calls.clear()
    bad = {2, 3, 4, 5}
    config.train.update(steps=6, max_nonfinite_steps=2)
    workdir = str(tmp_path / "two")
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        train.run(config, workdir, generator=ScriptedGenerator)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 2  # step 3 (the second NaN step in a row) was not saved
    # but its records were, for inspection (a resume drops them with the step)
    assert [r["step"] for r in _lines(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3]
    assert {r["step"] for r in _lines(os.path.join(workdir, "trajectories.jsonl"))} == {1, 2, 3}
    params = ckpt.restore_raw(2)["state"][0]["params"]
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))


def _train_cmd(workdir, steps):
    import sys
    return [sys.executable, "-m", "zsjax.train", "--config", "configs/tiny.py",
            "--workdir", str(workdir), f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=1"]


_KILL_STEPS = 4


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The reference for the SIGKILL tests: the same run, never interrupted (made once)."""
    import subprocess
    ref = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(_train_cmd(ref, _KILL_STEPS), capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_lines", [1, 2])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, kill_after_lines, uninterrupted_run):
    """A run killed with SIGKILL at a random moment after `kill_after_lines` steps were logged
    (often in the middle of an asynchronous checkpoint save) and then resumed ends with exactly
    the params of an uninterrupted run, and with the same per-step rewards."""
    import signal
    import subprocess
    import time

    import jax

    from zsjax.models import load_hf
    steps = _KILL_STEPS
    env = dict(os.environ)

    work = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(work, steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_lines:
            break
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng(kill_after_lines).uniform(0, 0.5)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "policy_hf").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd(work, steps), capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, want = load_hf(str(uninterrupted_run / "policy_hf"))
    _, got = load_hf(str(work / "policy_hf"))
    equal = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), want, got)
    assert all(jax.tree.leaves(equal))
    ref_rec, got_rec = _lines(uninterrupted_run / "metrics.jsonl"), _lines(metrics)
    assert [r["step"] for r in got_rec] == list(range(1, steps + 1))
    assert [r["reward_mean"] for r in got_rec] == [r["reward_mean"] for r in ref_rec]
    assert [r["entropy"] for r in got_rec] == [r["entropy"] for r in ref_rec]


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_then_resume_is_bitwise_identical(tmp_path,
                                                                        uninterrupted_run):
    """SIGTERM (a preemption notice) during step 2: the run finishes that step, checkpoints it
    (though checkpoint_every is larger), exits with status 143 and a one-line message; the same
    command then resumes from it to the uninterrupted run's exact params and rewards."""
    import signal
    import subprocess
    import time

    import jax

    from zsjax.models import load_hf
    work = tmp_path / "preempted"
    cmd = _train_cmd(work, _KILL_STEPS)[:-1] + ["--config.train.checkpoint_every=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-2000:]
    done = len(_lines(metrics))
    assert 1 <= done < _KILL_STEPS
    assert f"stopped: SIGTERM: checkpointed step {done} of {_KILL_STEPS}" in err
    assert sorted(os.listdir(work / "checkpoints")) == [str(done)]
    assert not (work / "policy_hf").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {done}" in resumed.stderr
    _, want = load_hf(str(uninterrupted_run / "policy_hf"))
    _, got = load_hf(str(work / "policy_hf"))
    equal = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), want, got)
    assert all(jax.tree.leaves(equal))
    ref_rec, got_rec = _lines(uninterrupted_run / "metrics.jsonl"), _lines(metrics)
    assert [r["step"] for r in got_rec] == list(range(1, _KILL_STEPS + 1))
    assert [r["reward_mean"] for r in got_rec] == [r["reward_mean"] for r in ref_rec]


@pytest.mark.slow
def test_smollm2_recipe_runs_on_real_weights(tmp_path, smollm2_dir):
    """configs/smollm2.py end to end on the real SmolLM2 weights (2 short steps), then a
    greedy evaluation of the checkpoint with the same model as prompt-only simulator."""
    from configs import smollm2
    from zsjax import evaluate
    config = smollm2.get_config("2")
    config.policy.path = config.simulator.path = smollm2_dir
    config.rollout.update(max_response_tokens=32, max_obs_tokens=96)
    config.simulator.max_new_tokens = 48
    workdir = str(tmp_path / "run")
    history = train.run(config, workdir)
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["entropy"]) and h["skipped_updates"] == 0 for h in history)
    cfg, params, tok = evaluate.load_policy(workdir)
    assert cfg.vocab_size == 49152 and len(tok) <= cfg.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_same_config_on_a_mesh(tmp_path, algorithm):
    """The tiny config on a 2 x 2 x 2 mesh of fake CPU devices: the same metrics as on one
    device (scripted rollouts, so both see the same tokens); PPO's critic too."""
    out = {}
    for name, mesh in (("one", (1, 1, 1)), ("mesh", (2, 2, 2))):
        config = tiny.get_config(algorithm)
        config.train.steps = 2
        config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        out[name] = train.run(config, str(tmp_path / name), generator=ScriptedGenerator)
    keys = ("reward_mean", "entropy", "policy_loss", "kl", "grad_norm")
    for a, b in zip(out["one"], out["mesh"]):
        for key in keys + (("value_loss",) if algorithm == "ppo" else ()):
            if a[key] is not None or b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_scan_layers_trains_like_the_unrolled_layers(tmp_path, algorithm):
    """policy.scan_layers (the layers as one scan over stacked params), on a 2 x 2 x 2 mesh:
    the metrics and the exported weights of the unrolled run on one device; PPO's critic too."""
    out = {}
    for name, scan, mesh in (("unrolled", "no", (1, 1, 1)), ("scanned", "yes", (2, 2, 2))):
        config = tiny.get_config(algorithm)
        config.train.steps = 2
        config.policy.scan_layers = scan
        config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        out[name] = train.run(config, str(tmp_path / name), generator=ScriptedGenerator)
    for a, b in zip(out["unrolled"], out["scanned"]):
        for key in ("reward_mean", "entropy", "policy_loss", "kl", "grad_norm", "value_loss"):
            if a[key] is not None or b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    from zsjax import evaluate
    from zsjax.models import load_hf
    _, want = load_hf(str(tmp_path / "unrolled" / "policy_hf"))
    _, got = load_hf(str(tmp_path / "scanned" / "policy_hf"))  # written per layer
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # the checkpoint holds the stacked layers; evaluation reads them as they are
    cfg, params, _ = evaluate.load_policy(str(tmp_path / "scanned"))
    assert cfg.scan_layers and "layers" in params
    np.testing.assert_allclose(params["layers"]["mlp"]["up_proj"]["kernel"][1],
                               want["layers_1"]["mlp"]["up_proj"]["kernel"], atol=1e-6)


def test_scan_layers_auto_scans_deep_models_only(tmp_path):
    from configs import common
    from zsjax.models import ModelConfig, init_params, save_hf
    deep = ModelConfig(vocab_size=64, d_model=16, n_layers=8, n_heads=2, n_kv_heads=1,
                       head_dim=8, d_ff=32)
    save_hf(deep, init_params(deep, jax.random.key(0)), str(tmp_path / "deep"))
    config = tiny.get_config()
    assert config.policy.scan_layers == common.base_config().policy.scan_layers == "auto"
    assert train._scan_layers(config, str(tmp_path / "deep"), None)
    config.rl.freeze = "layers_0/"  # per-layer freezing needs the layers apart
    assert not train._scan_layers(config, str(tmp_path / "deep"), None)
    config.rl.freeze = ""
    assert not train._scan_layers(config, str(tmp_path / "deep"), lora_cfg=object())
    shallow = dataclasses.replace(deep, n_layers=2)  # the tiny fixture's depth
    save_hf(shallow, init_params(shallow, jax.random.key(0)), str(tmp_path / "shallow"))
    assert not train._scan_layers(config, str(tmp_path / "shallow"), None)
    config.policy.scan_layers = "yes"
    assert train._scan_layers(config, str(tmp_path / "shallow"), None)


@pytest.mark.parametrize("key,value,match", [
    ("policy.lora.rank", 4, "scan_layers with policy.lora"),
    ("rl.freeze", "layers_0", "names per-layer paths"),
])
def test_scan_layers_refuses_per_layer_settings(tmp_path, key, value, match):
    config = tiny.get_config()
    config.policy.scan_layers = "yes"
    group, *rest = key.split(".")
    target = config[group]
    for k in rest[:-1]:
        target = target[k]
    target[rest[-1]] = value
    with pytest.raises(InputError, match=match):
        train.run(config, str(tmp_path / "run"))


def test_generation_mesh_sizes_left_unset():
    """The documented generation meshes: sizes left at 0 beside set ones are 1, except data,
    which takes the rest of the process's devices (or of the `devices` slice)."""
    import jax
    if jax.local_device_count() < 8:
        pytest.skip("needs 8 devices")

    def shape(**sizes):
        config = tiny.get_config()
        config.rollout_mesh.update(**sizes)
        mesh = train._meshes(config, None)[0]
        return tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")), len(mesh.devices.flat)

    assert shape(tensor=4) == ((2, 1, 4), 8)
    assert shape(data=2, tensor=4) == ((2, 1, 4), 8)
    assert shape(tensor=4, devices="0:4") == ((1, 1, 4), 4)
    assert shape(tensor=-1, devices="4:8") == ((1, 1, 4), 4)
    assert shape(fsdp=2) == ((4, 2, 1), 8)
    assert shape(data=2) == ((2, 1, 1), 2)
    for bad in (dict(data=-2), dict(data=-1, tensor=-1)):
        with pytest.raises(InputError, match="mesh sizes"):
            shape(**bad)
    with pytest.raises(InputError, match="needs 16 devices"):
        shape(data=4, tensor=4)


@pytest.mark.slow
def test_separate_rollout_and_simulator_meshes(tmp_path):
    """Policy rollouts on a tensor-parallel mesh of devices 0-1, the simulator on devices 2-3,
    the update on an fsdp x tensor mesh: the params move between meshes inside the program, and
    (sampling being per trajectory) the run equals one that does everything on one mesh."""
    import jax
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    from zsjax.models import load_hf
    runs = {}
    for name in ("same", "split"):
        config = tiny.get_config()
        config.train.update(steps=2, tensorboard=False)
        if name == "same":
            config.mesh.update(data=4)
        else:
            config.mesh.update(fsdp=2, tensor=2)
            config.rollout_mesh.update(data=1, fsdp=1, tensor=2, devices="0:2")
            config.simulator_mesh.update(devices="2:4")
        train.run(config, str(tmp_path / name))
        runs[name] = ([(r["question"], r["response"])
                       for r in _lines(tmp_path / name / "trajectories.jsonl")],
                      jax.tree.leaves(load_hf(str(tmp_path / name / "policy_hf"))[1]))
    assert runs["same"][0] == runs["split"][0]
    for a, b in zip(runs["same"][1], runs["split"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    config = tiny.get_config()
    config.rollout_mesh.update(devices="9:12")
    with pytest.raises(InputError, match="selects none"):
        train.run(config, str(tmp_path / "bad"))
    with pytest.raises(InputError, match="is a URL"):
        train.run(tiny.get_config(), "gs://bucket/run")


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_trains_float32_weights(tmp_path, param_dtype):
    """Under bfloat16 compute, `policy.param_dtype` float32 (the default) keeps the trained
    weights in float32, so lr 1e-6 updates move them: as bfloat16 weights (the rounding step
    at 0.02 is about 1e-4) nearly all of those updates round away."""
    # In its own process, as a user runs it: in the default suite's one long-lived process,
    # XLA:CPU crashed while compiling this bfloat16 step (SIGSEGV in backend_compile_and_load,
    # or SIGABRT serializing it for the compilation cache) after the suite's hundreds of other
    # programs, three times on one machine; run alone it passes.
    import subprocess
    import sys

    from zsjax.models import load_hf
    workdir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "zsjax.train", "--config", "configs/tiny.py",
                    "--workdir", str(workdir), "--config.train.steps=1",
                    "--config.train.tensorboard=False", "--config.train.progress=False",
                    "--config.rl.lr=1e-6", "--config.policy.dtype=bfloat16",
                    f"--config.policy.param_dtype={param_dtype}"],
                   cwd=os.path.join(os.path.dirname(__file__), ".."), check=True)
    history = _lines(workdir / "metrics.jsonl")
    assert np.isfinite(history[0]["grad_norm"]) and history[0]["grad_norm"] > 0
    _, before = load_hf(str(workdir / "fixture" / "policy_hf"), dtype=param_dtype)
    _, after = load_hf(str(workdir / "policy_hf"), dtype=param_dtype)
    moved = np.mean(np.concatenate([
        (np.asarray(a, np.float32) != np.asarray(b, np.float32)).ravel()
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]))
    if param_dtype == "float32":
        assert moved > 0.9, moved
    else:
        assert moved < 0.2, moved


@pytest.mark.slow
def test_resuming_with_another_algorithm_is_a_clear_error(tmp_path):
    config = tiny.get_config()
    config.train.update(steps=1, tensorboard=False)
    workdir = str(tmp_path / "run")
    train.run(config, workdir, generator=ScriptedGenerator)
    config = tiny.get_config("ppo")
    config.train.update(steps=2, tensorboard=False)
    with pytest.raises(InputError, match="written by rl.algorithm='grpo', not 'ppo'"):
        train.run(config, workdir, generator=ScriptedGenerator)


def test_ctrl_c_is_a_stop_request_like_sigterm():
    """SIGINT (Ctrl-C) and SIGTERM are recorded, not fatal, while a run's steps go on; the stop
    is named after the signal and exits 128 + its number. The handlers are restored after."""
    import signal

    from zsjax.checkpointing import StopOnSignal
    before = signal.getsignal(signal.SIGINT)
    for signum, name, code in ((signal.SIGINT, "SIGINT", 130), (signal.SIGTERM, "SIGTERM", 143)):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signum)
            assert stop.received and stop.requested()
            stopped = stop.stopped("checkpointed step 3")
        assert stopped.code == code and str(stopped) == f"{name}: checkpointed step 3"
    assert signal.getsignal(signal.SIGINT) is before


def test_smollm2_config_reports_bad_paths_and_missing_packages_before_a_fetch(tmp_path,
                                                                            monkeypatch):
    from configs import smollm2
    from zsjax.tools import fetch_smollm2
    fetched = []
    monkeypatch.setattr(fetch_smollm2, "fetch", lambda *a, **k: fetched.append(1))
    config = smollm2.get_config()
    config.policy.path = str(tmp_path / "no_such_model")
    with pytest.raises(InputError, match="policy model"):
        train.run(config, str(tmp_path / "a"))
    assert not fetched

    def missing(*a, **k):
        raise fetch_smollm2.MissingConverter("fetching SmolLM2 ... needs torch")
    monkeypatch.setattr(fetch_smollm2, "fetch", missing)
    with pytest.raises(InputError, match="needs torch.*--config.policy.path"):
        train.run(smollm2.get_config(), str(tmp_path / "b"))


def test_bad_qa_data_fails_before_the_fixture_is_built(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "golden_answers": ["a"]}\n{"question": \n')
    config = tiny.get_config()
    config.data.train_path = str(bad)
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON \(.*, column \d+\)$"):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "fixture")


def test_progress_in_a_log_file_is_short_lines(tmp_path, capsys):
    """stderr not a terminal: plain lines, no carriage returns, at most one per interval."""
    from zsjax import progress
    bar = progress.bar(5, "train", "step", every=3600)
    for _ in range(5):
        bar.update(1)
        bar.set_postfix(reward="0.5")
    bar.close()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == 1  # the end only: the interval never passed
    assert lines[0].startswith("train: 5/5 step (100%)") and lines[0].endswith("reward=0.5")
