"""The HotpotQA recipe end to end on tiny random models and a handful of rows: every stage runs,
the workdir holds what the recipe promises, and a rerun skips the finished stages."""

import json
import os

import pytest

from zsjax.recipes import hotpotqa as H
from zsjax.data import tiny_fixture

TINY = {
    "sim_steps": 2, "sim_batch": 4, "cold_steps": 2, "cold_batch": 4, "test_rows": 8,
    "ood_rows": 2, "quality_rows": 3, "eval_batch": 8, "dtype": "float32",
    "response_tokens": 12, "sim_tokens": 16, "max_length": 384, "length_multiple": 64,
    "rl": {"train.steps": 1, "rl.questions_per_step": 2, "rl.rollouts_per_question": 2,
           "rl.micro_batches": 1, "rollout.max_response_tokens": 12,
           "simulator.max_new_tokens": 16, "policy.dtype": "float32",
           "simulator.dtype": "float32", "train.progress": False, "train.tensorboard": False,
           "data.length_multiple": 64},
}
CITIES = ["Vex", "Lorn", "Pelt", "Oskel", "Dunra", "Miro", "Tal", "Kors"]


def _data(root):
    """HotpotQA-shaped train and test rows (untitled and titled evidence, both types) and the
    other datasets' QA files."""
    os.makedirs(root / "hotpotqa")
    os.makedirs(root / "qa")
    people = [f"Person{i}" for i in range(20)]

    def row(i, split, titled):
        p, c = people[i], CITIES[i % len(CITIES)]
        qtype = "comparison" if i % 4 == 3 else "bridge"
        return {"id": f"{split}-{i}", "question": f"Where was {p} born?", "golden_answers": [c],
                "evidence": [{"title": p if titled else "", "text": f"{p} was born in {c}."},
                             {"title": c if titled else "", "text": f"{c} is a City of Zorland."}],
                "type": qtype}
    for split, rows, titled in (("train", range(0, 12), False), ("test", range(12, 20), True)):
        with open(root / "hotpotqa" / f"{split}.jsonl", "w") as f:
            for i in rows:
                f.write(json.dumps(row(i, split, titled)) + "\n")
    for name in H.OOD:
        with open(root / "qa" / f"{name}.test.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"question": f"What is {name} {i}?",
                                    "golden_answers": [CITIES[i]]}) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recipe_end_to_end_on_tiny_models(tmp_path, capsys):
    _data(tmp_path / "data")
    model = tiny_fixture.make(str(tmp_path / "fixture"))["policy"]
    work = str(tmp_path / "work")
    summary = H.run(work, quick=False, data_dir=str(tmp_path / "data"), model_dir=model,
                    overrides=TINY)
    for name in ("simulator_hf", "cold_start_hf", "policy_hf", "rl_bm25/policy_hf"):
        assert os.path.isfile(os.path.join(work, name, "config.json")), name
    for name in ("summary.json", "curves.png", "results.png", "data/corpus.jsonl",
                 "data/corpus.jsonl.bm25/zsjax_fingerprint.txt"):
        assert os.path.isfile(os.path.join(work, name)), name
    with open(os.path.join(work, "summary.json")) as f:
        assert json.load(f)["headline"] == summary["headline"]
    table = summary["results"]["hotpotqa_test"]
    assert set(table) == {"cold_start", "policy", "policy_bm25"}
    assert set(table["cold_start"]) == {"bm25", "simulator", "none"}
    assert table["cold_start"]["bm25"]["all"]["n"] == 8
    assert {table["cold_start"]["bm25"][k]["n"] for k in ("bridge", "comparison")} == {6, 2}
    assert set(summary["results"]["other_datasets"]["policy"]) == set(H.OOD)
    assert set(summary["simulator_quality"]) == {"finetuned", "prompt_only", "n"}
    with open(os.path.join(work, "data", "corpus.jsonl")) as f:
        assert len(f.readlines()) == 12 * 2 - 4 + 8 + 8  # untitled train, titled test passages
    with open(os.path.join(work, "rl_simulator", "metrics.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1]
    capsys.readouterr()
    again = H.run(work, quick=False, data_dir=str(tmp_path / "data"), model_dir=model,
                  overrides=TINY)
    err = capsys.readouterr().err
    for stage in ("corpus", "simulator", "cold_start", "rl", "rl_bm25", "eval"):
        assert f"{stage}: done in an earlier run" in err
    assert again["headline"] == summary["headline"]


def test_a_workdir_is_not_finished_with_other_options(tmp_path):
    from zsjax.cli import InputError
    work = str(tmp_path / "w")
    os.makedirs(work)
    H._claim(work, True, "data", None)
    H._claim(work, True, "data", None)  # the same options: the same run, continued
    with pytest.raises(InputError, match="holds a run of the recipe with quick True"):
        H._claim(work, False, "data", None)
    with pytest.raises(InputError, match="data '.*data'"):
        H._claim(work, True, "other", None)


def test_missing_data_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        H.main(["--workdir", str(tmp_path / "w"), "--data", str(tmp_path)])
    assert e.value.code == 2 and "train.jsonl not found" in capsys.readouterr().err


def test_quick_is_the_full_recipe_smaller():
    """--quick: the same stages and hyper-parameters, fewer steps and questions, no BM25-trained
    run and no other datasets; its RL preset is the full one with fewer steps."""
    from zsjax.cli import repo_config
    full, quick = H.settings_for(False), H.settings_for(True)
    assert quick["rl_bm25"] is False and quick["ood_rows"] == 0 and full["rl_bm25"] is True
    assert quick["test_rows"] < full["test_rows"] == 700
    assert quick["sim_steps"] < full["sim_steps"]
    same = {k for k in full if k not in ("sim_steps", "test_rows", "ood_rows",
                                         "quality_rows", "rl_bm25")}
    assert {k: quick[k] for k in same} == {k: full[k] for k in same}
    for backend in ("simulator", "bm25"):
        c_full = repo_config("hotpotqa", backend).to_dict()
        c_quick = repo_config("hotpotqa", backend + ",quick").to_dict()
        assert c_quick["train"].pop("steps") < c_full["train"].pop("steps")
        assert c_quick == c_full
    with pytest.raises(ValueError, match="unknown preset"):
        repo_config("hotpotqa", "simulator,fast")
