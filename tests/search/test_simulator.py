"""The in-process simulator: prompts (compatibility constants), post-processing, batching."""

import dataclasses

import chat_tokenizer
import pytest

from zsjax.search import SearchRequest
from zsjax.search.simulator import (InProcessSimulator, chat_messages, postprocess_documents,
                                    simulator_prompt)

# Transcribed by hand from the design reference (section 1, "Simulator").
USEFUL = ('You are the Google search engine.\nGiven a query, you need to generate five useful '
          'documents for the query.\n\nThe user is trying to answer the question: "Who is Zed?" '
          'whose answer is Zed Quill.\nEach document should contain about 30 words, and these '
          'documents should contain useful information.\n\nQuery: zed identity\nUseful Output:\n')


def test_finetuned_prompts_are_the_compatibility_constants():
    r = SearchRequest("zed identity", "Who is Zed?", ("Zed Quill", "Zed"), noisy=False)
    assert simulator_prompt(r) == USEFUL
    noisy = simulator_prompt(SearchRequest("zed identity", "Who is Zed?", ("Zed Quill",), True))
    assert noisy == USEFUL.replace("useful", "noisy").replace("Useful Output", "Noisy Output")
    assert noisy.lower().count("noisy") == 3 and noisy.endswith("Noisy Output:\n")


def test_prompt_only_variant():
    useful = simulator_prompt(SearchRequest("q1", "Who is Zed?", ("Zed Q.",)), "prompt_only")
    noisy = simulator_prompt(SearchRequest("q1", "Who is Zed?", ("Zed Q.",), True),
                             "prompt_only")
    assert "Doc 5:" in useful and useful.endswith("Query: q1\nOutput:\n")
    assert "Zed Q." in useful and "Who is Zed?" in useful
    assert "Zed Q." not in noisy and "Who is Zed?" not in noisy  # noisy omits question/answer
    with pytest.raises(ValueError, match="unknown simulator prompt style"):
        simulator_prompt(SearchRequest("q", "q", ("a",)), "fancy")


def test_postprocess_documents():
    text = "Doc 1: a\n\n\nDoc 2: b\n \nDoc 3: c\nDoc 4: d\nDoc 5: e\nDoc 6: f\nDoc 7: g"
    assert postprocess_documents(text) == "Doc 1: a\nDoc 2: b\nDoc 3: c\nDoc 4: d\nDoc 5: e"
    assert postprocess_documents(text, top_k=2) == "Doc 1: a\nDoc 2: b"
    assert postprocess_documents("  just text  ") == "just text"


def test_in_process_simulator_batches_caches_and_keeps_contexts_apart():
    """A tiny random decoder with an offline-built ChatML tokenizer (tests/chat_tokenizer.py)."""
    from zsjax.sampling import generate
    tok = chat_tokenizer.build()
    config, params = chat_tokenizer.tiny_model(tok)
    sim = InProcessSimulator(config, params, tok, style="prompt_only", temperature=0.0,
                             max_new_tokens=24)
    reqs = [SearchRequest("capital of France", "What is the capital of France?", ("Paris",)),
            SearchRequest("author of Hamlet", "Who wrote Hamlet?", ("Shakespeare",)),
            SearchRequest("capital of France", "What is the capital of France?", ("Paris",)),
            SearchRequest("capital of France", "What is the capital of France?", ("Paris",),
                          noisy=True)]
    docs = sim.search(reqs)
    assert len(docs) == 4 and sim.calls == 1 and sim.generated == 3  # one duplicate cached
    assert docs[0] == docs[2]
    # each request's output is what its own prompt generates alone (no cross-request mix-up),
    # in the reference's chat: an empty system message (not the template's default one)
    for r, d in zip(reqs[:2], docs[:2]):
        text = tok.apply_chat_template(chat_messages(simulator_prompt(r, "prompt_only")),
                                       tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nYou are")
        alone = generate(config, params, [tok.encode(text, add_special_tokens=False)],
                         max_new_tokens=24, tokenizer=tok)
        assert d == postprocess_documents(tok.decode(alone.tokens[0], skip_special_tokens=True))
    assert sim.search([]) == []
    # Sampling: a request's `sample` gives identical requests their own documents, each
    # reproducible; greedy decoding ignores it.
    sampled = InProcessSimulator(config, params, tok, style="prompt_only", temperature=0.8,
                                 max_new_tokens=24)
    numbered = [dataclasses.replace(reqs[0], sample=s) for s in (1, 2, 1)]
    docs = sampled.search(numbered)
    assert docs[0] != docs[1] and docs[0] == docs[2] and sampled.generated == 2
    assert sampled.search(numbered[:1]) == docs[:1]
    assert sim.search(numbered) == [sim.search(reqs[:1])[0]] * 3
