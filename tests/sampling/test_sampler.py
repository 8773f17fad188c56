"""zsjax.sampling.generate against transformers' generate, the training forward and NumPy."""

import jax
import numpy as np
import pytest
from scipy import stats

from hf_models import chat_ids
from zsjax.models import forward, load_hf
from zsjax.sampling import generate
from zsjax.sampling.sampler import _generate_core


def _hf_greedy(model, prompt, max_new, eos=None):
    import torch
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


RAGGED = [[5, 17, 200, 3, 9, 44, 101, 7, 7, 12, 250], [100], [31, 32, 33, 34], [1, 2] * 9]


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_greedy_matches_transformers_tiny(hf_model_dir, family, tied):
    path, model = hf_model_dir(family=family, tied=tied)
    config, params = load_hf(path)
    result = generate(config, params, RAGGED, max_new_tokens=40, eos_token_ids=[])
    assert result.finish_reasons == ["length"] * len(RAGGED)
    for prompt, ours in zip(RAGGED, result.tokens):
        assert ours == _hf_greedy(model, prompt, 40)


QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.",
             "Who wrote Hamlet?", "List three colours."]


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2_ragged(smollm2):
    _, tokenizer, reference, config, params = smollm2
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1
    result = generate(config, params, prompts, max_new_tokens=48, tokenizer=tokenizer)
    for prompt, ours, reason in zip(prompts, result.tokens, result.finish_reasons):
        ref = _hf_greedy(reference, prompt, 48, eos=tokenizer.eos_token_id)
        assert ours == ref
        assert reason == ("eos" if ref[-1] == tokenizer.eos_token_id else "length")
    # rows finished at different steps, and at least one ran to its budget
    assert len({len(t) for t in result.tokens}) > 1
    assert "length" in result.finish_reasons and "eos" in result.finish_reasons


@pytest.mark.slow
def test_stop_string_straddling_tokens_end_to_end(smollm2):
    _, tokenizer, _, config, params = smollm2
    prompt = chat_ids(tokenizer, QUESTIONS[0])
    free = generate(config, params, [prompt], max_new_tokens=16, tokenizer=tokenizer).tokens[0]
    pieces = [tokenizer.decode([t]) for t in free]
    assert pieces[3:6] == [" France", " is", " Paris"], pieces
    stop = "ance is Pa"  # starts inside " France", ends inside " Paris"
    result = generate(config, params, [prompt], max_new_tokens=16, tokenizer=tokenizer,
                      stop_strings=["</search>", stop])
    assert result.finish_reasons == ["stop"]
    assert result.tokens[0] == free[:6]  # up to and including the token completing the string
    assert stop in tokenizer.decode(result.tokens[0])
    assert stop not in tokenizer.decode(result.tokens[0][:-1])


def test_logprobs_equal_training_forward(hf_model_dir):
    """On-policy exactness: the sampler's logprobs vs a fresh full forward on the same tokens."""
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    worst = 0.0
    for temperature in (1.0, 0.7):
        result = generate(config, params, RAGGED, max_new_tokens=24, temperature=temperature,
                          eos_token_ids=[], seed=3)
        seqs = [p + t for p, t in zip(RAGGED, result.tokens)]
        length = max(map(len, seqs))
        tokens = np.zeros((len(seqs), length), np.int32)
        mask = np.zeros_like(tokens, bool)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)], mask[i, :len(s)] = s, True
        logits = np.asarray(forward(config, params, tokens, attention_mask=mask), np.float64)
        logp = jax.nn.log_softmax(logits / temperature, axis=-1)
        for i, (prompt, gen) in enumerate(zip(RAGGED, result.tokens)):
            pos = np.arange(len(prompt) - 1, len(prompt) - 1 + len(gen))
            ref = np.asarray(logp)[i, pos, gen]
            np.testing.assert_allclose(result.model_logprobs[i], ref, atol=1e-4)
            # no top-k/top-p: the sampled distribution is the tempered model distribution
            np.testing.assert_allclose(result.logprobs[i], result.model_logprobs[i], atol=1e-6)
            worst = max(worst, float(np.abs(result.model_logprobs[i] - ref).max()))
    print(f"\nsampler vs training-forward logprob max abs diff: {worst:.2e}")


def _numpy_distribution(logits, temperature, top_k, top_p):
    """Independent reference: the filtered sampling distribution, in float64 NumPy."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros_like(keep)
        kept[order[before < top_p]] = True
        p = np.where(kept, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0),
                                                     (1.0, 12, 1.0), (0.8, 0, 0.7),
                                                     (1.3, 40, 0.9)])
def test_sampling_distribution(hf_model_dir, temperature, top_k, top_p):
    path, _ = hf_model_dir(family="llama", tied=False)
    config, params = load_hf(path)
    prompt = [7, 99, 3, 250, 18]
    n = 4096
    result = generate(config, params, [prompt] * n, max_new_tokens=1, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_token_ids=[], seed=11)
    draws = np.array([t[0] for t in result.tokens])
    logits = np.asarray(forward(config, params, [prompt]))[0, -1]
    expect = _numpy_distribution(logits, temperature, top_k, top_p)
    support = expect > 0
    assert support[draws].all(), "sampled a token outside the top-k/top-p support"
    if top_k:
        assert support.sum() == top_k if top_p == 1.0 else support.sum() <= top_k
    # returned logprobs are those of the filtered distribution
    lp = np.array([x[0] for x in result.logprobs])
    np.testing.assert_allclose(lp, np.log(expect[draws]), atol=1e-4)
    # chi-square goodness of fit, pooling rare tokens so every bin expects >= 5 draws
    counts = np.bincount(draws, minlength=len(expect))[support]
    expected = expect[support] * n
    order = np.argsort(expected)
    pooled_obs, pooled_exp, acc_o, acc_e = [], [], 0, 0.0
    for i in order:
        acc_o, acc_e = acc_o + counts[i], acc_e + expected[i]
        if acc_e >= 5:
            pooled_obs.append(acc_o), pooled_exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    if acc_e:
        pooled_obs[-1] += acc_o
        pooled_exp[-1] += acc_e
    assert len(pooled_obs) > 5
    _, pvalue = stats.chisquare(pooled_obs, pooled_exp)
    assert pvalue > 1e-3, pvalue


def test_bad_prompts(hf_model_dir):
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(config, params, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(config, params, [], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"outside \[0, 257\)"):
        generate(config, params, [[1, 300]], max_new_tokens=4)
    with pytest.raises(TypeError, match="tokenize text first"):
        generate(config, params, "hello", max_new_tokens=4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(config, params, [[1]], max_new_tokens=4, stop_strings=["</search>"])
    with pytest.raises(ValueError, match="top_p"):
        generate(config, params, [[1]], max_new_tokens=4, temperature=1.0, top_p=0.0)


def test_seeds_beyond_int64(hf_model_dir):
    """The trainer derives sampling seeds as seed * 1_000_003 + step (and again per turn), which
    pass 2**63 for seeds above about 9.2M: they are taken modulo 2**63, not an OverflowError."""
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    kw = dict(max_new_tokens=6, temperature=1.0)
    big = (20240601 * 1_000_003 + 3) * 1_000_003 + 1
    a = generate(config, params, [[1, 2, 3]] * 2, seed=big, **kw)
    b = generate(config, params, [[1, 2, 3]] * 2, seed=big % 2 ** 63, **kw)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 6


def test_bucketing_limits_compiles(hf_model_dir):
    path, _ = hf_model_dir(family="qwen2", tied=True)
    config, params = load_hf(path)
    before = _generate_core._cache_size()
    for n_prompts, plen, new in [(4, 5, 10), (4, 9, 12), (4, 16, 16), (4, 12, 5)]:
        prompts = [list(range(1, plen + 1))] * n_prompts
        generate(config, params, prompts, max_new_tokens=new, eos_token_ids=[])
    # four calls, one bucket: batch 4, prompt 16, generation 16
    assert _generate_core._cache_size() - before == 1


def test_sharded_generation_matches_single_device(hf_model_dir):
    from zsjax import sharding
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    _, sharded = load_hf(path, mesh=mesh)
    ref = generate(config, params, RAGGED, max_new_tokens=20, eos_token_ids=[])
    out = generate(config, sharded, RAGGED, max_new_tokens=20, eos_token_ids=[])
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rows_sample_independently_of_the_batch(hf_model_dir):
    """A row's samples depend on (seed, its row seed) only: not on the other rows, its position,
    the padded batch size or the mesh."""
    from zsjax import sharding
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    kw = dict(max_new_tokens=12, temperature=1.0, eos_token_ids=[], seed=4)
    whole = generate(config, params, RAGGED, **kw)
    n = len(RAGGED)
    alone = [generate(config, params, [RAGGED[i]], row_seeds=[i], **kw).tokens[0]
             for i in range(n)]
    assert alone == whole.tokens
    backwards = generate(config, params, RAGGED[::-1], row_seeds=range(n)[::-1], **kw)
    assert backwards.tokens[::-1] == whole.tokens
    if jax.device_count() >= 4:
        mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
        _, sharded = load_hf(path, mesh=mesh)
        assert generate(config, sharded, RAGGED, **kw).tokens == whole.tokens
    other = generate(config, params, RAGGED, row_seeds=range(1, n + 1), **kw)
    assert other.tokens != whole.tokens
    with pytest.raises(ValueError, match="row_seeds"):
        generate(config, params, RAGGED, row_seeds=[1], **kw)


def test_drop_last_token_forgets_exactly_the_listed_rows_last_slots(caplog):
    """Against a NumPy reference; and after a first call, dropping other numbers of rows
    compiles nothing (an indexed update compiled per row count, every rollout)."""
    import logging

    from zsjax.models.config import ModelConfig
    from zsjax.models.decoder import init_cache
    from zsjax.sampling.sampler import DecodeSession
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=8, d_ff=32)
    cache = init_cache(config, 4, 10)
    rng = np.random.default_rng(0)
    valid = rng.random((4, 10)) < 0.8
    cache = cache.replace(valid=jax.numpy.asarray(valid))
    session = DecodeSession(cache, 10, 4, np.array([5, 6, 7, 8]), np.array([3, -1, 7, 9]))
    session.drop_last_token([0])  # the one compile for this cache shape
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for rows in ([0, 1, 2], [3], [1, 2], [0, 2, 3]):
            out = session.drop_last_token(rows)
            want, next_pos, last = valid.copy(), session.next_pos.copy(), session.last_slot.copy()
            for r in rows:
                if last[r] >= 0:
                    want[r, last[r]] = False
                    next_pos[r] -= 1
                    last[r] = -1
            np.testing.assert_array_equal(np.asarray(out.cache.valid), want)
            np.testing.assert_array_equal(out.next_pos, next_pos)
            np.testing.assert_array_equal(out.last_slot, last)
    compiles = [r.getMessage() for r in caplog.records if "compil" in r.getMessage().lower()]
    assert not compiles, compiles
    assert session.drop_last_token([1]) is session  # nothing to forget


@pytest.mark.slow
def test_shrinking_batch_samples_what_the_whole_batch_does(hf_model_dir):
    """Rows that finish early leave the batch (it shrinks by halves as they do): every row's
    tokens, logprobs and finish reason are those of the batch that never shrinks, for fewer
    rows x steps; and the next turn continues the moved rows' KV caches as if they had stayed."""
    from zsjax.sampling import continue_generate
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    prompts = [RAGGED[i % 4][:1 + i % 7] for i in range(20)]  # batch bucket 24
    # About one token in six ends a row (the tiny random model is near uniform).
    kw = dict(max_new_tokens=30, temperature=1.0, eos_token_ids=list(range(0, 257, 6)), seed=3)
    whole = generate(config, params, prompts, shrink_above=0, **kw)
    shrunk = generate(config, params, prompts, **kw)  # the default: 24 -> 12 -> 6 rows
    lengths = [len(t) for t in whole.tokens]
    assert min(lengths) < 5 and max(lengths) > 15, lengths  # the rows do finish apart
    assert shrunk.tokens == whole.tokens
    assert shrunk.finish_reasons == whole.finish_reasons
    for a, b in zip(shrunk.logprobs, whole.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert whole.rows_stepped == 24 * max(lengths)
    assert shrunk.rows_stepped < 0.7 * whole.rows_stepped, (shrunk.rows_stepped, whole.rows_stepped)
    if jax.device_count() >= 4:  # rows over 4 devices: the smaller batches stay multiples of 4
        from zsjax import sharding
        mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
        _, sharded = load_hf(path, mesh=mesh)
        on_mesh = generate(config, sharded, prompts, **kw)
        assert on_mesh.tokens == whole.tokens
        assert on_mesh.rows_stepped < whole.rows_stepped
    # A row alone (batch 1, no shrinking possible) samples the same tokens.
    for i in (0, int(np.argmax(lengths))):
        assert generate(config, params, [prompts[i]], row_seeds=[i], **kw).tokens[0] == \
            whole.tokens[i]

    first, s_whole = continue_generate(config, params, prompts, session=None, shrink_above=0,
                                       **kw)
    first_s, s_shrunk = continue_generate(config, params, prompts, session=None, **kw)
    assert first_s.tokens == first.tokens == whole.tokens
    assert first_s.rows_stepped == shrunk.rows_stepped  # shrinks as generate does
    assert s_shrunk.index == s_whole.index
    np.testing.assert_array_equal(s_shrunk.next_pos, s_whole.next_pos)
    valid = np.asarray(s_whole.cache.valid)  # [B, S]
    np.testing.assert_array_equal(np.asarray(s_shrunk.cache.valid), valid)
    # Keys and values agree in every valid slot (finished rows' invalid slots may differ).
    for a, b in zip(s_shrunk.cache.k, s_whole.cache.k):  # [B, KVH, S, Dh]
        np.testing.assert_allclose(np.asarray(a) * valid[:, None, :, None],
                                   np.asarray(b) * valid[:, None, :, None], atol=1e-5)
    for a, b in zip(s_shrunk.cache.v, s_whole.cache.v):  # [B, KVH, Dh, S]
        np.testing.assert_allclose(np.asarray(a) * valid[:, None, None, :],
                                   np.asarray(b) * valid[:, None, None, :], atol=1e-5)
    chunk = [[40, 41, 42]] * len(prompts)
    kw2 = dict(kw, seed=4)
    second, _ = continue_generate(config, params, chunk, session=s_whole, shrink_above=0, **kw2)
    second_s, _ = continue_generate(config, params, chunk, session=s_shrunk, **kw2)
    assert second_s.tokens == second.tokens
    for a, b in zip(second_s.logprobs, second.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if jax.device_count() >= 4:  # both turns with the rows over 4 devices, shrinking
        first_m, s_mesh = continue_generate(config, sharded, prompts, session=None, **kw)
        second_m, _ = continue_generate(config, sharded, chunk, session=s_mesh, **kw2)
        assert first_m.tokens == whole.tokens and second_m.tokens == second.tokens
        for a, b in zip(second_m.logprobs, second.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_continuing_rows_kept_in_a_larger_batch_sample_what_a_smaller_batch_does(
        hf_model_dir):
    """select(rows, batch=B) keeps the continuing rows in a batch of B (padding rows beside
    them; multi-turn rollouts with shrink_above=0 keep the first turn's batch, so later turns
    reuse its compiled programs): the next turn samples the same tokens and logprobs as from
    the smallest batch that holds them."""
    from zsjax.sampling import continue_generate
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    prompts = [RAGGED[i % 4][:1 + i % 7] for i in range(20)]  # batch bucket 24
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    _, session = continue_generate(config, params, prompts, session=None, shrink_above=0, **kw)
    keep = [3, 17, 8, 0, 11]
    chunk = [[40, 41 + i] for i in range(len(keep))]
    kw2 = dict(max_new_tokens=8, temperature=1.0, seed=4, row_seeds=[7 * r for r in keep])
    small = session.select(keep)
    large = session.select(keep, batch=24)
    assert small.cache.valid.shape[0] == 6 and large.cache.valid.shape[0] == 24
    a, s_small = continue_generate(config, params, chunk, session=small, **kw2)
    b, s_large = continue_generate(config, params, chunk, session=large, **kw2)
    assert s_large.cache.valid.shape[0] == 24
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_allclose(x, y, atol=1e-5)
    np.testing.assert_array_equal(s_small.next_pos[:len(keep)], s_large.next_pos[:len(keep)])
    with pytest.raises(ValueError, match="select"):  # a batch too small for the chunks
        continue_generate(config, params, chunk + chunk, session=small, **kw)


def test_row_seeds_are_any_python_int_modulo_2_to_the_32():
    from zsjax.sampling.sampler import _row_seeds
    assert _row_seeds([-1, 2 ** 32 + 1, 7], 3, 4).tolist() == [2 ** 32 - 1, 1, 7, 0]
