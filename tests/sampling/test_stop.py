"""Stop-string tables against a plain-Python reference: decode the prefix, look for the string."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from zsjax.sampling import stop


def _first_match(tables, ids):
    state = 0
    for k, t in enumerate(ids):
        if tables.matched[state, t]:
            return k
        state = tables.next_state[state, t]
    return None


def _reference_first_match(texts, ids, stops):
    text = ""
    for k, t in enumerate(ids):
        text += texts[t]
        if any(s in text for s in stops):
            return k
    return None


@given(st.lists(st.text(alphabet="ab</>c", min_size=1, max_size=4), min_size=1, max_size=30),
       st.lists(st.integers(0, 29), max_size=40),
       st.lists(st.text(alphabet="ab</>c", min_size=1, max_size=5), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_tables_match_reference_on_random_vocabularies(vocab, ids, stops):
    ids = [i % len(vocab) for i in ids]
    tables = stop.build_tables(vocab, stops)
    assert _first_match(tables, ids) == _reference_first_match(vocab, ids, stops)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_real_tokenizer_every_split(tokenizer):
    stops = ["</search>", "</answer>"]
    tables = stop.tables_for(tokenizer, len(tokenizer), stops)
    texts = stop.token_texts(tokenizer, len(tokenizer))
    rng = random.Random(0)
    target = "<search> capital of France </search> and more"
    for cut in range(1, len(target)):  # force a token boundary at every character
        ids = (tokenizer.encode(target[:cut], add_special_tokens=False)
               + tokenizer.encode(target[cut:], add_special_tokens=False))
        k = _first_match(tables, ids)
        assert k is not None and k == _reference_first_match(texts, ids, stops), cut
    for _ in range(50):  # random text with and without stop strings
        words = [rng.choice(["<search>", "</search", ">", "</answer>", "answer", " x", "</",
                             "sea", "rch>", "\n"]) for _ in range(rng.randint(1, 12))]
        ids = tokenizer.encode("".join(words), add_special_tokens=False)
        assert _first_match(tables, ids) == _reference_first_match(texts, ids, stops)


def test_tables_cache_is_per_tokenizer_and_released_with_it(tokenizer):
    import gc
    first = stop.tables_for(tokenizer, len(tokenizer), ["</search>"])
    assert stop.tables_for(tokenizer, len(tokenizer), ["</search>"]) is first
    assert stop.tables_for(tokenizer, len(tokenizer), ["</answer>"]) is not first

    class Tiny:  # a second, different "tokenizer": its own tables, never the first one's
        eos_token_id = None

        def __len__(self):
            return 3

        def batch_decode(self, ids, **kw):
            return ["</sea", "rch>", "x"]

    tiny = Tiny()
    t = stop.tables_for(tiny, 3, ["</search>"])
    assert t.next_state.shape[1] == 3 and t.matched[stop.tables_for(tiny, 3, ["</search>"])
                                                     .next_state[0, 0], 1]
    before = len(stop._TABLES)
    del tiny, t
    gc.collect()
    assert len(stop._TABLES) == before - 1
