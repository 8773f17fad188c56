"""A generated world of fictional people, cities, countries and occupations: facts no model could
know, questions about them, and the documents a search engine would return.

Facts: each person was born in a city and has an occupation; each city is in a country.
Questions (occupations are facts and distractors, never asked about: a 2-layer policy asked
about them collapsed onto answering places for every question type, see the README):
- one-hop: "Where was P born?" (a city), "Which country is C in?" (one search each);
- two-hop: "In which country was P born?" (P's city, then that city's country: two searches).
Train, validation and test questions are about disjoint people (and test cities are only asked
about in the test split), so held-out scores measure searching, not memorising.

`documents(query, ...)` is the world's perfect search engine (the demo's "Google"); useful and
noisy document sets are what the simulator is fine-tuned to write.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
CODAS = ["", "n", "r", "s", "l", "th", "x", "m"]
OCCUPATIONS = ["baker", "potter", "sailor", "weaver", "miner", "painter", "farmer", "tailor",
               "glassblower", "carpenter", "fisher", "scribe", "brewer", "smith", "hunter",
               "healer", "mason", "herder", "jeweler", "cartographer"]


# The forms of the questions: one-hop about a person and about a city, two-hop about a person.
BORN_IN = "Where was {e} born?"
COUNTRY_OF_CITY = "Which country is {e} in?"
COUNTRY_OF_BIRTH = "In which country was {e} born?"
QUESTION_FORMS = (BORN_IN, COUNTRY_OF_CITY, COUNTRY_OF_BIRTH)


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    kind: str  # "one_hop" | "two_hop"
    hops: tuple[str, ...]  # the entities a good agent searches for, in order

    def row(self) -> dict:
        return {"question": self.question, "golden_answers": [self.answer], "kind": self.kind}


@dataclasses.dataclass
class World:
    people: dict[str, dict]  # name -> {"city"[, "occupation"]}
    cities: dict[str, str]  # city -> country
    countries: list[str]
    seed: int
    occupations: list[str] = dataclasses.field(default_factory=lambda: list(OCCUPATIONS))

    # --- facts and documents ------------------------------------------------------------------
    def facts_about(self, entity: str) -> list[str]:
        """Every fact sentence that mentions `entity`, its own facts first."""
        if entity in self.people:
            p = self.people[entity]
            return [f"{entity} was born in {p['city']}."] + (
                [f"{entity} works as a {p['occupation']}."] if "occupation" in p else [])
        if entity in self.cities:
            born = sorted(n for n, p in self.people.items() if p["city"] == entity)
            return [f"{entity} is a city in {self.cities[entity]}."] + [
                f"{n} was born in {entity}." for n in born]
        if entity in self.countries:
            return [f"{c} is a city in {entity}." for c in sorted(self.cities)
                    if self.cities[c] == entity]
        return []

    def answer_fact(self, entity: str) -> str:
        """The fact a question about a person or a city asks for: where the person was born,
        which country the city is in (occupations are never asked about)."""
        if entity in self.people:
            return f"{entity} was born in {self.people[entity]['city']}."
        if entity in self.cities:
            return f"{entity} is a city in {self.cities[entity]}."
        raise ValueError(f"{entity!r} is not a person or a city of this world")

    def entities(self) -> list[str]:
        return list(self.people) + list(self.cities) + self.countries

    def find_entity(self, query: str) -> str | None:
        """The longest entity name in the query (case-insensitive, whole words)."""
        hits = [e for e in self.entities() if mentions(query, e)]
        return max(hits, key=len) if hits else None

    def documents(self, query: str, *, noisy: bool = False, k: int = 3,
                  rng: random.Random | None = None) -> str:
        """k `Doc i:` lines for a query. Useful: the queried entity's facts, then facts about
        other entities. Noisy: plausible facts with wrong values, and unrelated facts."""
        rng = rng or random.Random(f"{self.seed}/{query}/{noisy}")
        entity = self.find_entity(query)
        docs: list[str] = []
        if entity is not None and not noisy:
            docs = self.facts_about(entity)[:k - 1]
        elif entity is not None:
            docs = [self._wrong_fact(entity, rng)]
        while len(docs) < k:
            other = rng.choice(self.entities())
            # Filler facts never mention the queried entity (a noisy set must not leak its
            # true facts through a neighbour's).
            facts = [f for f in self.facts_about(other)
                     if entity is None or not mentions(f, entity)]
            if other != entity and facts:
                docs.append(rng.choice(facts))
        return "\n".join(f"Doc {i + 1}: {d}" for i, d in enumerate(docs))

    def _wrong_fact(self, entity: str, rng: random.Random) -> str:
        if entity in self.people:
            p = self.people[entity]
            if "occupation" not in p or rng.random() < 0.5:
                city = rng.choice([c for c in self.cities if c != p["city"]])
                return f"{entity} was born in {city}."
            occ = rng.choice([o for o in OCCUPATIONS if o != p["occupation"]])
            return f"{entity} works as a {occ}."
        if entity in self.cities:
            country = rng.choice([c for c in self.countries if c != self.cities[entity]])
            return f"{entity} is a city in {country}."
        city = rng.choice([c for c in self.cities if self.cities[c] != entity])
        return f"{city} is a city in {entity}."

    # --- questions ------------------------------------------------------------------------
    def questions(self, people: list[str], cities: list[str]) -> list[Question]:
        out = []
        for name in people:
            p = self.people[name]
            out.append(Question(BORN_IN.format(e=name), p["city"], "one_hop", (name,)))
            out.append(Question(COUNTRY_OF_BIRTH.format(e=name), self.cities[p["city"]],
                                "two_hop", (name, p["city"])))
        for city in cities:
            out.append(Question(COUNTRY_OF_CITY.format(e=city), self.cities[city], "one_hop",
                                (city,)))
        return out

    def made_up_name(self, rng: random.Random) -> str:
        """A name that sounds like this world's but need not name anything in it: one or two
        words of its entities' names, drawn at random (with a tokenizer trained on the world,
        its tokens are the world's)."""
        return " ".join(rng.sample(self._words, rng.choice((1, 2))))

    @functools.cached_property
    def _words(self) -> list[str]:
        return sorted({w for e in self.entities() for w in e.split()})

    def splits(self, fractions=(0.7, 0.1, 0.2)) -> dict[str, list[Question]]:
        """Disjoint train / validation / test questions (by person and by asked-about city)."""
        rng = random.Random(self.seed + 1)
        people, cities = sorted(self.people), sorted(self.cities)
        rng.shuffle(people)
        rng.shuffle(cities)

        def cut(items):
            a = int(len(items) * fractions[0])
            b = a + int(len(items) * fractions[1])
            return items[:a], items[a:b], items[b:]

        out = {}
        for name, ps, cs in zip(("train", "validation", "test"), cut(people), cut(cities)):
            qs = self.questions(ps, cs)
            rng.shuffle(qs)
            out[name] = qs
        return out

    def corpus(self) -> list[str]:
        """Every fact sentence (for the tokenizer)."""
        return [f for e in self.entities() for f in self.facts_about(e)]


def mentions(text: str, entity: str) -> bool:
    """Whether `text` names `entity` as whole words (case and punctuation ignored)."""
    return f" {entity.lower()} " in " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "


def _names(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(k))
        word = (word + rng.choice(CODAS)).capitalize()
        if word not in taken and len(word) >= 3:
            taken.add(word)
            out.append(word)
    return out


def make_world(*, seed: int = 0, people: int = 150, cities: int = 40, countries: int = 10,
               occupations: bool = True) -> World:
    """A deterministic world from `seed`. `occupations`: people also have an occupation (a
    fact no question asks about, a distractor in their documents); without, a person has one
    fact, so a simulator memorises a world of more people in the same steps."""
    if not 1 <= countries <= cities or people < 1:
        raise ValueError(f"a world needs people >= 1 and 1 <= countries <= cities; got "
                         f"people={people}, cities={cities}, countries={countries}")
    rng = random.Random(seed)
    taken: set[str] = set()
    country_names = _names(rng, countries, (2, 3), taken)
    city_names = _names(rng, cities, (2, 2), taken)
    first = _names(rng, people, (1, 2), taken)
    last = _names(rng, people, (2, 2), taken)
    city_country = {c: country_names[i % countries] for i, c in enumerate(city_names)}
    persons = {f"{f} {l}": {"city": rng.choice(city_names), "occupation": rng.choice(OCCUPATIONS)}
               for f, l in zip(first, last)}
    if not occupations:  # the same people and cities as with them
        persons = {n: {"city": p["city"]} for n, p in persons.items()}
    return World(persons, city_country, country_names, seed,
                 list(OCCUPATIONS) if occupations else [])
