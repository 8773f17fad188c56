"""Stop-string tables against a plain-Python reference: decode the prefix, look for the string."""

import random

import chat_tokenizer
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
def tokenizer():
    """A byte-level BPE chat tokenizer built offline (tests/chat_tokenizer.py)."""
    return chat_tokenizer.build()


def test_byte_level_tokenizer_every_split(tokenizer):
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


def _joint_first_match(tokenizer, ids, stops):
    """The plain reference in running text: decode the prefix as a whole, look for the string."""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=False)
        if any(s in text for s in stops):
            return k
    return None


def test_stop_strings_with_characters_split_across_byte_tokens(tokenizer):
    """A byte-level BPE (as SmolLM2's and Qwen's) splits '日' into pieces that decode alone to
    '\ufffd': the tables read tokens as bytes, so a stop string with such characters is still
    found."""
    ids = tokenizer.encode("abc 日本 def Ω the answer is here", add_special_tokens=False)
    assert any("\ufffd" in t for t in tokenizer.batch_decode([[i] for i in ids]))
    for s in ("日本", "Ω", "本 d", " is "):
        k = _first_match(stop.tables_for(tokenizer, len(tokenizer), [s]), ids)
        assert k is not None and k == _joint_first_match(tokenizer, ids, [s]), s


def test_stop_strings_with_spaces_on_a_sentencepiece_style_tokenizer():
    """'▁is' decodes alone as 'is' (the decoder strips a leading space), so a stop string with
    a space would be missed on its text; its bytes, from the piece, keep the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["the final answer is here", "my answer is done"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = tok.encode("the final answer is here", add_special_tokens=False)
    assert "is" in tok.batch_decode([[i] for i in ids])  # the space is gone when alone
    for s in ("answer is", " is", "here"):
        k = _first_match(stop.tables_for(tok, len(tok), [s]), ids)
        assert k is not None and k == _joint_first_match(tok, ids, [s]), s
