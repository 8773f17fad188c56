"""`zsjax.experiments.claims`: aggregation over seeds and the claims' verdicts (the runs
themselves are the demo's, tested in test_demo.py)."""

import json
import os

import numpy as np
import pytest

from zsjax.experiments import claims


def _eval(f1_sim, f1_engine, f1_none=0.0):
    part = lambda f1: {"f1": f1, "n": 10, "searches_mean": 1.5}  # noqa: E731
    return {"simulator": {"all": part(f1_sim), "two_hop": part(f1_sim)},
            "search_engine": {"all": part(f1_engine), "two_hop": part(f1_engine / 2)},
            "no_search": {"all": part(f1_none)}}


def _results(table):
    out = []
    for name, seeds in table.items():
        for seed, (sim, eng, rewards) in enumerate(seeds):
            out.append({"variant": name, "seed": seed, "rewards": rewards,
                        "rl_seconds": 60.0, "eval": _eval(sim, eng)})
    return out


BEFORE = _eval(0.07, 0.14)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_mean_spread_and_final_reward_against_numpy():
    rewards = [list(np.linspace(0, 1, 20)), list(np.linspace(0, 0.5, 20)),
               [0.2] * 20]
    res = _results({"grpo_sim_curriculum": [(0.6, 0.7, rewards[0]), (0.5, 0.8, rewards[1]),
                                            (0.4, 0.6, rewards[2])]})
    st = claims.summarize(res, BEFORE)["variants"]["grpo_sim_curriculum"]
    assert st["f1_simulator"]["mean"] == pytest.approx(np.mean([0.6, 0.5, 0.4]))
    assert st["f1_simulator"]["sd"] == pytest.approx(np.std([0.6, 0.5, 0.4], ddof=1))
    assert st["f1_engine"]["min"] == 0.6 and st["f1_engine"]["max"] == 0.8
    # the reward of the last tenth of the steps (2 of 20), averaged over seeds
    tails = [np.mean(r[-2:]) for r in rewards]
    assert st["final_reward"]["mean"] == pytest.approx(np.mean(tails))


def test_verdicts_hold_and_fail_as_the_numbers_say():
    r = [0.1] * 10
    holds = claims.summarize(_results({
        "grpo_sim_curriculum": [(0.6, 0.7, r)] * 3, "grpo_engine": [(0.6, 0.65, r)] * 3,
        "grpo_sim_constant": [(0.5, 0.6, r)] * 3, "grpo_sim_no_noise": [(0.6, 0.6, r)] * 3,
        "ppo_sim_curriculum": [(0.3, 0.3, r)] * 3,
        "reinforce_pp_sim_curriculum": [(0.2, 0.2, r)] * 3}), BEFORE)
    assert [(c, h) for c, _, h in claims.verdicts(holds)] == [
        ("1. search pays", "yes"), ("2. a simulator is as good as real search", "yes"),
        ("3. the curriculum helps (vs constant p = 0.25)", "yes"),
        ("3. the curriculum helps (vs no noise)", "yes"), ("4. the algorithms compare", "reported")]
    fails = claims.summarize(_results({
        "grpo_sim_curriculum": [(0.15, 0.5, r)] * 3, "grpo_engine": [(0.6, 0.65, r)] * 3,
        "grpo_sim_no_noise": [(0.2, 0.6, r)] * 3}), BEFORE)
    got = [(c, h) for c, _, h in claims.verdicts(fails)]
    assert got == [("1. search pays", "no"), ("2. a simulator is as good as real search", "no"),
                   ("3. the curriculum helps (vs no noise)", "no")]


def test_at_least_as_well_within_noise_by_the_standard_error_of_the_difference():
    r = [0.1] * 10
    summary = claims.summarize(_results({
        "grpo_sim_curriculum": [(0.50, 0.6, r), (0.60, 0.6, r), (0.55, 0.6, r)],
        "grpo_sim_constant": [(0.55, 0.6, r), (0.65, 0.6, r), (0.60, 0.6, r)],
        "grpo_sim_no_noise": [(0.70, 0.6, r), (0.71, 0.6, r), (0.72, 0.6, r)]}), BEFORE)
    t = summary["variants"]
    # curriculum 0.55 vs constant 0.60: sd 0.05 on both sides, n = 3
    se = np.sqrt(2 * np.std([0.5, 0.6, 0.55], ddof=1) ** 2 / 3)
    assert 0.05 < 2 * se  # a shortfall of 0.05 is inside twice the standard error
    verdict, text = claims.at_least(t["grpo_sim_curriculum"]["f1_simulator"],
                                    t["grpo_sim_constant"]["f1_simulator"])
    assert verdict == "within noise" and f"{se:.3f}" in text and "-0.050" in text
    # 0.55 vs 0.71 (sd 0.01): 0.16 short, far outside
    assert claims.at_least(t["grpo_sim_curriculum"]["f1_simulator"],
                           t["grpo_sim_no_noise"]["f1_simulator"])[0] == "no"
    assert claims.at_least(t["grpo_sim_no_noise"]["f1_simulator"],
                           t["grpo_sim_curriculum"]["f1_simulator"])[0] == "yes"
    one_seed = claims.summarize(_results({"grpo_sim_curriculum": [(0.5, 0.6, r)],
                                          "grpo_sim_constant": [(0.51, 0.6, r)]}), BEFORE)
    t1 = one_seed["variants"]
    assert claims.at_least(t1["grpo_sim_curriculum"]["f1_simulator"],
                           t1["grpo_sim_constant"]["f1_simulator"])[0] == "no"
    assert claims.at_least(t1["grpo_sim_constant"]["f1_simulator"],
                           t1["grpo_sim_curriculum"]["f1_simulator"])[0] == "yes"
    # the report and the verdicts carry "within noise" through
    rows = {c: v for c, _, v in claims.verdicts(summary)}
    assert rows["3. the curriculum helps (vs constant p = 0.25)"] == "within noise"
    assert rows["3. the curriculum helps (vs no noise)"] == "no"


def test_report_only_summarises_the_finished_runs_and_names_the_missing(tmp_path, capsys):
    steps = claims.demo.settings_for()["rl_steps"]
    r = [0.1] * 10
    res = _results({"grpo_sim_curriculum": [(0.6, 0.7, r), (0.4, 0.5, r)],
                    "grpo_engine": [(0.5, 0.9, r)]})
    for rec in res:
        d = claims.run_dir(str(tmp_path), rec["variant"], rec["seed"], steps)
        os.makedirs(d)
        _write_json(os.path.join(d, "result.json"), rec)
    # a run of another budget is not mixed in
    other = claims.run_dir(str(tmp_path), "grpo_sim_constant", 0, steps + 1)
    os.makedirs(other)
    _write_json(os.path.join(other, "result.json"),
                _results({"grpo_sim_constant": [(0.9, 0.9, r)]})[0])
    with pytest.raises(SystemExit):  # the runs are there, the warm start's evaluation is not
        claims.main(["--workdir", str(tmp_path), "--report-only", "--seeds", "2"])
    assert "eval_before.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no run of this budget
        claims.main(["--workdir", str(tmp_path), "--report-only", "--rl-steps", "7"])
    assert "no finished runs of 7 steps" in capsys.readouterr().err
    os.makedirs(tmp_path / "shared")
    _write_json(tmp_path / "shared" / "eval_before.json", BEFORE)
    assert claims.main(["--workdir", str(tmp_path), "--report-only", "--seeds", "2"]) == 0
    report = (tmp_path / "claims.md").read_text()
    assert "**Partial report:** 3 of 12 runs have finished" in report
    assert "--report-only" not in report  # it names the command that made the runs
    assert "grpo_engine seed 1" in report and "grpo_sim_constant seed 0" in report
    assert "| grpo_sim_curriculum | 0.500 ± 0.141 |" in report
    assert "| grpo_engine | 0.500 (one seed) |" in report and "| grpo_sim_constant |" not in report
    with open(tmp_path / "claims.json") as f:
        saved = json.load(f)
    assert len(saved["missing"]) == 9
    assert saved["summary"]["variants"]["grpo_sim_curriculum"]["f1_engine"]["mean"] == \
        pytest.approx(0.6)
    assert (tmp_path / "final_f1.png").exists() and (tmp_path / "reward_curves.png").exists()
