"""The multi-turn rollout, with a scripted policy and a scripted search backend."""

import chat_tokenizer
import numpy as np
import pytest

from zsjax.sampling import GenerateResult
from zsjax.search import (FunctionBackend, ModelTurnGenerator, RolloutSettings, prompt_ids,
                          rollout)
from zsjax.search import prompts as P


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE chat tokenizer built offline (tests/chat_tokenizer.py)."""
    return chat_tokenizer.build()


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    """SmolLM2's own tokenizer, for the tests that run its real weights."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


class ScriptedPolicy:
    """Plays a fixed text per (question, turn). Fake logprobs are distinct per token."""

    def __init__(self, tokenizer, scripts):
        self.tok, self.scripts = tokenizer, scripts
        self.turn = {q: 0 for q in scripts}
        self.inputs = []

    def __call__(self, inputs):
        out = GenerateResult([], [], [], [])
        max_new_tokens = inputs.max_new_tokens
        for p in inputs.contexts:
            self.inputs.append(list(p))
            context = self.tok.decode(p)
            q = next(q for q in self.scripts if q in context)
            text, reason = self.scripts[q][self.turn[q]]
            self.turn[q] += 1
            ids = self.tok.encode(text, add_special_tokens=False)
            if reason == "eos":
                ids.append(self.tok.eos_token_id)
            if len(ids) > max_new_tokens:
                ids, reason = ids[:max_new_tokens], "length"
            lps = -0.01 * (1 + np.arange(len(ids)))
            out.tokens.append(ids)
            out.logprobs.append(lps)
            out.model_logprobs.append(lps)
            out.finish_reasons.append(reason)
        return out


def _docs(request):
    return f" Doc 1: {request.query} is {'wrong' if request.noisy else 'Bar'}. "


def _runs(mask):
    """Maximal runs of equal mask values: [(value, start, end)]."""
    runs, start = [], 0
    for k in range(1, len(mask) + 1):
        if k == len(mask) or mask[k] != mask[start]:
            runs.append((mask[start], start, k))
            start = k
    return runs


def test_masks_line_up_with_information_blocks(tokenizer):
    scripts = {
        "capital of Foo": [("<think>I need facts.</think>\n<search> capital of Foo </search>",
                            "stop"), ("<answer> Bar </answer>", "stop")],
        "river of Baz": [("<search> river Baz </search>", "stop"),
                         ("<search>source of the river Baz</search>", "stop"),
                         ("<answer> the Qux </answer>", "stop")],
    }
    policy = ScriptedPolicy(tokenizer, scripts)
    backend = FunctionBackend(_docs)
    trajs = rollout(["What is the capital of Foo", "Which is the river of Baz?"],
                    [["Bar"], ["Qux", "the Qux river"]], tokenizer=tokenizer,
                    generate_fn=policy, backend=backend, settings=RolloutSettings(max_turns=2))
    t0, t1 = trajs
    assert (t0.num_searches, t1.num_searches) == (1, 2)
    assert (t0.answer, t1.answer) == ("Bar", "the Qux")
    assert t0.answered and t1.answered and (t0.turns, t1.turns) == (2, 3)
    # every request carries its own trajectory's question and golden answers
    for batch in backend.calls:
        for r in batch:
            owner = t0 if r.query in t0.queries else t1
            assert (r.question, r.golden_answers) == (owner.question, owner.golden_answers)
    # and its own sample number (trajectory, turn): identical queries sample apart
    samples = [r.sample for batch in backend.calls for r in batch]
    assert len(set(samples)) == len(samples) == 3 and 0 not in samples
    for t, q in ((t0, "capital of Foo"), (t1, "river of Baz")):
        assert t.token_ids[:len(t.prompt_ids)] == t.prompt_ids
        mask, lps = t.loss_mask, t.logprobs
        assert len(mask) == len(lps) == len(t.token_ids)
        assert not mask[:len(t.prompt_ids)].any()
        runs = _runs(list(mask))[1:]  # skip the prompt
        policy_texts = [s for s, _ in scripts[q]]
        queries = list(t.queries)
        for value, a, b in runs:
            text = tokenizer.decode(t.token_ids[a:b])
            if value == 1:
                assert text == policy_texts.pop(0)
                assert (lps[a:b] < 0).all()
            else:
                # a mask-0 run is exactly one information block, with this query's documents
                query = queries.pop(0)
                assert text == P.information_block(_docs(type("R", (), {
                    "query": query, "noisy": False})()))
                assert (lps[a:b] == 0).all()
        assert not policy_texts and not queries


def test_invalid_action_and_eos_in_the_middle(tokenizer):
    scripts = {"colour of Zed": [("I think it is blue.", "eos"), ("<answer> blue </answer>",
                                                                  "stop")]}
    trajs = rollout(["colour of Zed"], [["blue"]], tokenizer=tokenizer,
                    generate_fn=ScriptedPolicy(tokenizer, scripts),
                    backend=FunctionBackend(_docs))
    t = trajs[0]
    assert t.answer == "blue" and t.num_searches == 0
    assert tokenizer.eos_token_id not in t.response_ids  # dropped, as the reference does
    runs = _runs(list(t.loss_mask))[1:]
    assert [v for v, _, _ in runs] == [1, 0, 1]
    _, a, b = runs[1]
    assert tokenizer.decode(t.token_ids[a:b]) == P.INVALID_ACTION
    assert [s.kind for s in t.segments] == ["policy", "invalid", "policy"]


def test_max_turns_final_turn_and_never_answering(tokenizer):
    scripts = {"Q one": [("<search> a </search>", "stop"), ("<search> b </search>", "stop")],
               "Q two": [("no idea", "length"), ("still no idea", "eos")]}
    backend = FunctionBackend(_docs)
    trajs = rollout(["Q one", "Q two"], [["x"], ["y"]], tokenizer=tokenizer,
                    generate_fn=ScriptedPolicy(tokenizer, scripts), backend=backend,
                    settings=RolloutSettings(max_turns=1))
    one, two = trajs
    # the final turn's search is not executed: one backend call, one information block
    assert len(backend.calls) == 1 and one.num_searches == 1
    assert [s.kind for s in one.segments] == ["policy", "information", "policy"]
    assert [s.kind for s in two.segments] == ["policy", "invalid", "policy"]
    for t in trajs:
        assert not t.answered and t.answer is None and t.turns == 2
        # the prompt's "<answer> Beijing </answer>" example is never taken as the answer
        assert "<answer> Beijing </answer>" in t.full_text
    assert two.response_ids[-1] == tokenizer.eos_token_id  # a final EOS is kept


def test_zero_turns_answers_directly(tokenizer):
    scripts = {"Q": [("<answer> now </answer>", "stop")]}
    t = rollout(["Q"], [["now"]], tokenizer=tokenizer,
                generate_fn=ScriptedPolicy(tokenizer, scripts), backend=FunctionBackend(_docs),
                settings=RolloutSettings(max_turns=0))[0]
    assert t.answer == "now" and t.turns == 1


def test_left_truncation_and_observation_truncation(tokenizer):
    scripts = {"Q": [("<search> long </search>", "stop"), ("<answer> x </answer>", "stop")]}
    policy = ScriptedPolicy(tokenizer, {"Q": scripts["Q"]})
    # the question must stay visible to the scripted policy: keep enough of the context
    settings = RolloutSettings(max_turns=2, max_prompt_tokens=40, max_obs_tokens=5)
    long_docs = FunctionBackend(lambda r: "word " * 100)
    t = rollout(["Q"], [["x"]], tokenizer=tokenizer, generate_fn=policy, backend=long_docs,
                settings=settings)[0]
    assert all(len(x) <= 40 for x in policy.inputs)
    full = t.prompt_ids + t.response_ids
    second_input = policy.inputs[1]
    context_before_turn2 = full[:len(full) - len(tokenizer.encode("<answer> x </answer>",
                                                                  add_special_tokens=False))]
    assert second_input == context_before_turn2[-40:]
    info = [s for s in t.segments if s.kind == "information"][0]
    assert len(tokenizer.encode(info.text, add_special_tokens=False)) <= 5
    assert (t.loss_mask == 0).sum() - len(t.prompt_ids) == 5


def test_noise_draws(tokenizer):
    qs = [f"<q{i:02d}>" for i in range(40)]
    scripts = {q: [("<search> s </search>", "stop"), ("<answer> a </answer>", "stop")]
               for q in qs}

    def run(p, seed):
        backend = FunctionBackend(_docs)
        rollout(qs, [["a"]] * len(qs), tokenizer=tokenizer,
                generate_fn=ScriptedPolicy(tokenizer, scripts), backend=backend,
                noise_probability=p, noise_rng=lambda tid: np.random.default_rng([seed, tid]))
        return [r.noisy for batch in backend.calls for r in batch]

    assert not any(run(0.0, 1)) and all(run(1.0, 1))
    draws = run(0.5, 7)
    assert draws == run(0.5, 7) and draws != run(0.5, 8)
    assert 10 < sum(draws) < 30


def test_prompt_ids_chat_template_and_plain(tokenizer):
    chat = tokenizer.decode(prompt_ids(tokenizer, "  who is Zed  "))
    assert P.policy_prompt("who is Zed") in chat and "<|im_start|>user" in chat
    assert chat.rstrip().endswith("<|im_start|>assistant")
    assert "Question: who is Zed?\n" in chat
    plain = tokenizer.decode(prompt_ids(tokenizer, "who is Zed?", use_chat_template=False))
    assert plain == P.policy_prompt("who is Zed?")

    class WithBos:  # a tokenizer whose post-processor adds a BOS (Llama-3 style)
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [0] * add_special_tokens + tokenizer.encode(text, add_special_tokens=False)
    # as veRL (add_special_tokens=False): no BOS
    assert prompt_ids(WithBos(), "who is Zed?") == tokenizer.encode(
        P.policy_prompt("who is Zed?"), add_special_tokens=False)


def test_qwen3_style_template_leaves_thinking_to_the_policy(tokenizer):
    """Qwen3's template adds an empty `<think>` block to the generation prompt only when
    enable_thinking is False (the end of its template, written here as documented): zsjax
    applies it with its defaults, so the prompt ends at the assistant header (docs/METHOD.md)."""
    import copy
    qwen3 = copy.deepcopy(tokenizer)
    qwen3.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and "
        "enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")
    text = qwen3.decode(prompt_ids(qwen3, "who is Zed"))
    assert text.endswith("<|im_start|>assistant\n") and "<think>\n\n</think>" not in text
    off = qwen3.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n")  # what zsjax does not ask for


@pytest.mark.parametrize("kv_reuse,model", [
    pytest.param(True, "smollm2", marks=pytest.mark.slow), (False, "smollm2_short")])
def test_real_policy_logprobs_match_training_forward(request, smol_tokenizer, kv_reuse, model):
    """Multi-turn on-policy exactness: SmolLM2 rollout, then a full forward on the trajectory.
    The whole model with KV reuse (the default); re-prefilling each turn, its first 2 layers."""
    import jax
    from zsjax.models import forward
    config, params = (request.getfixturevalue("smollm2")[3:5] if model == "smollm2"
                      else request.getfixturevalue("smollm2_short"))
    settings = RolloutSettings(max_turns=2, max_response_tokens=40, temperature=1.0, top_p=1.0)
    gen = ModelTurnGenerator(config, params, smol_tokenizer, settings, kv_reuse=kv_reuse)
    trajs = rollout(["What is the capital of France?", "Who wrote Hamlet?", "Name a colour."],
                    [["Paris"], ["Shakespeare"], ["red"]], tokenizer=smol_tokenizer,
                    generate_fn=gen, backend=FunctionBackend(_docs), settings=settings, seed=5)
    assert sum(t.turns for t in trajs) > len(trajs)  # several turns were really played
    worst = 0.0
    for t in trajs:
        ids = np.array([t.token_ids])
        logp = np.asarray(jax.nn.log_softmax(forward(config, params, ids)[0], axis=-1))
        mask = t.loss_mask.astype(bool)
        pos = np.nonzero(mask)[0]
        ref = logp[pos - 1, ids[0, pos]]
        diff = np.abs(t.logprobs[pos] - ref).max()
        worst = max(worst, float(diff))
        assert diff < 2e-3, diff
    print(f"\nrollout (kv_reuse={kv_reuse}) vs training-forward logprob max abs diff: {worst:.2e}")


def test_kv_reuse_equals_re_prefill_greedy(smollm2_short, smol_tokenizer):
    config, params = smollm2_short
    settings = RolloutSettings(max_turns=3, max_response_tokens=24, temperature=0.0)
    qs = ["What is the capital of France?", "Who wrote Hamlet?", "Name a colour.", "Why?"]
    runs = {}
    for kv in (False, True):
        gen = ModelTurnGenerator(config, params, smol_tokenizer, settings, kv_reuse=kv)
        runs[kv] = rollout(qs, [["x"]] * 4, tokenizer=smol_tokenizer, generate_fn=gen,
                           backend=FunctionBackend(_docs), settings=settings)
    for a, b in zip(runs[False], runs[True]):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert sum(t.turns for t in runs[True]) > len(qs)


@pytest.mark.slow
def test_split_batch_samples_what_the_whole_batch_does(smollm2_short, smol_tokenizer):
    """Per-trajectory randomness: a batch rolled out in two parts (as two processes do) with
    their trajectory ids gives the whole batch's trajectories: the same sampled tokens and the
    same noisy draws."""
    config, params = smollm2_short
    settings = RolloutSettings(max_turns=2, max_response_tokens=16, temperature=1.0, top_p=0.9)
    qs = ["What is the capital of France?", "Who wrote Hamlet?", "Name a colour.", "Why?"]

    def run(part, ids):
        gen = ModelTurnGenerator(config, params, smol_tokenizer, settings, kv_reuse=True)
        return rollout([qs[i] for i in part], [["x"]] * len(part), tokenizer=smol_tokenizer,
                       generate_fn=gen, backend=FunctionBackend(_docs), settings=settings,
                       noise_probability=0.5, seed=3, trajectory_ids=ids)

    whole = run([0, 1, 2, 3], None)
    parts = run([0, 1], [0, 1]) + run([2, 3], [2, 3])
    for a, b in zip(whole, parts):
        assert a.token_ids == b.token_ids and a.noisy == b.noisy
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    shifted = run([0, 1], [2, 3])  # other ids: other draws
    assert [t.token_ids for t in shifted] != [t.token_ids for t in whole[:2]]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prompt_prefix_changes_nothing(smollm2_short, smol_tokenizer, temperature):
    """The first turn prefills the prompts' common prefix once (share_prefix): the same tokens
    and logprobs as prefilling each prompt whole, greedy or sampled."""
    config, params = smollm2_short
    settings = RolloutSettings(max_turns=2, max_response_tokens=12, temperature=temperature)
    qs = ["What is the capital of France?", "Who wrote Hamlet?", "Name a colour.", "Why?",
          "Who painted the Mona Lisa?"]
    runs = {}
    for share in (False, True):
        gen = ModelTurnGenerator(config, params, smol_tokenizer, settings, share_prefix=share)
        prefills = []
        shared = gen._shared_prefix

        def counted(contexts, shared=shared, gen=gen):
            before = gen._prefix
            out = shared(contexts)
            prefills.append(gen._prefix is not before)
            return out
        gen._shared_prefix = counted
        runs[share] = [rollout(qs[lo:hi], [["x"]] * (hi - lo), tokenizer=smol_tokenizer,
                               generate_fn=gen, backend=FunctionBackend(_docs),
                               settings=settings, seed=2, trajectory_ids=range(lo, hi))
                       for lo, hi in ((0, 3), (3, 5))]  # two batches: the prefix is reused
        if share:
            assert len(gen._prefix[0]) >= 100  # the chat template and the instructions
            assert prefills == [True, False]  # prefilled for the first batch, then reused
    for a, b in zip(sum(runs[False], []), sum(runs[True], [])):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-4)
