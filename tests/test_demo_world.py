"""The demo's generated world and the training rows built from it (no model involved)."""

import collections
import random

import pytest

from zsjax.demo import run as R
from zsjax.demo import world as W
from zsjax.search.actions import parse_action


@pytest.fixture(scope="module")
def world():
    return W.make_world(seed=3, people=40, cities=12, countries=4)


def test_same_seed_same_world_and_names_are_unique(world):
    again = W.make_world(seed=3, people=40, cities=12, countries=4)
    assert again.people == world.people and again.cities == world.cities
    assert W.make_world(seed=4, people=40, cities=12, countries=4).people != world.people
    names = [n for e in world.entities() for n in e.split()]
    assert len(world.entities()) == 40 + 12 + 4
    # No entity's name is part of another's, so whole-word lookup is unambiguous.
    for e in world.entities():
        assert [x for x in world.entities() if W.mentions(x, e)] == [e]
    assert len(set(names)) == len(names)


def test_a_world_without_occupations_has_the_same_people_and_one_fact_each(world):
    bare = W.make_world(seed=3, people=40, cities=12, countries=4, occupations=False)
    assert {n: p["city"] for n, p in bare.people.items()} == {
        n: p["city"] for n, p in world.people.items()}
    assert bare.cities == world.cities and bare.occupations == []
    person = next(iter(bare.people))
    assert bare.facts_about(person) == [f"{person} was born in {bare.people[person]['city']}."]
    for seed in range(20):  # a noisy document about a person can only misplace their birth
        wrong = bare._wrong_fact(person, random.Random(seed))
        assert "was born in" in wrong and bare.people[person]["city"] not in wrong


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="countries <= cities"):
        W.make_world(people=5, cities=2, countries=3)


def test_questions_answer_from_the_facts(world):
    splits = world.splits()
    for q in [q for qs in splits.values() for q in qs]:
        first = q.hops[0]
        if q.question.startswith("Where was"):
            assert q.answer == world.people[first]["city"] and q.kind == "one_hop"
        elif q.question.startswith("In which country"):
            city = world.people[first]["city"]
            assert q.kind == "two_hop" and q.hops == (first, city)
            assert q.answer == world.cities[city]
        else:
            assert q.question == f"Which country is {first} in?"
            assert q.answer == world.cities[first]
        # Each hop's documents hold the fact that leads to the next hop / the answer.
        nxt = list(q.hops[1:]) + [q.answer]
        for hop, target in zip(q.hops, nxt):
            assert W.mentions(world.documents(hop, k=3), target)
            # the fact the simulator is scored on (demo.simulator_accuracy) is that one
            assert f": {world.answer_fact(hop)}" in world.documents(hop, k=3)
            assert W.mentions(world.answer_fact(hop), target)


def test_splits_are_disjoint_by_question_person_and_city(world):
    splits = world.splits()
    assert sum(len(v) for v in splits.values()) == 2 * 40 + 12
    subjects = {k: {q.hops[0] for q in v} for k, v in splits.items()}
    questions = {k: {q.question for q in v} for k, v in splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not subjects[a] & subjects[b]
        assert not questions[a] & questions[b]
    kinds = collections.Counter(q.kind for q in splits["test"])
    assert kinds["one_hop"] > 0 and kinds["two_hop"] > 0


def test_documents_useful_and_noisy(world):
    person = sorted(world.people)[0]
    truth = world.facts_about(person)
    useful = world.documents(f"where was {person} born", k=3).splitlines()
    assert [d.split(": ", 1)[1] for d in useful[:2]] == truth
    assert [d.split(":")[0] for d in useful] == ["Doc 1", "Doc 2", "Doc 3"]
    for seed in range(20):  # noisy sets never state the person's true facts, under any draw
        import random
        noisy = world.documents(person, noisy=True, k=3, rng=random.Random(seed))
        assert W.mentions(noisy, person)
        assert not any(t in noisy for t in truth)
    assert world.find_entity("nothing known here") is None
    assert len(world.documents("nothing known here", k=2).splitlines()) == 2


def test_simulator_rows_cover_every_entity_both_labels(world):
    splits = world.splits()
    qs = [q for v in splits.values() for q in v]
    rows = R.simulator_rows(world, qs, docs=3, seed=0)
    labels = collections.Counter(r["label"] for r in rows)
    assert labels["useful"] == labels["noisy"] == len(world.entities()) * len(R.QUERY_FORMS)
    for r in rows[:50]:
        assert r["documents"] == world.documents(r["query"], noisy=r["label"] == "noisy", k=3)


def test_policy_rows_are_format_only(world):
    splits = world.splits()
    rows = R.policy_rows(world, splits["train"], docs=3, seed=0, n=400)
    eval_forms = {q.question for v in splits.values() for q in v}
    direct = copies = searches = 0
    for r in rows:
        segs = r["segments"]
        assert segs[-1]["loss"] == 1 and parse_action(segs[-1]["text"]).kind == "answer"
        policy = [s for s in segs if s["loss"] == 1]
        info = [s for s in segs if s["loss"] == 0]
        assert all(s["text"].startswith("\n\n<information>") for s in info)
        assert len(policy) == len(info) + 1
        if not info:
            direct += 1
            continue
        first = parse_action(policy[0]["text"])
        assert first.kind == "search"
        searches += len(info)
        entity = W.World.find_entity(world, r["question"])
        copies += first.content == entity
        # The answer is some entity of the last documents: the warm start does not know which.
        answer = parse_action(policy[-1]["text"]).content
        assert W.mentions(info[-1]["text"], answer) or answer in W.OCCUPATIONS
        if r["question"] not in eval_forms:
            assert any(r["question"] == f.format(e=entity) for f in R.FORMAT_QUESTIONS)
    assert 0.05 < direct / len(rows) < 0.16
    assert copies / (len(rows) - direct) > 0.8
    assert 1.3 < searches / (len(rows) - direct) < 1.7


def test_copy_rows_search_for_the_named_entity(world):
    rows = R.copy_rows(world, world.splits()["train"], seed=0, n=100)
    for r in rows:
        (seg,) = r["segments"]
        assert parse_action(seg["text"]).content == world.find_entity(r["question"])


def test_copy_rows_with_made_up_names(world):
    """With `made_up`, that share of the rows asks about a name made of the world's words
    (in a generic or a question form) and searches for exactly that name; the rest are the
    world's own rows."""
    rows = R.copy_rows(world, world.splits()["train"], seed=0, n=400, made_up=0.5)
    words = {w for e in world.entities() for w in e.split()}
    forms = R.FORMAT_QUESTIONS + list(W.QUESTION_FORMS)
    made_up = 0
    for r in rows:
        (seg,) = r["segments"]
        name = parse_action(seg["text"]).content
        assert any(r["question"] == f.format(e=name) for f in forms), r
        assert 1 <= len(name.split()) <= 2 and set(name.split()) <= words
        made_up += name not in world.entities()
    # Some made-up names are an entity's by chance (a one-word city or country).
    assert 0.35 < made_up / len(rows) < 0.55
    assert {f for f in W.QUESTION_FORMS} <= {
        f for r in rows for f in forms
        if r["question"] == f.format(e=parse_action(r["segments"][0]["text"]).content)}


def test_fact_rates_tell_knowing_the_world_from_reading_the_prompt(world):
    questions = world.splits()["test"]
    hops = sum(len(q.hops) for q in questions)

    def engine(requests, noisy=False):
        return [world.documents(r.query, noisy=noisy, k=3) for r in requests]

    def from_prompt(requests):
        # a backend that knows nothing by itself: it states the asked-for fact only when
        # the question in its prompt names the entity searched for
        out = []
        for r in requests:
            named = bool(r.question) and W.mentions(r.question, r.query)
            out.append(f"Doc 1: {world.answer_fact(r.query)}" if named else "Doc 1: nothing")
        return out

    assert R.fact_rates(engine, world, questions) == {"alone": 1.0, "in_rollouts": 1.0}
    assert R.fact_rates(lambda rs: engine(rs, noisy=True), world, questions) == {
        "alone": 0.0, "in_rollouts": 0.0}
    # a two-hop question names its person, not the city of its second hop
    named = sum(W.mentions(q.question, e) for q in questions for e in q.hops)
    assert 0 < named < hops
    assert R.fact_rates(from_prompt, world, questions) == {"alone": 0.0,
                                                            "in_rollouts": named / hops}
