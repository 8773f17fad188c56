"""The per-step query cache and the realised noise fraction."""

from zsjax.search import FunctionBackend, SearchRequest, StepCache, noisy_fraction
from zsjax.search.rollout import Trajectory


def test_step_cache_generates_identical_requests_once_per_step():
    inner = FunctionBackend(lambda r: f"docs for {r.query} {'N' if r.noisy else 'U'}")
    cache = StepCache(inner)
    a = SearchRequest("q", "Q?", ("x",))
    b = SearchRequest("q", "Q?", ("x",), noisy=True)
    c = SearchRequest("q", "other?", ("y",))
    assert cache.search([a, b, a]) == ["docs for q U", "docs for q N", "docs for q U"]
    assert cache.search([a, c]) == ["docs for q U", "docs for q U"]
    assert [len(call) for call in inner.calls] == [2, 1]  # a, b; then only c
    assert (cache.hits, cache.misses) == (2, 3)
    cache.new_step()
    cache.search([a])
    assert len(inner.calls) == 3
    # the same question text with another first answer (duplicate questions in a dataset):
    # the simulator's prompt states the answer, so these are different requests
    d = SearchRequest("q", "Q?", ("z", "x"))
    e = SearchRequest("q", "Q?", ("x", "w"))  # the same first answer: the same prompt
    cache.search([d, e])
    assert [list(call) for call in inner.calls[3:]] == [[d]]


def test_noisy_fraction():
    t1, t2 = Trajectory("q", ("a",), [1]), Trajectory("q", ("a",), [1])
    assert noisy_fraction([t1, t2]) is None
    t1.noisy, t2.noisy = [True, False], [True, True]
    assert noisy_fraction([t1, t2]) == 0.75


def test_step_cache_keeps_samples_apart_unless_shared():
    """For a sampling backend, requests that differ only in `sample` (the rollout numbers each
    search call) are different requests, as each reference call samples its own documents;
    `share=True` makes identical calls of a step share one result. A backend with fixed
    results (no `samples`: a retriever, a scripted engine) gets each distinct request once."""
    class Sampling(FunctionBackend):
        samples = True
    inner = Sampling(lambda r: f"docs {r.query} #{r.sample}")
    reqs = [SearchRequest("q", "Q?", ("x",), sample=s) for s in (3, 4, 3)]
    assert StepCache(inner).search(reqs) == ["docs q #3", "docs q #4", "docs q #3"]
    assert StepCache(inner, share=True).search(reqs) == ["docs q #0"] * 3
    assert [len(call) for call in inner.calls] == [2, 1]
    fixed = FunctionBackend(lambda r: f"docs {r.query} #{r.sample}")
    assert StepCache(fixed).search(reqs) == ["docs q #0"] * 3 and len(fixed.calls[0]) == 1
