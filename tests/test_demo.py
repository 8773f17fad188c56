"""The demo end to end. `--preset tiny` on two world seeds, in the default suite: a 30-person
world, a 64-wide policy trained from scratch, then RL against the world's engine; held-out F1
must rise (about 3.5 minutes on 2 cores). `--quick` (a simulator fine-tuned from scratch, the
curriculum, 70 RL steps; 10 to 30 minutes on 2 cores) is marked slow: `bash tests/run.sh
--slow -k quick_demo`."""

import json
import os
import statistics

import pytest

from zsjax.demo import run as R
from zsjax.demo import world as W

# The module fixtures run inside the first test's timeout; the suite-wide 900 s is too short
# for the quick demo on a slow machine (measured: the fine-tunes alone took 16 minutes on one).
pytestmark = pytest.mark.timeout(3600)

TINY_SEEDS = (0, 1)


def _demo(request, workdir: str, args: list[str]) -> dict:
    # The demo's stage lines and progress go to the terminal as they come (pytest would hold
    # them until the test ends, leaving minutes without a line).
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[test_demo] python -m zsjax.demo --workdir {workdir} {' '.join(args)}",
              flush=True)
        assert R.main(["--workdir", workdir, *args]) == 0
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_runs(request, tmp_path_factory):
    """{seed: (workdir, summary)} of `--preset tiny` on world seeds 0 and 1, in one process (the
    second seed reuses the first's compiled programs)."""
    out = {}
    for seed in TINY_SEEDS:
        workdir = str(tmp_path_factory.mktemp(f"tiny{seed}"))
        out[seed] = workdir, _demo(request, workdir, ["--preset", "tiny", "--seed", str(seed)])
    return out


def test_tiny_demo_learns_on_two_seeds(tiny_runs):
    """On each seed the sampled training reward rises; held-out F1 with the engine rises by a
    clear margin on the two seeds' mean (15 test questions a seed: one is 0.067). Measured here
    on a 2-core AMD EPYC: test F1 0.133 -> 0.267 (seed 0) and 0.200 -> 0.778 (seed 1). With the
    CLI (one device, other float rounding) across world seeds 0-4 the reward rose on all five
    (+0.27 to +0.61) and test F1 by 0.20 to 0.69 (docs/DEMO.md), so a seed that misses the
    held-out bar after a change in float rounding is tolerated, a pipeline that does not learn
    is not."""
    gains = {}
    for seed, (_, s) in tiny_runs.items():
        before, after = s["before_rl"], s["after_rl"]
        assert "simulator" not in after  # tiny has none: RL and evaluation use the engine
        gains[seed] = after["search_engine"]["all"]["f1"] - before["search_engine"]["all"]["f1"]
        assert s["test_f1_after_rl"] == after["search_engine"]["all"]["f1"]
        # The warm start knows the format, not the facts: answering without searching fails.
        assert before["no_search"]["all"]["f1"] <= 0.2
        rows = [json.loads(x) for x in open(os.path.join(tiny_runs[seed][0], "rl",
                                                         "metrics.jsonl"))]
        reward = [r["reward_mean"] for r in rows]
        rise = statistics.fmean(reward[-5:]) - statistics.fmean(reward[:5])
        assert rise >= 0.05, (seed, reward)
        assert all(r["noise_prob"] == 0.0 for r in rows)  # the engine has no noisy documents
    assert statistics.fmean(gains.values()) >= 0.2, gains


def test_tiny_demo_writes_its_outputs(tiny_runs):
    workdir, s = tiny_runs[TINY_SEEDS[0]]
    for kind in ("one_hop", "two_hop", "all"):
        for when in ("before_rl", "after_rl"):
            for backend in ("search_engine", "no_search"):
                assert 0.0 <= s[when][backend][kind]["f1"] <= 1.0
    assert s["minutes"] > 0 and set(s["stage_seconds"]) == set(R.STAGES)
    assert s["preset"] == "tiny" and s["settings"]["sim_steps"] == 0
    assert not os.path.exists(os.path.join(workdir, "simulator_hf"))
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    rows = [json.loads(x) for x in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, s["settings"]["rl_steps"] + 1))
    assert os.path.isfile(os.path.join(workdir, "rl", "policy_hf", "config.json"))


def test_tiny_rerun_skips_finished_stages(tiny_runs):
    """Rerunning in the same workdir skips the finished fine-tunes, reads the tokenizer and the
    initial model it made, and resumes RL from its last checkpoint (here: nothing left to do),
    with the same result."""
    workdir, s = tiny_runs[TINY_SEEDS[0]]
    stamp = os.path.getmtime(os.path.join(workdir, "init", "policy", "model.safetensors"))
    again = R.run(workdir, preset="tiny", seed=TINY_SEEDS[0])
    assert again["stage_seconds"]["policy"] < s["stage_seconds"]["policy"] / 3
    assert again["test_f1_after_rl"] == pytest.approx(s["test_f1_after_rl"])
    assert os.path.getmtime(os.path.join(workdir, "init", "policy",
                                         "model.safetensors")) == stamp


def test_train_vs_test_diagnostic_scores_the_test_questions_as_the_demo_does(tiny_runs):
    """The memorisation diagnostic's test F1 (its own greedy rollouts with the engine) is the
    demo's own evaluation of the policy after RL (`zsjax.search.evaluation.evaluate`)."""
    from zsjax.experiments import train_vs_test
    workdir, s = tiny_runs[TINY_SEEDS[0]]
    train_vs_test.main(["--demo", workdir])
    with open(os.path.join(workdir, "train_vs_test.json")) as f:
        out = json.load(f)
    assert out["test"]["all"]["f1"] == pytest.approx(s["after_rl"]["search_engine"]["all"]["f1"],
                                                     abs=1e-3)
    assert out["test"]["all"]["n"] == s["after_rl"]["search_engine"]["all"]["n"]
    assert out["train"]["all"]["n"] > out["test"]["all"]["n"]
    for kind in ("all", "one_hop", "two_hop"):
        assert 0.0 <= out["test"][kind]["first_search_names_entity"] <= 1.0


@pytest.mark.parametrize("seed", TINY_SEEDS)
def test_the_copy_stage_copies_held_out_names(tiny_runs, seed):
    """The warm start's copy stage, half of whose rows are about made-up names, searches for
    the name a held-out test question gives (15 of 15 on both seeds, here and from the CLI);
    trained on the world's names alone it learned them as a lookup on some seeds (1 of 9
    one-hop test questions on world seed 4, docs/DEMO.md)."""
    from zsjax.experiments import train_vs_test
    workdir, _ = tiny_runs[seed]
    train_vs_test.main(["--demo", workdir, "--model", "copy"])
    with open(os.path.join(workdir, "train_vs_test_copy.json")) as f:
        out = json.load(f)
    assert out["test"]["all"]["first_search_names_entity"] >= 0.8, out["test"]
    assert out["test"]["all"]["f1"] <= 0.2  # it searches and stops: no answers yet


def test_answer_in_documents_counts_whole_words():
    from types import SimpleNamespace as T
    from zsjax.experiments.train_vs_test import answer_in_documents
    docs = ["Doc 1: Broth Bikus was born in Laistain.", "Doc 1: Laistain is a city in Bastax."]
    assert answer_in_documents(T(answer=" Laistain ", documents=docs))
    assert answer_in_documents(T(answer="broth bikus", documents=docs))
    assert answer_in_documents(T(answer="Bastax", documents=docs))  # the second search's
    assert not answer_in_documents(T(answer="Laist", documents=docs))
    assert not answer_in_documents(T(answer="Teatath", documents=docs))
    assert not answer_in_documents(T(answer=None, documents=docs))
    assert not answer_in_documents(T(answer="Laistain", documents=[]))


@pytest.mark.slow  # about 55 s on 2 cores: three sampled passes over the tiny world
def test_sampled_diagnostic_counts_answers_from_documents(tiny_runs):
    """`--sampled K`: K rollouts a question at temperature 1; the warm start answers, and
    some answers come from its documents, while the copy stage (search-only rows) never
    answers at all."""
    from zsjax.experiments import train_vs_test
    workdir, s = tiny_runs[TINY_SEEDS[0]]
    out = {}
    for model, k in (("warm", "2"), ("copy", "1")):
        train_vs_test.main(["--demo", workdir, "--model", model, "--sampled", k])
        with open(os.path.join(workdir, f"train_vs_test_{model}_sampled.json")) as f:
            out[model] = json.load(f)
    assert out["warm"]["test"]["all"]["n"] == 2 * s["after_rl"]["search_engine"]["all"]["n"]
    assert 0.0 < out["warm"]["train"]["all"]["answer_in_documents"] <= 1.0
    assert out["copy"]["test"]["all"]["n"] == s["after_rl"]["search_engine"]["all"]["n"]
    assert out["copy"]["train"]["all"]["answer_in_documents"] == 0.0
    with pytest.raises(SystemExit):
        train_vs_test.main(["--workdir", workdir, "--sampled", "2"])


def test_preset_and_quick_flags():
    with pytest.raises(SystemExit):
        R.main(["--workdir", "x", "--quick", "--preset", "tiny"])
    with pytest.raises(SystemExit):
        R.main(["--workdir", "x", "--preset", "huge"])


@pytest.mark.parametrize("seed", [0, 3])
def test_the_default_world_has_enough_disjoint_test_questions(seed):
    """The default and quick presets' world: at least 150 held-out questions (one is at most
    0.007 of F1), one- and two-hop balanced, about people and asked-about cities no training
    or validation question names."""
    s = R.settings_for()
    assert R.settings_for("quick")["world"] == s["world"]
    world = W.make_world(seed=seed, **s["world"])
    splits = world.splits(s["splits"])
    test = splits["test"]
    kinds = [q.kind for q in test]
    assert len(test) >= 150 and 1 / len(test) <= 0.007
    assert 0.4 <= kinds.count("two_hop") / len(test) <= 0.6
    held_out = {q.hops[0] for q in test}
    for name in ("train", "validation"):
        assert not held_out & {q.hops[0] for q in splits[name]}


@pytest.fixture(scope="module")
def quick_run(request, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    return workdir, _demo(request, workdir, ["--quick"])


@pytest.mark.slow
def test_quick_demo_rl_improves_held_out_f1(quick_run):
    _, s = quick_run
    before, after = s["before_rl"], s["after_rl"]
    # Held-out (test) questions, scored with the world's perfect search engine and with the
    # simulator: RL must lift both by a clear margin over the warm-started policy (one question
    # is 0.006). Measured with world seed 2 on a 2-core AMD EPYC: +0.60 (search engine) and
    # +0.66 (simulator), docs/DEMO.md; the default demo (120 steps) gained 0.43-0.67 on world
    # seeds 0-4. The gains move with float rounding in the fine-tunes (pytest runs JAX on 8 virtual
    # devices, the CLI on one), so the bar is on their mean, with a floor for each, both well
    # above a broken pipeline's zero.
    gains = {b: after[b]["all"]["f1"] - before[b]["all"]["f1"]
             for b in ("search_engine", "simulator")}
    assert sum(gains.values()) / 2 >= 0.1, gains
    assert min(gains.values()) >= 0.05, gains
    assert s["test_f1_before_rl"] == before["simulator"]["all"]["f1"]
    assert s["test_f1_after_rl"] == after["simulator"]["all"]["f1"]
    # The warm start knows the format, not the facts: answering without searching is hopeless.
    assert before["no_search"]["all"]["f1"] <= 0.2


@pytest.mark.slow
def test_quick_demo_writes_its_outputs(quick_run):
    workdir, s = quick_run
    for kind in ("one_hop", "two_hop", "all"):
        for when in ("before_rl", "after_rl"):
            for backend in ("simulator", "search_engine", "no_search"):
                assert 0.0 <= s[when][backend][kind]["f1"] <= 1.0
    assert s["minutes"] > 0 and set(s["stage_seconds"]) == set(R.STAGES)
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    rows = [json.loads(x) for x in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, s["settings"]["rl_steps"] + 1))
    assert rows[-1]["noise_prob"] > rows[0]["noise_prob"]  # the curriculum ran
    assert os.path.isfile(os.path.join(workdir, "rl", "policy_hf", "config.json"))


@pytest.mark.slow
def test_rerun_skips_finished_stages(quick_run):
    """Rerunning in the same workdir skips the finished fine-tunes and resumes RL from its last
    checkpoint (here: nothing left to do), with the same result."""
    workdir, s = quick_run
    again = R.run(workdir, preset="quick")
    assert again["stage_seconds"]["simulator"] < s["stage_seconds"]["simulator"] / 3
    assert again["stage_seconds"]["policy"] < s["stage_seconds"]["policy"] / 3
    assert again["test_f1_after_rl"] == pytest.approx(s["test_f1_after_rl"])


def test_a_workdir_is_prepared_for_one_seed(tmp_path):
    """The fine-tunes in a demo workdir belong to one world: a rerun with another --seed (or
    other stage settings) is refused; --quick, which changes only the RL steps, shares them."""
    from zsjax.cli import InputError
    from zsjax.demo import run as demo
    workdir = str(tmp_path)
    demo._claim_workdir(workdir, 0, demo.settings_for())
    demo._claim_workdir(workdir, 0, demo.settings_for("quick"))
    with pytest.raises(InputError, match="prepared with seed 0 .* this run's \\(seed 1\\)"):
        demo._claim_workdir(workdir, 1, demo.settings_for())
    other = dict(demo.settings_for(), sim_steps=10)
    with pytest.raises(InputError, match="other settings"):
        demo._claim_workdir(workdir, 0, other)


def test_every_algorithm_takes_the_kl_in_the_loss_and_reward_kl_keeps_its_own_coefficient():
    """The demo gives every algorithm GRPO's KL, 0.1 in the loss (PPO and REINFORCE++ through
    rl.kl_placement: with the KL in the reward they settled on one search on some world
    seeds). With the KL in the reward, summed over every later token of a return, they take
    ZeroSearch's 0.001 (at 0.1 there they did not learn)."""
    from zsjax.demo import run as demo
    from zsjax.rl import algorithms
    paths = {"policy": "p", "simulator": "s", "train": "t.jsonl"}
    names = ("grpo", "dr_grpo", "rloo", "ppo", "reinforce_pp")
    for placement, want in (("loss", [0.1] * 5), ("", [0.1, 0.1, 0.1, 0.001, 0.001])):
        s = dict(demo.settings_for(), kl_placement=placement)
        rl = {a: demo.rl_config(s, paths, a, 0).rl for a in names}
        assert [rl[a].kl_coef for a in names] == want
        where = [algorithms.resolve(a, rl[a].kl_placement).kl for a in names]
        assert where == ["loss"] * 5 if placement else ["loss"] * 3 + ["reward"] * 2
