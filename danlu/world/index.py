"""The world's facts indexed by subject and relation, and which facts are reserved for transfer evaluation.

A share of facts is RESERVED: they appear in pretraining text only, never in any SFT dialog, preference pair or
RL prompt. The chat eval then measures whether a fact learned from reading transfers to answering questions.
A few showcase facts (China's highest mountain, Japan's capital …) are never reserved, so the demo questions
people try first are also taught in dialog form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from danlu.world.facts import RELATIONS, Fact, build_facts

RESERVED_SHARE = 0.2
SHOWCASE = frozenset(
    {
        "capital:china",
        "highest_mountain:china",
        "longest_river:china",
        "currency:china",
        "capital:japan",
        "capital:usa",
        "capital:uk",
        "capital:france",
        "capital:australia",
        "highest_mountain:japan",
        "planet_order:earth",
        "largest_moon:earth",
        "element_symbol:hydrogen",
        "unit_conversion:km-m",
    }
)


def subject_id(fact: Fact) -> str:
    return f"{fact.kind}:{fact.subject_en}"


def choose_reserved(facts: list[Fact], seed: int, share: float = RESERVED_SHARE) -> frozenset[str]:
    """About `share` of each relation's facts (at least one each), never a showcase fact."""
    rng = random.Random(f"{seed}:reserved")
    out: set[str] = set()
    for rel in RELATIONS:
        pool = [f.id for f in facts if f.relation == rel and f.id not in SHOWCASE]
        k = max(1, round(share * len(pool))) if pool else 0
        out.update(rng.sample(pool, k))
    return frozenset(out)


@dataclass
class World:
    """Facts plus lookups; `open()` is the view post-training data may use (reserved facts removed)."""

    facts: list[Fact]
    seed: int
    reserved: frozenset[str] = frozenset()
    by_subject: dict[str, list[Fact]] = field(init=False)
    by_relation: dict[str, list[Fact]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_subject, self.by_relation = {}, {}
        for f in self.facts:
            self.by_subject.setdefault(subject_id(f), []).append(f)
            self.by_relation.setdefault(f.relation, []).append(f)

    @classmethod
    def create(cls, seed: int) -> World:
        facts = build_facts()
        return cls(facts, seed, choose_reserved(facts, seed))

    def open(self) -> World:
        return World([f for f in self.facts if f.id not in self.reserved], self.seed, frozenset())

    @property
    def subjects(self) -> list[str]:
        return list(self.by_subject)

    def subjects_of(self, kind: str) -> list[str]:
        return [s for s, fs in self.by_subject.items() if fs[0].kind == kind]

    def fact(self, subject: str, relation: str) -> Fact | None:
        return next((f for f in self.by_subject.get(subject, []) if f.relation == relation), None)
