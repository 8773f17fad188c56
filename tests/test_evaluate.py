"""`zsjax.evaluate`: scores against a plain-Python SQuAD reference, params restored from a training
checkpoint against the exported Hugging Face folder, the command line end to end, and every
bad-input error before any model is loaded."""

import json
import os
import re
import string
import subprocess
import sys
from collections import Counter

import jax
import numpy as np

import zsjax.search
import pytest

from configs import evaluate as eval_configs
from configs import tiny
from zsjax import evaluate as E
from zsjax import sharding
from zsjax.data.qa import QARow
from zsjax.models.tokenizer import load_tokenizer
from zsjax.sampling import GenerateResult
from zsjax.search import FunctionBackend, RolloutSettings
from zsjax.data import tiny_fixture

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "evaluate.py")


# --- Plain-Python reference (SQuAD normalisation, max over golden answers) --------------------

def ref_normalize(s):
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def ref_scores(pred, golds):
    """(exact match, substring match, F1) of one prediction."""
    if pred is None:
        return 0.0, 0.0, 0.0
    p = ref_normalize(pred)
    em = float(any(p == ref_normalize(g) for g in golds))
    sub = float(any(ref_normalize(g) in p for g in golds))
    f1 = 0.0
    for g in golds:
        same = sum((Counter(p.split()) & Counter(ref_normalize(g).split())).values())
        if same:
            f1 = max(f1, 2 * same / (len(p.split()) + len(ref_normalize(g).split())))
    return em, sub, f1


# --- Fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return tiny_fixture.make(str(tmp_path_factory.mktemp("tiny_fixture")))


@pytest.fixture(scope="module")
def trained(fixture, tmp_path_factory):
    """A one-step tiny training run: its workdir holds checkpoints/1 and policy_hf."""
    from zsjax import train
    config = tiny.get_config()
    config.train.steps = 1
    config.policy.path, config.simulator.path = fixture["policy"], fixture["simulator"]
    config.data.train_path = fixture["qa"]
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.run(config, workdir)
    return workdir


def _write_qa(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# --- evaluate() with a scripted policy ------------------------------------------------------

# Per country: the policy's final text (None: it never answers).
REPLIES = {"Zorland": "<answer> Vex </answer>",  # exact
           "Quessia": "<answer> the city of Lorn </answer>",  # substring, F1 0.5
           "Brevania": "<answer> Peltx </answer>",  # wrong
           "Oskelia": None,  # no answer at all
           "Dunrath": "<answer> DUNRA! </answer>",  # exact after normalisation
           "Mirevo": "<answer> Miro Miro city </answer>",  # substring, F1 0.5
           "Talvenia": "<answer> Tal </answer>",
           "Korsica": "<answer> Kors, Korsica </answer>"}


class ScriptedGenerator:
    """Stands in for ModelTurnGenerator: searches on turn 0, then replies per REPLIES."""

    temperatures = []

    def __init__(self, config, params, tokenizer, settings, **kwargs):
        self.tok = tokenizer
        ScriptedGenerator.temperatures.append(settings.temperature)

    def __call__(self, inputs):
        out = GenerateResult([], [], [], [])
        for ctx in inputs.contexts:
            question = self.tok.decode(ctx).rsplit("Question: ", 1)[1]
            country = question.split("capital of ")[1].split("?")[0]
            if inputs.turn == 0:
                reply = f"<search> capital {country} </search>"
            else:
                reply = REPLIES[country] or "I am not sure."
            ids = self.tok.encode(reply, add_special_tokens=False)
            out.tokens.append(ids)
            out.logprobs.append(np.zeros(len(ids)))
            out.model_logprobs.append(np.zeros(len(ids)))
            out.finish_reasons.append("stop")
        return out


def test_scores_match_a_plain_python_reference(fixture, capsys):
    rows = [QARow(r["question"], tuple(r["golden_answers"])) for r in tiny_fixture.qa_rows()]
    datasets = {"first": rows[:3], "rest": rows[3:]}
    backend = FunctionBackend(lambda r: f"Doc 1: {r.query}.")
    settings = RolloutSettings(max_turns=2, max_response_tokens=32, temperature=1.0)
    results = E.evaluate(None, None, load_tokenizer(fixture["policy"]), datasets, backend,
                         settings=settings, batch_size=2, progress=True,
                         generator=ScriptedGenerator)
    assert ScriptedGenerator.temperatures[-1] == 0.0  # greedy, whatever the settings say
    assert list(results) == ["first", "rest"]
    for name, ds in datasets.items():
        preds = [None if REPLIES[r.question.split()[-1][:-1]] is None
                 else REPLIES[r.question.split()[-1][:-1]][9:-10] for r in ds]
        ref = np.array([ref_scores(p, r.golden_answers) for p, r in zip(preds, ds)])
        got = results[name]
        assert got["n"] == len(ds)
        assert got["exact_match"] == pytest.approx(ref[:, 0].mean())
        assert got["substring_match"] == pytest.approx(ref[:, 1].mean())
        assert got["f1"] == pytest.approx(ref[:, 2].mean(), rel=1e-6)
        assert got["answered_fraction"] == pytest.approx(np.mean([p is not None for p in preds]))
        assert got["searches_mean"] == 1.0 and got["response_tokens_mean"] > 0
        assert all(type(v) in (int, float) for v in got.values())
    # the scores are not all equal: the reference distinguishes the three metrics here
    assert results["rest"]["exact_match"] < results["rest"]["substring_match"]
    assert results["rest"]["f1"] not in (results["rest"]["exact_match"],
                                         results["rest"]["substring_match"])
    # batches of 2: 2 + 3 rollouts, one search call each
    assert [len(c) for c in backend.calls] == [2, 1, 2, 2, 1]
    assert "rest" in capsys.readouterr().err  # progress on stderr
    table = E.format_table(results)
    assert re.search(r'substring "EM"', table) and "average" in table
    average = np.mean([results[n]["f1"] for n in datasets])
    assert f"{100 * average:.1f}" in table.splitlines()[3]
    assert "average" not in E.format_table({"first": results["first"]})


# --- Loading a policy -----------------------------------------------------------------------

def test_checkpoint_params_equal_the_exported_policy(trained):
    from zsjax.models import load_hf
    hf_config, hf_params = load_hf(os.path.join(trained, "policy_hf"))
    for path, step in ((trained, None), (os.path.join(trained, "checkpoints"), 1)):
        config, params, tokenizer = E.load_policy(path, step=step)
        assert config == hf_config
        assert jax.tree.structure(params) == jax.tree.structure(hf_params)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        assert len(tokenizer) <= config.vocab_size
    _, params, _ = E.load_policy(trained, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    # restored straight onto a mesh's shardings
    mesh = sharding.mesh_from_config(1, 2, 1)
    _, params, _ = E.load_policy(trained, mesh=mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        assert a.sharding.mesh == mesh and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"has no step 7; it has \[1\]"):
        E.load_policy(trained, step=7)
    # a relative path, as the README writes it (orbax itself takes absolute paths only)
    relative = os.path.relpath(trained)
    assert not os.path.isabs(relative)
    _, params, _ = E.load_policy(relative)
    assert np.array_equal(np.asarray(jax.tree.leaves(params)[0]),
                          np.asarray(jax.tree.leaves(hf_params)[0]))


def test_policy_path_errors(fixture, tmp_path):
    from zsjax.models import ModelConfig, init_params, save_hf
    with pytest.raises(FileNotFoundError, match="policy path .*nowhere does not exist"):
        E.load_policy(str(tmp_path / "nowhere"))
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither has no config.json and no checkpoints"):
        E.load_policy(str(tmp_path / "neither"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="checkpoints has no saved steps"):
        E.load_policy(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="is a Hugging Face folder"):
        E.load_policy(fixture["policy"], step=3)
    # a model whose embedding table is smaller than its tokenizer
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=16, d_ff=64, family="qwen2", qkv_bias=True,
                         tie_embeddings=True)
    small = str(tmp_path / "small_vocab")
    save_hf(config, init_params(config, jax.random.key(0)), small,
            tokenizer_dir=os.path.join(os.path.dirname(fixture["policy"]), "tokenizer"))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's embedding "
                                         "table has only 64"):
        E.load_policy(small)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        E.load_policy(str(tmp_path / "broken"))


# --- The command line -----------------------------------------------------------------------

def _config(policy, simulator, paths, **changes):
    c = eval_configs.get_config("tiny")
    c.policy.path, c.backend.simulator_path, c.data.paths = policy, simulator, paths
    c.progress = False
    for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def test_run_end_to_end_from_a_checkpoint(trained, fixture, tmp_path, capsys):
    rows = tiny_fixture.qa_rows()
    a = _write_qa(tmp_path / "capitals.jsonl", rows)
    b = _write_qa(tmp_path / "capitals_reversed.jsonl", rows[::-1][:6])
    config = _config(trained, fixture["simulator"], f"{a},{b}", data__limit=4)
    config.batch_size = 4
    results = E.run(config, str(tmp_path / "eval"))
    out = capsys.readouterr().out
    record = json.load(open(tmp_path / "eval" / "eval.json"))
    assert record["policy"] == trained and record["step"] == 1
    assert record["backend"] == "simulator"
    assert record["results"] == results and list(results) == ["capitals", "capitals_reversed"]
    for r in results.values():
        assert r["n"] == 4
        assert all(0.0 <= r[k] <= 1.0 for k in ("exact_match", "substring_match", "f1",
                                               "answered_fraction"))
        assert r["searches_mean"] >= 0 and r["response_tokens_mean"] > 0 and r["seconds"] > 0
    for name in ("capitals", "capitals_reversed", "average", 'substring "EM"'):
        assert name in out


def test_run_with_a_local_bm25_engine(fixture, tmp_path):
    """backend.kind=bm25: the corpus's passages reach the trajectories, in the reference's
    format, and no simulator is loaded."""
    rows = tiny_fixture.qa_rows()
    qa = _write_qa(tmp_path / "capitals.jsonl", rows)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": r["golden_answers"][0],
                                          "text": f"{r['golden_answers'][0]} is a capital."})
                              + "\n" for i, r in enumerate(rows)))
    config = _config(fixture["policy"], str(tmp_path / "no_simulator"), qa,
                     backend__kind="bm25", backend__corpus=str(corpus), backend__top_k=2)
    config.tiny_fixture = False
    backend = E._make_backend(config.backend, ("", "float32", None, None, None), 0, None)
    docs = backend.search([zsjax.search.SearchRequest("Vex capital", "q", ("Vex",))])
    assert docs[0].splitlines()[0] == "Doc 1(Title: Vex) Vex is a capital."
    results = E.run(config, str(tmp_path / "eval"))
    assert results["capitals"]["n"] == len(rows)
    assert json.load(open(tmp_path / "eval" / "eval.json"))["backend"] == "bm25"


def test_simulator_prompt_defaults_to_training_s_even_with_a_chat_template(fixture, tmp_path):
    """A fine-tuned simulator keeps its base model's chat template (Qwen2.5-Instruct): the
    evaluation must still prompt it as training does (`finetuned`), not switch to the
    prompt-only one-shot prompt because a template exists."""
    import shutil
    sim = str(tmp_path / "sim")
    shutil.copytree(fixture["simulator"], sim)
    cfg_path = os.path.join(sim, "tokenizer_config.json")
    tok_cfg = json.load(open(cfg_path))
    tok_cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    json.dump(tok_cfg, open(cfg_path, "w"))
    b = _config(fixture["policy"], sim, "x.jsonl").backend
    backend = E._make_backend(b, ("", "float32", None, None, None), 0, None)
    assert backend.tokenizer.chat_template and backend.style == "finetuned"
    b.style = "prompt_only"
    assert E._make_backend(b, ("", "float32", None, None, None), 0, None).style == "prompt_only"


def test_help_and_one_line_errors(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "zsjax.evaluate", "--help"],
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0, help_.stderr
    qa = _write_qa(tmp_path / "qa.jsonl", tiny_fixture.qa_rows())
    bad = subprocess.run(
        [sys.executable, "-m", "zsjax.evaluate", "--config", CONFIG_FILE, "--workdir",
         str(tmp_path / "out"), f"--config.policy.path={tmp_path / 'nowhere'}",
         f"--config.data.paths={qa}", "--config.backend.kind=retriever_url",
         "--config.backend.url=http://127.0.0.1:9"], capture_output=True, text=True,
        timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: policy path ")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("case, error, match", [
    ("missing policy", FileNotFoundError, "policy path .*nowhere does not exist"),
    ("neither", ValueError, "has no config.json and no checkpoints"),
    ("no answers", ValueError, r"row 1 \(line 2\) has no golden answers"),
    ("missing QA file", FileNotFoundError, "QA file .*missing.jsonl does not exist"),
    ("unknown backend", ValueError, "config.backend.kind='google' is unknown"),
    ("missing url", ValueError, "kind='simulator_url' needs config.backend.url"),
    ("missing simulator", FileNotFoundError, "model dir .*nowhere does not exist"),
    ("no policy", ValueError, "config.policy.path is empty"),
    ("bm25 without corpus", ValueError, "kind='bm25' needs config.backend.corpus"),
    ("malformed corpus", ValueError, r"corpus.jsonl:2: not valid JSON"),
])
def test_run_rejects_bad_input_before_loading_models(fixture, tmp_path, monkeypatch, case,
                                                     error, match):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(E, "_load", no_loading)
    qa = _write_qa(tmp_path / "qa.jsonl", tiny_fixture.qa_rows())
    policy, simulator, paths = fixture["policy"], fixture["simulator"], qa
    changes = {}
    if case == "missing policy":
        policy = str(tmp_path / "nowhere")
    elif case == "neither":
        policy = str(tmp_path)
    elif case == "no answers":
        paths = qa + "," + _write_qa(tmp_path / "bad.jsonl", [
            {"question": "q1", "golden_answers": ["a"]}, {"question": "q2"}])
    elif case == "missing QA file":
        paths = qa + "," + str(tmp_path / "missing.jsonl")
    elif case == "unknown backend":
        changes["backend__kind"] = "google"
    elif case == "missing url":
        changes["backend__kind"] = "simulator_url"
    elif case == "missing simulator":
        simulator = str(tmp_path / "nowhere")
    elif case == "no policy":
        policy = ""
    elif case == "bm25 without corpus":
        changes["backend__kind"] = "bm25"
    elif case == "malformed corpus":
        (tmp_path / "corpus.jsonl").write_text('{"id": "1", "text": "a"}\n{"id": \n')
        changes.update(backend__kind="bm25", backend__corpus=str(tmp_path / "corpus.jsonl"))
    config = _config(policy, simulator, paths, **changes)
    config.tiny_fixture = False
    with pytest.raises(error, match=match):
        E.run(config, str(tmp_path / "out"))
