"""The built-in demo: in a generated world no model could know, a small policy learns to search
a small LLM simulator, with the whole ZeroSearch loop, on a CPU in minutes.

    python -m zsjax.demo --workdir runs/demo [--quick] [--seed N]
                         [--algorithm grpo|dr_grpo|rloo|ppo|reinforce_pp]

1. world: fictional people, cities, countries and occupations; one- and two-hop questions,
   train / validation / test disjoint (zsjax/demo/world.py).
2. tokenizer: byte-level BPE trained on the world's text and the ZeroSearch prompts.
3. simulator: a small random model fine-tuned with `zsjax.sft` on (query, documents) pairs,
   useful and noisy, with the ZeroSearch simulator prompt: it comes to "know" the world.
4. policy: a small random model warm-started (`zsjax.sft`, trajectory rows) in two stages: it
   learns to repeat a name it is given (search-only rows), then the interaction format (it
   searches for the entity the question names, sometimes searches again for an arbitrary
   entity of the documents, and answers with an arbitrary entity of the documents).
5. RL (`zsjax.train`) against the simulator with the noise curriculum.
6. evaluation on the test questions before and after RL, with the simulator and with the
   world's perfect search engine, per question type, and without searching.

The workdir gets summary.json, curves.png, and each stage's folder (metrics, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import jax

from zsjax import sft, train
from zsjax.cli import repo_config
from zsjax.data.bpe import train_bpe
from zsjax.data.qa import QARow
from zsjax.demo import world as W
from zsjax.errors import InputError, Stopped
from zsjax.evaluate import load_policy
from zsjax.models import ModelConfig, init_params, save_hf
from zsjax.models.tokenizer import load_tokenizer
from zsjax.rl import algorithms
from zsjax.search import FunctionBackend, RolloutSettings, SearchRequest, factory
from zsjax.search import prompts as P
from zsjax.search.evaluation import answer_without_search, evaluate
from zsjax.search.simulator import InProcessSimulator, simulator_prompt

STAGES = ("world", "simulator", "policy", "eval_before", "rl", "eval_after")


PRESETS = ("default", "quick", "tiny")


def settings_for(preset: str = "default") -> dict:
    """Sizes and hyper-parameters of the demo's presets: `default`; `quick`, the same world,
    warm start and RL settings with fewer RL steps.

    RL keeps the warm start's token embeddings frozen (`rl_freeze`) and pays a KL penalty to
    it (`kl_coef`). Measured without them on a 60-person world (100 GRPO steps): Adam's
    updates to rows RL never uses eroded copying of held-out names (test query copy 100% ->
    19%), and the policy memorised the birth cities of its ~40 two-hop training people,
    searching the city at once (63% of two-hop rollouts by the end) instead of the person and
    then the city: test two-hop F1 0.25. With both: test two-hop F1 0.61, two searches on
    every two-hop question. An entropy bonus of 0.01 on top held the sampled reward at 0.44;
    0.001 reached 0.46-0.50 and test F1 0.77 (simulator) against 0.57.

    Every algorithm takes the KL to the warm start in the loss, `kl_coef` x a per-token mean
    (`kl_placement`: PPO and REINFORCE++ would put it in the reward). With it in the reward
    at ZeroSearch's 0.001 (`reward_kl_coef`, used with `kl_placement=""`), PPO and REINFORCE++
    settled on one search per question on world seeds 0 and 1 and answered almost no two-hop
    question (held-out engine F1 gains 25-79% of GRPO's); a per-question baseline, a lower lr
    or a larger entropy bonus did not change that, the KL in the loss did (docs/DEMO.md,
    #algorithms). In the reward the KL of every later token is summed into each token's
    return, so GRPO's 0.1 there outweighed the F1 reward once the policy moved.

    Half the policy's copy-stage rows are about made-up names (`copy_made_up`, `copy_rows`).
    With the world's names alone the copy stage can learn a lookup of those names instead of
    copying: in a 60-person world (seed 3) its first search named the entity of 14 of the 28
    test questions, and RL cannot read the answer of a question whose name it cannot search.
    DEMO.md has the default demo on world seeds 0-4 with and without them.

    The world has 150 people but only 16 cities (`splits` 0.4 / 0.1 / 0.5: 159 test questions,
    84 one-hop and 75 two-hop, so one question is 0.006 of F1). With 40 cities and 10
    countries the same pipeline did not learn in 120 steps (held-out F1 0.11 -> 0.22 with the
    simulator, world seed 0; with 16: 0.09 -> 0.88). We think fewer cities make the answer's
    type, one of few city names, easy to learn, so rollouts are right often enough for GRPO's
    groups of 8 to differ (DEMO.md). The simulator gets 1200 steps to memorise 150 people.
    The copy stage gets 2400 steps: its loss falls late and at a step that varies with the
    world seed and with float rounding (seed 1: loss 0.26 after 700 steps, 32% of test names
    copied, and RL then did not learn: F1 0.11 -> 0.19; loss 0.07 after 1200 steps; with the
    floats summed in another order, 0.12 after 1200 steps, 0.02 after 2400). The format
    stage gets 1600. What RL needs from it is a warm start that answers with an entity of its
    documents (any one: it does not know which fact answers the question), so that enough of a
    question's 8 rollouts are right for GRPO's group to differ. That skill forms slowly and at a
    step that moves with float rounding: on seed 1 the sampled one-hop answers (temperature 1,
    the world's engine) were an entity of the documents 35% / 57% / 69% / 81% of the time after
    400 / 800 / 1200 / 1600 steps, and RL from the 400-step warm start did not learn (held-out
    F1 0.21 after RL). Rows with made-up worlds, or asking about facts no test question asks
    with the answer read from the documents, did not speed it up (docs/DEMO.md)."""
    s = {
        "world": {"people": 150, "cities": 16, "countries": 8},
        "model": {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
                  "d_ff": 512},
        "vocab": 1536, "docs": 3,
        "sim_steps": 1200, "sim_batch": 32, "sim_lr": 3e-3, "sim_decay": "constant",
        "copy_steps": 2400, "copy_made_up": 0.5, "policy_steps": 1600, "policy_batch": 32,
        "policy_lr": 2e-3,
        "rl_steps": 120, "questions": 16, "rollouts": 8, "rl_lr": 5e-4, "entropy_coef": 0.001,
        "kl_coef": 0.1, "reward_kl_coef": 0.001, "kl_placement": "loss", "score_baseline": "none",
        "rl_freeze": "embed", "rl_length_multiple": 16,
        "splits": (0.4, 0.1, 0.5),
    }
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; expected one of {PRESETS}")
    if preset == "quick":
        s.update(rl_steps=70)
    if preset == "tiny":
        # The test suite's learning check: a smaller world and model, two documents a search,
        # no simulator (RL and evaluation against the world's engine), 40 RL steps. The MLP
        # is 128 wide (the MLP was most of a 256-wide one's compute): world seeds 0 and 1
        # learned as well (held-out F1 +0.53 / +0.69 after RL against +0.80 / +0.20) in 214
        # s against 257 s, from scratch in one process (docs/DEMO.md).
        s.update(world={"people": 30, "cities": 8, "countries": 4}, splits=(0.7, 0.1, 0.2),
                 model={"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                        "head_dim": 16, "d_ff": 128},
                 vocab=1024, docs=2, sim_steps=0, copy_steps=600, copy_lr=2e-3, policy_steps=150,
                 policy_batch=16, policy_lr=3e-3, rl_steps=40, questions=8, rl_lr=1e-3,
                 # Update batches padded to 128 tokens (256 or 384): this model's update takes
                 # 0.35 s, compiling one for a new width 4-5 s, and at 16 tokens a seed's 40
                 # steps met three or four widths.
                 rl_length_multiple=128)
    return s


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --- 2. tokenizer and models -------------------------------------------------------------

def make_tokenizer(world: W.World, questions: list[W.Question], path: str, vocab: int):
    texts = world.corpus() + [q.question for q in questions]
    texts += [P.POLICY_TEMPLATE, P.INVALID_ACTION, P.information_block("Doc 1: x")]
    texts += [simulator_prompt(SearchRequest("q", "Q", ("A",), noisy)) for noisy in (0, 1)]
    texts += [f"<search> {e} </search> <answer> {e} </answer>" for e in world.entities()]
    fast = train_bpe(texts * 3, vocab_size=vocab, specials=["<pad>", "<eos>"], eos="<eos>",
                     pad="<pad>")
    fast.save_pretrained(path)
    return fast


def make_model(path: str, tokenizer_dir: str, tokenizer, dims: dict, seed: int) -> str:
    vocab = -(-(len(tokenizer) + 1) // 64) * 64
    config = ModelConfig(vocab_size=vocab, family="qwen2", qkv_bias=True, tie_embeddings=True,
                         eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id, **dims)
    save_hf(config, init_params(config, jax.random.key(seed)), path, tokenizer_dir=tokenizer_dir)
    return path


# --- 3. simulator data -------------------------------------------------------------------

QUERY_FORMS = ["{e}", "{e}", "who is {e}", "where was {e} born", "{e} birthplace",
               "occupation of {e}", "{e} country", "which country is {e} in", "about {e}"]


def simulator_rows(world: W.World, questions: list[W.Question], docs: int, seed: int
                   ) -> list[dict]:
    """(query, question, answer, documents, label) pairs over every entity and varied query
    forms, useful and noisy in equal numbers."""
    rng = random.Random(seed)
    by_entity: dict[str, list[W.Question]] = {}
    for q in questions:
        for e in q.hops:
            by_entity.setdefault(e, []).append(q)
    rows = []
    for e in world.entities():
        for form in QUERY_FORMS:
            query = form.format(e=e)
            # Half the time the prompt's question is about something else: the documents must
            # follow the query, not the question.
            related = by_entity.get(e)
            q = rng.choice(related if related and rng.random() < 0.5 else questions)
            for label in ("useful", "noisy"):
                rows.append({"query": query, "question": q.question,
                             "golden_answers": [q.answer], "label": label,
                             "documents": world.documents(query, noisy=label == "noisy", k=docs)})
    return rows


# --- 4. policy warm-start data -----------------------------------------------------------

def _entities_in(world: W.World, text: str) -> list[str]:
    """Every possible answer (entity or occupation) mentioned in a text."""
    return [e for e in world.entities() + world.occupations if W.mentions(text, e)]


FORMAT_QUESTIONS = ["Who is {e}?", "Tell me about {e}.", "What is known about {e}?",
                    "Look up {e}."]


def _pick_question(rng: random.Random, world: W.World, questions: list[W.Question],
                   generic: float) -> tuple[str, str]:
    """(question, the entity it names): a generic question about any entity of the world with
    probability `generic`, else a training question."""
    if rng.random() < generic:
        entity = rng.choice(world.entities())
        return rng.choice(FORMAT_QUESTIONS).format(e=entity), entity
    q = rng.choice(questions)
    return q.question, q.hops[0]


def copy_rows(world: W.World, questions: list[W.Question], seed: int, n: int,
              generic: float = 0.5, made_up: float = 0.0) -> list[dict]:
    """Search-only rows (the turn ends after `<search> E </search>`) for generic questions
    about every entity and for training questions: they teach the small model what a
    pretrained LM can already do, repeat a name it has been given. Learning this has a sharp
    phase change (loss flat at ~0.5, then ~0 within 50-100 steps); mixed with the noisy
    format rows it does not happen within the demo's budget.

    With probability `made_up` a row asks, in any question form (the world's own included),
    about a made-up name (`World.made_up_name`) instead. The world's own rows are few (about
    215 distinct ones in a 30-person world) and can be learned as a lookup instead of copying:
    the lookup fails on held-out questions (docs/DEMO.md, the tiny preset). Made-up names
    cannot be looked up."""
    rng = random.Random(seed)
    forms = FORMAT_QUESTIONS + list(W.QUESTION_FORMS)
    rows = []
    for _ in range(n):
        question, entity = _pick_question(rng, world, questions, generic)
        if made_up and rng.random() < made_up:
            entity = world.made_up_name(rng)
            question = rng.choice(forms).format(e=entity)
        rows.append({"question": question,
                     "segments": [{"text": f"<search> {entity} </search>", "loss": 1}]})
    return rows


def policy_rows(world: W.World, questions: list[W.Question], docs: int, seed: int,
                n: int, copy_query: float = 0.9, generic: float = 0.5,
                second_search: float = 0.5, direct: float = 0.1) -> list[dict]:
    """Format-only trajectories. The question is a training question, or (with probability
    `generic`) a generic one ("Who is E?") about any entity of the world, so that, like a
    pretrained LM, the policy can write every name (but knows no fact). With probability
    `direct` answer at once with an arbitrary entity; otherwise search (for the entity the
    question names with probability `copy_query`, an arbitrary entity otherwise), with
    probability `second_search` search again for another arbitrary entity from the documents,
    then answer with an arbitrary entity from the documents. The documents are the world's own
    (useful) ones. What the policy does not learn here: which fact in the documents answers the
    question, and that a two-hop question needs a second search for the city it found."""
    rng = random.Random(seed)
    everything = world.entities() + world.occupations
    rows = []
    for _ in range(n):
        question, entity = _pick_question(rng, world, questions, generic)
        segs = []
        if rng.random() < direct:
            segs.append({"text": f"<answer> {rng.choice(everything)} </answer>", "loss": 1})
        else:
            query = entity if rng.random() < copy_query else rng.choice(everything)
            for _ in range(2 if rng.random() < second_search else 1):
                text = world.documents(query, k=docs)
                segs.append({"text": f"<search> {query} </search>", "loss": 1})
                segs.append({"text": P.information_block(text), "loss": 0})
                found = _entities_in(world, text) or everything
                query = rng.choice([e for e in found if e != query] or found)
            segs.append({"text": f"<answer> {rng.choice(found)} </answer>", "loss": 1})
        rows.append({"question": question, "segments": segs})
    return rows


# --- 5-6. RL and evaluation ------------------------------------------------------------------

def _config(name: str, arg: str = ""):
    return repo_config(name, arg)


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _sft(model_dir: str, rows_path: str, workdir: str, export: str, *, steps: int, batch: int,
         lr: float, decay: str = "constant") -> None:
    """Fine-tunes model_dir on rows_path and exports to `export` (skipped when a previous run
    of the demo already exported it; an interrupted fine-tune resumes from its checkpoint)."""
    done = os.path.join(export, ".demo_stage_done")
    if os.path.exists(done):
        _log(f"{export} exists: skipping")
        return
    c = _config("sft_simulator", model_dir)
    c.unlock()
    c.data.path, c.data.max_length, c.data.use_chat_template = rows_path, 512, "no"
    c.data.length_multiple = 16
    c.train.update(steps=steps, batch_size=batch, lr=lr, warmup_steps=20, weight_decay=0.0,
                   log_every=100, checkpoint_every=steps, lr_decay=decay)
    c.mesh.update(data=1)
    c.export_dir = export
    sft.run(c, workdir)
    open(done, "w").close()


def _rollout(docs: int) -> dict:
    """The rollout limits shared by RL and evaluation (short turns, two searches at most)."""
    return {"max_turns": 2, "max_response_tokens": 24, "max_prompt_tokens": 512,
            "max_obs_tokens": 24 * docs}


def engine_backend(world: W.World, docs: int):
    """The world's perfect search engine: the true documents for each query."""
    return FunctionBackend(lambda r: world.documents(r.query, k=docs))


ENGINE_KIND = "demo_world"


def register_engine(world: W.World, docs: int) -> None:
    """The world's engine as the search backend kind "demo_world" (`zsjax.search.factory`), so
    a training config can choose it by name."""
    factory.register_backend(ENGINE_KIND, lambda settings: engine_backend(world, docs))


def evaluate_policy(model_dir: str, sim_dir: str, world: W.World, test: list[W.Question],
                    docs: int) -> dict:
    """Test F1/EM per backend (simulator, perfect search engine) and question type, plus the
    score of answering without searching."""
    config, params, tok = load_policy(model_dir)
    backends = {"search_engine": engine_backend(world, docs)}
    if sim_dir is not None:  # None: a demo without a simulator (the `tiny` preset)
        sim_config, sim_params, sim_tok = load_policy(sim_dir)
        backends = {"simulator": InProcessSimulator(sim_config, sim_params, sim_tok,
                                                    temperature=0.0, max_new_tokens=16 * docs,
                                                    top_k_docs=docs), **backends}
    sets = {kind: [QARow(q.question, (q.answer,)) for q in test if q.kind == kind]
            for kind in ("one_hop", "two_hop")}
    settings = RolloutSettings(**_rollout(docs))
    out = {}
    for name, backend in backends.items():
        out[name] = evaluate(config, params, tok, sets, backend, settings=settings,
                             batch_size=128)
    out["no_search"] = {k: answer_without_search(config, params, tok, rows)
                        for k, rows in sets.items()}
    for res in out.values():
        n = sum(r["n"] for r in res.values())
        res["all"] = {k: sum(r[k] * r["n"] for r in res.values()) / n
                      for k in ("f1", "exact_match", "substring_match", "searches_mean")}
        res["all"]["n"] = n
    return out


def fact_rates(search, world: W.World, questions: list[W.Question], n: int = 64,
               seed: int = 0) -> dict:
    """How often a search backend's useful documents state the fact a question asks about an
    entity (`World.answer_fact`: a person's birth city, a city's country) as one of their
    documents, two ways:
    - `alone`: `n` requests of an entity's name with no question and no answer (what the
      backend knows of the world by itself);
    - `in_rollouts`: every hop of `questions` with its question and golden answer, as RL's and
      evaluation's requests carry them (the reference's simulator prompt states both).
    `search` maps a list of `SearchRequest` to document texts. Occupations, never asked
    about, and the documents' numbering are not scored.

    The two can differ widely: a simulator that has not memorised the world can still write
    the fact a question asks for from the answer in its prompt (world seed 1: 9% alone, 97%
    in rollouts, docs/DEMO.md)."""
    rng = random.Random(seed)
    asked = list(world.people) + list(world.cities)
    alone = rng.sample(asked, min(n, len(asked)))
    hops = [(e, q) for q in questions for e in q.hops]
    requests = ([SearchRequest(e, "", ("",)) for e in alone]
                + [SearchRequest(e, q.question, (q.answer,)) for e, q in hops])
    out = search(requests)
    good = [f": {world.answer_fact(r.query)}" in text for r, text in zip(requests, out)]
    return {"alone": sum(good[:len(alone)]) / max(1, len(alone)),
            "in_rollouts": sum(good[len(alone):]) / max(1, len(hops))}


def simulator_accuracy(sim_dir: str, world: W.World, docs: int, questions: list[W.Question],
                       n: int = 64, seed: int = 0) -> dict:
    """`fact_rates` of the fine-tuned simulator at temperature 0 on `questions`."""
    config, params, tok = load_policy(sim_dir)
    sim = InProcessSimulator(config, params, tok, temperature=0.0, max_new_tokens=16 * docs,
                             top_k_docs=docs)
    return fact_rates(sim.search, world, questions, n, seed)


def rl_config(s: dict, paths: dict, algorithm: str, seed: int):
    c = _config("tiny")
    c.unlock()
    c.fixture = False
    c.seed = seed
    c.policy.path, c.simulator.path = paths["policy"], paths["simulator"] or ""
    if paths["simulator"] is None:  # no simulator (`tiny`): the world's engine, registered
        c.backend.kind = ENGINE_KIND  # by `register_engine`
    c.data.train_path = paths["train"]
    c.data.length_multiple = s["rl_length_multiple"]
    # share_documents: as the demo was measured (identical searches of a step, such as a
    # question's rollouts searching its entity, get the same documents)
    c.simulator.update(temperature=0.5, max_new_tokens=16 * s["docs"], top_k_docs=s["docs"],
                       share_documents=True)
    c.rollout.update(temperature=1.0, top_p=1.0, **_rollout(s["docs"]))
    # Decode batches that never shrink: for this 2-layer model, moving the running rows into
    # smaller batches cost more (row copies, a compiled program per batch size) than the
    # finished rows' compute it saved. 25 RL steps: rollouts 25.8 s against 46.0 s.
    c.rollout.shrink_above = 0
    c.simulator.shrink_above = 0
    c.curriculum.update(start=0.0, end=0.3, base=4.0)
    if paths["simulator"] is None:  # the world's engine has no noisy documents to give
        c.curriculum.update(end=0.0)
    # warmup_steps counts training steps (2 mini-batch updates each): 2 steps give the same
    # total rate over the warm-up as the 5 updates the demo was tuned with. 5 steps left the
    # quick demo's seed-0 gains at +0.07 / +0.07 (simulator / search engine), against
    # +0.25 / +0.18 with 2.
    # the KL in the loss (kl_coef), or in the reward (reward_kl_coef): settings_for
    in_loss = algorithms.resolve(algorithm, s["kl_placement"]).kl == "loss"
    kl_coef = s["kl_coef"] if in_loss else s["reward_kl_coef"]
    c.rl.update(algorithm=algorithm, questions_per_step=s["questions"],
                rollouts_per_question=s["rollouts"], mini_batches=2, lr=s["rl_lr"],
                kl_coef=kl_coef, entropy_coef=s["entropy_coef"], freeze=s["rl_freeze"],
                critic_lr=s["rl_lr"], warmup_steps=2, old_logprobs="sampler",
                score_baseline=s["score_baseline"], kl_placement=s["kl_placement"])
    c.train.update(steps=s["rl_steps"], log_every=10, checkpoint_every=25, progress=True,
                   eval_every=0)
    c.lock()
    return c


def _smooth(xs, k: int = 5):
    """Trailing mean over k steps (fewer at the start)."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1])
            for i in range(len(xs))]


def plot(metrics_path: str, out: str, before: dict | None = None,
         after: dict | None = None) -> None:
    """The RL run's curves: sampled reward, the curriculum, searches per question, and,
    given the evaluations before and after RL, held-out test F1 per backend and question type;
    below them the signs of collapse (answer rates, response length, entropy, KL)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(x) for x in open(metrics_path)]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(17.6, 7.2))
    ax = axes.ravel()

    def curve(a, key, title, ylabel, label="per step"):
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            a.set(title=f"{title} (not logged)")
            return
        values = [float("nan") if v is None else v for v in values]
        a.plot(steps, values, alpha=0.3, label=label)
        a.plot(steps, _smooth(values), label="mean of 5 steps")
        a.set(title=title, ylabel=ylabel)
        a.legend(fontsize=8)

    curve(ax[0], "reward_mean", "sampled training reward", "F1 (temperature 1)")
    ax[1].plot(steps, [r["noise_prob"] for r in rows], label="noise probability")
    ax[1].plot(steps, [r["noisy_fraction"] or 0 for r in rows], ".", alpha=0.5,
               label="noisy fraction (realised)")
    ax[1].set(title="curriculum", ylabel="fraction of searches")
    ax[1].legend(fontsize=8)
    curve(ax[2], "searches_mean", "searches per question (training)", "searches")
    for key, label in (("valid_answer_rate", "answered"),
                       ("format_valid_rate", "answered, every turn well-formed")):
        ax[4].plot(steps, [r.get(key) if r.get(key) is not None else float("nan")
                           for r in rows], label=label)
    ax[4].set(title="answer rates (training)", ylabel="fraction of rollouts", ylim=(0, 1.05))
    ax[4].legend(fontsize=8)
    curve(ax[5], "response_tokens_mean", "response length", "tokens per rollout")
    curve(ax[6], "entropy", "policy entropy", "nats per policy token")
    curve(ax[7], "kl", "KL to the warm start", "per policy token")
    for a in (*ax[:3], *ax[4:]):
        a.set_xlabel("RL step")
        a.grid(alpha=0.3)
    if before and after:
        groups = [(b, t) for b in ("simulator", "search_engine") if b in after
                  for t in ("one_hop", "two_hop")]
        x = range(len(groups))
        width = 0.38
        for shift, (label, ev) in zip((-width / 2, width / 2), (("before RL", before),
                                                                 ("after RL", after))):
            ax[3].bar([i + shift for i in x], [ev[b][t]["f1"] for b, t in groups], width,
                      label=label)
        ax[3].set_xticks(list(x), [f"{b.replace('_', ' ')}\n{t.replace('_', '-')}"
                                   for b, t in groups], fontsize=8)
        ax[3].set(title="held-out test F1 (greedy)", ylabel="F1", ylim=(0, 1))
        ax[3].legend(fontsize=8)
        ax[3].grid(alpha=0.3, axis="y")
    else:
        ax[3].set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


PREPARED = "prepared.json"  # the seed and stage settings a workdir's fine-tunes are for


def _claim_workdir(workdir: str, seed: int, s: dict) -> None:
    mine = {"seed": seed, "settings": {k: v for k, v in s.items() if not k.startswith("rl_")
                                       and k not in ("questions", "rollouts", "entropy_coef",
                                                     "kl_coef", "reward_kl_coef",
                                                     "score_baseline", "kl_placement")}}
    path = os.path.join(workdir, PREPARED)
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != json.loads(json.dumps(mine)):
            raise InputError(f"{workdir} holds a demo prepared with seed {theirs.get('seed')} "
                             f"and other settings than this run's (seed {seed}): pick another "
                             "workdir, or rerun with the same --seed")
        return
    with open(path, "w") as f:
        json.dump(mine, f, indent=1)


def prepare(workdir: str, s: dict, seed: int = 0) -> dict:
    """Stages 1-4, shared by the demo and `zsjax.experiments.claims`: the world and its data
    files, the tokenizer, the fine-tuned simulator and the warm-started policy. A fine-tuning
    stage already exported by an earlier run in `workdir` is skipped (the rest is quick and is
    redone). Returns the world, its splits, the paths
    and the seconds each stage took. A workdir prepared for another seed or other stage
    settings is refused (its fine-tunes belong to another world)."""
    os.makedirs(workdir, exist_ok=True)
    _claim_workdir(workdir, seed, s)
    times = {}

    t = time.time()
    world = W.make_world(seed=seed, **s["world"])
    splits = world.splits(s["splits"])
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    paths = {name: _write_jsonl(os.path.join(data, f"{name}.jsonl"), [q.row() for q in qs])
             for name, qs in splits.items()}
    all_q = [q for qs in splits.values() for q in qs]
    tok_dir = os.path.join(workdir, "tokenizer")
    # The tokenizer and the initial models are made once: a rerun (or a run beside another on
    # a prepared workdir, as `zsjax.experiments.claims` does) reads them, never rewrites them.
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tok = load_tokenizer(tok_dir)
    else:
        tok = make_tokenizer(world, all_q, tok_dir, s["vocab"])
    sim_init = os.path.join(workdir, "init", "simulator")
    pol_init = os.path.join(workdir, "init", "policy")
    for path, model_seed, wanted in ((sim_init, seed, s["sim_steps"] > 0),
                                     (pol_init, seed + 1, True)):
        if wanted and not os.path.exists(os.path.join(path, "config.json")):
            make_model(path, tok_dir, tok, s["model"], model_seed)
    _log(f"world: {len(world.people)} people, {len(world.cities)} cities, "
         f"{len(world.countries)} countries; questions "
         + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; vocab {len(tok)}")
    times["world"] = time.time() - t

    t = time.time()
    sim_dir, sim_acc = None, None
    if s["sim_steps"]:
        sim_rows = simulator_rows(world, all_q, s["docs"], seed)
        sim_dir = os.path.join(workdir, "simulator_hf")
        _log(f"simulator: fine-tuning on {len(sim_rows)} (query, documents) pairs")
        _sft(sim_init, _write_jsonl(os.path.join(data, "simulator_pairs.jsonl"), sim_rows),
             os.path.join(workdir, "simulator_sft"), sim_dir, steps=s["sim_steps"],
             batch=s["sim_batch"], lr=s["sim_lr"], decay=s["sim_decay"])
        sim_acc = simulator_accuracy(sim_dir, world, s["docs"], splits["test"])
        _log(f"simulator: its greedy useful documents state the asked-for fact for "
             f"{sim_acc['in_rollouts']:.0%} of the test questions' searches (the question "
             f"and answer in its prompt), {sim_acc['alone']:.0%} of entities' names alone")
    times["simulator"] = time.time() - t

    t = time.time()
    rows = copy_rows(world, splits["train"], seed, n=4000, made_up=s["copy_made_up"])
    copy_dir = os.path.join(workdir, "policy_copy_hf")
    _log(f"policy: learning to repeat names ({len(rows)} search-only rows)")
    _sft(pol_init, _write_jsonl(os.path.join(data, "policy_copy.jsonl"), rows),
         os.path.join(workdir, "policy_copy_sft"), copy_dir, steps=s["copy_steps"],
         batch=s["policy_batch"], lr=s.get("copy_lr", s["policy_lr"]))
    rows = policy_rows(world, splits["train"], s["docs"], seed, n=4000)
    warm_dir = os.path.join(workdir, "policy_warm_hf")
    _log(f"policy: warm start on {len(rows)} format-only trajectories")
    _sft(copy_dir, _write_jsonl(os.path.join(data, "policy_format.jsonl"), rows),
         os.path.join(workdir, "policy_sft"), warm_dir, steps=s["policy_steps"],
         batch=s["policy_batch"], lr=s["policy_lr"])
    times["policy"] = time.time() - t
    return {"world": world, "splits": splits, "paths": paths, "sim_dir": sim_dir,
            "warm_dir": warm_dir, "sim_acc": sim_acc, "times": times}


def _scores(ev: dict) -> str:
    return ", ".join(f"{ev[b]['all']['f1']:.3f} ({b.replace('_', ' ')})"
                     for b in ("simulator", "search_engine", "no_search") if b in ev)


def run(workdir: str, *, preset: str = "default", algorithm: str = "grpo", seed: int = 0
        ) -> dict:
    t_start = time.time()
    s = settings_for(preset)
    prep = prepare(workdir, s, seed)
    world, splits, paths = prep["world"], prep["splits"], prep["paths"]
    sim_dir, warm_dir, sim_acc, times = (prep["sim_dir"], prep["warm_dir"], prep["sim_acc"],
                                         prep["times"])

    t = time.time()
    test = splits["test"]
    before = evaluate_policy(warm_dir, sim_dir, world, test, s["docs"])
    _log(f"before RL: test F1 {_scores(before)}")
    times["eval_before"] = time.time() - t

    t = time.time()
    rl_dir = os.path.join(workdir, "rl")
    rl_paths = {"policy": warm_dir, "simulator": sim_dir, "train": paths["train"]}
    if sim_dir is None:
        register_engine(world, s["docs"])
    train.run(rl_config(s, rl_paths, algorithm, seed), rl_dir)
    times["rl"] = time.time() - t

    t = time.time()
    after = evaluate_policy(os.path.join(rl_dir, "policy_hf"), sim_dir, world, test, s["docs"])
    _log(f"after RL: test F1 {_scores(after)}")
    times["eval_after"] = time.time() - t
    plot(os.path.join(rl_dir, "metrics.jsonl"), os.path.join(workdir, "curves.png"), before,
         after)

    main_backend = "simulator" if "simulator" in after else "search_engine"
    summary = {
        # with the simulator; with the engine when the preset has no simulator
        "test_f1_before_rl": before[main_backend]["all"]["f1"],
        "test_f1_after_rl": after[main_backend]["all"]["f1"],
        "simulator_fact_accuracy": sim_acc,
        "before_rl": before, "after_rl": after,
        "algorithm": algorithm, "preset": preset, "seed": seed, "settings": s,
        "stage_seconds": times, "minutes": (time.time() - t_start) / 60}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _log(f"done in {summary['minutes']:.1f} min: test F1 {summary['test_f1_before_rl']:.3f} -> "
         f"{summary['test_f1_after_rl']:.3f}; summary.json and curves.png in {workdir}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zsjax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true",
                   help="the same stages with fewer RL steps (70 instead of 120); the same as "
                        "--preset quick")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="default; quick (70 RL steps); tiny (the test suite's learning check: "
                        "a 30-person world, a 64-wide model, no simulator, 40 RL steps against "
                        "the world's engine, about 2.5 minutes)")
    p.add_argument("--algorithm", default="grpo", choices=algorithms.names())
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed must be >= 0; got {args.seed}")
    if args.quick and args.preset not in (None, "quick"):
        p.error(f"--quick and --preset {args.preset} disagree; give one")
    preset = args.preset or ("quick" if args.quick else "default")
    try:
        run(args.workdir, preset=preset, algorithm=args.algorithm, seed=args.seed)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGTERM or Ctrl-C in a fine-tune or RL: the same command continues
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    return 0
