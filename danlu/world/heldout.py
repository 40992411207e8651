"""HELD-OUT evaluation sets: phrasings and question/fact pairings that no training split contains.

- facts_base / facts_chat ask every fact (reserved ones too) with held-out templates; `seen_in_sft` says whether
  the fact was ever asked in an SFT dialog, so the report can separate transfer from pretraining.
- arithmetic asks held-out two-digit sums/differences (`subset` "unseen": never in any training text) and
  times-table problems (`subset` "times_table": the table training drills), always with held-out phrasings.
- translation, tools, preference, rl and summary use held-out instructions, sentences and items.
Every row has a `split`: "dev" (what anyone tunes on) or "test" (reported, never tuned on). No sentence of a row
(`danlu.world.sentences`) is in training text, and no dev sentence is a test sentence, across all sets.
Rows are shuffled so that any prefix (evals often take the first N of a split) mixes splits, languages and
relations.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from danlu import DanluError
from danlu.tools import run_tool
from danlu.world import filler
from danlu.world.dialogs import WEEKDAYS_ZH, DialogWriter, random_day, user
from danlu.world.facts import Fact
from danlu.world.filler import side
from danlu.world.index import World, subject_id
from danlu.world.numbers import Problem, big_expression, is_heldout, phrase_problem, pretty_expression
from danlu.world.sentences import row_inputs, sentence_keys
from danlu.world.templates import TEXTS, cap, fill, heldout_sentence

LANGS = ("zh", "en")
SPLITS = ("dev", "test")
TRANSLATE_HELDOUT = {
    ("zh", "en"): {
        "zh": "请把下面的中文句子翻译成英文：{x}",
        "en": "Please translate the following Chinese sentence into English: {x}",
    },
    ("en", "zh"): {
        "zh": "请把下面的英文句子翻译成中文：{x}",
        "en": "Please translate the following English sentence into Chinese: {x}",
    },
}
# Fixed instructions differ between the splits (a dev row and a test row may share no sentence).
SUMMARIZE_HELDOUT = {
    "dev": {
        "zh": "请用一句话总结下面这篇报道：\n\n{x}",
        "en": "In one sentence, summarize the following news article:\n\n{x}",
    },
    "test": {
        "zh": "请把下面这篇报道用一句话总结一下：\n\n{x}",
        "en": "Please summarize the following report in one sentence:\n\n{x}",
    },
}
ARITH_HELDOUT = {
    "zh": "{a}{op}{b}的结果是多少？",
    "en": "What is the result of {a} {op} {b}?",
}
ARITH_BASE_HELDOUT = {"zh": "{a}{op}{b}的计算结果是", "en": "The result of {a} {op} {b} is"}
# In English each split has one request that names the tool and one that does not (Chinese requests never name
# it), so dev and test are equally hard.
CALC_HELDOUT = {
    "dev": {
        "zh": ("请算一下{p}的结果。",),
        "en": ("Please compute the result of {p} for me.", "Please use the calculator to work out {p}."),
    },
    "test": {
        "zh": ("请帮我计算{p}的结果。",),
        "en": ("Please work out the result of {p}.", "What is the result of {p}? Please use the calculator."),
    },
}
DATE_HELDOUT = {
    "dev": {
        ("zh", "date"): "请问今天的日期是几月几号？",
        ("zh", "weekday"): "你知道今天是星期几吗？",
        ("en", "date"): "Please give me the date of today.",
        ("en", "weekday"): "Do you know which day of the week it is today?",
    },
    "test": {
        ("zh", "date"): "你知道今天是几月几号吗？",
        ("zh", "weekday"): "请告诉我今天是星期几。",
        ("en", "date"): "Can you tell me what the date is today?",
        ("en", "weekday"): "Please tell me which day of the week it is.",
    },
}
# A held-out news story for the summary eval: the same facts a training story has (date, event, capital, number of
# people, days), in sentences no training story uses; each names the city, so a story belongs to its split.
STORY_HELDOUT = {
    "zh": ("{date}，{country}首都{city}举办的{event}开幕了。", "据主办方介绍，{city}的本次活动共吸引了约{n}名参与者。",
           "{city}的本次活动将持续{span}。"),
    "en": ("{Event} opened in {city}, the capital of {country}, on {date}.",
           "According to the organisers, about {n} people took part in the event in {city}.",
           "The event in {city} will run for {span}."),
}  # fmt: skip
EVAL_SIZES = {  # rows per split (facts_base and facts_chat: every fact of the split's subjects, in both languages)
    "arithmetic": 400,  # RL's before/after: 200 rows left ±3 points of noise
    "translation": 200,
    "tools_calculator": 100,
    "tools_date": 60,
    "preference": 200,
    "rl": 200,
    "summary": 100,
}
UNSEEN_SHARE = 0.7  # of the arithmetic rows: held-out sums and differences; the rest from the times table
MAX_REFUSED = 1000  # rows a set may refuse (a sentence of the other split or of training) before giving up


def heldout_question(fact: Fact, lang: str, rng: random.Random) -> str:
    return fill(rng.choice(TEXTS[fact.relation].heldout_questions(lang)), fact, lang)


def arithmetic_question(p: Problem, lang: str, templates: dict[str, str] = ARITH_HELDOUT) -> str:
    return phrase_problem(templates[lang], p, lang)


def arithmetic_item(p: Problem, lang: str) -> dict[str, Any]:
    return {
        "messages": [user(arithmetic_question(p, lang))],
        "prompt": arithmetic_question(p, lang, ARITH_BASE_HELDOUT),
        "answer": str(p.result),
        "answers": [str(p.result)],
        "lang": lang,
        "op": p.op,
        "a": p.a,
        "b": p.b,
        "pair_in_training": p.op in "×÷",
        "subset": "times_table" if p.op in "×÷" else "unseen",
    }


def subject_splits(world: World, seed: int) -> dict[str, str]:
    """Subject ("country:Japan") → "dev" or "test": each kind's subjects in a seeded order, dealt alternately.

    Why by subject: every eval sentence about a fact names its subject (and usually its object), so when all facts
    of a subject sit in one split, no dev sentence can be a test sentence, whichever set or phrasing asks it."""
    rng = random.Random(f"{seed}:eval_split")
    out: dict[str, str] = {}
    dealt = 0
    for kind in sorted({fs[0].kind for fs in world.by_subject.values()}):
        subjects = sorted(world.subjects_of(kind))
        rng.shuffle(subjects)
        for s in subjects:
            out[s] = SPLITS[dealt % 2]
            dealt += 1
    return out


def problem_split(p: Problem, seed: int) -> str:
    """The split of a small problem, by a hash of the seed and the operands; a + b and b + a (a × b and b × a) go
    together, since a model that learned one has learned the other."""
    a, b = (min(p.a, p.b), max(p.a, p.b)) if p.op in "+×" else (p.a, p.b)
    # sha256, not crc32: crc32 is linear, so its low bits would follow `is_heldout`'s and skew the halves
    return SPLITS[hashlib.sha256(f"{seed}:split:{a}{p.op}{b}".encode()).digest()[0] % 2]


def heldout_problems(seed: int) -> list[Problem]:
    """Every held-out two-digit sum and difference (`is_heldout`), in a fixed order."""
    out = [Problem(a, op, b) for op in "+-" for a in range(10, 100) for b in range(10, 100)]
    return [p for p in out if p.result >= 0 and is_heldout(p, seed)]


def table_problems() -> list[Problem]:
    """Every × and ÷ problem of the 12×12 table that the training text drills (`random_small`'s range)."""
    times = [Problem(a, "×", b) for a in range(1, 13) for b in range(1, 13)]
    return times + [Problem(b * q, "÷", b) for b in range(1, 13) for q in range(13)]


def heldout_story(cap_fact: Fact, other: Fact, lang: str, rng: random.Random) -> tuple[str, str]:
    """A news story in held-out sentences (`STORY_HELDOUT`, and a held-out statement of `other`, a fact about the
    same country) and its one-sentence summary, written as training summaries are."""
    country, city = cap_fact.subject(lang), cap_fact.object(lang)
    event = side(rng.choice(filler.EVENTS), lang)
    date = filler.date_text(filler.random_date(rng), lang)
    n = rng.choice((2, 3, 5, 8, 12, 15, 20, 30, 50, 120)) * 100
    days = rng.randint(2, 7)
    span = f"{days}天" if lang == "zh" else f"{days} days"
    slots = {"date": date, "country": country, "city": city, "event": event, "Event": cap(event), "n": n,
             "span": span}  # fmt: skip
    lead, people, close = (t.format(**slots) for t in STORY_HELDOUT[lang])
    background = heldout_sentence(side(rng.choice(TEXTS[other.relation].heldout), lang), other, lang)
    joiner = "" if lang == "zh" else " "
    text = "\n\n".join([lead + joiner + people, background, close])
    if lang == "zh":
        summary = f"{date}，{event}在{country}首都{city}开幕，约{n}人参加，活动将持续{days}天。"
    else:
        summary = (
            f"On {date}, {event} opened in {city}, the capital of {country}, with about {n} "
            f"participants; it will run for {days} days."
        )
    return text, summary


class EvalWriter:
    """Writes the held-out sets, each in a dev and a test split that share no sentence (`danlu.world.sentences`).

    Facts go to a split by subject (`subject_splits`), small problems by operands (`problem_split`), and fixed
    instructions are worded differently per split, so the splits are disjoint by construction; every row is still
    checked on admission against the other split's sentences and against `seen` (the training text's sentence
    keys, when given) and redrawn if it shares one (`refused` counts those; 0 is expected). `seen_problems` (the
    table problems training writes, `written_table_problems`) limits the times-table rows to pairs seen in
    training; without it, the whole table."""

    def __init__(
        self,
        world: World,
        rng: random.Random,
        seed: int,
        sizes: dict[str, int] | None = None,
        seen: set[str] | None = None,
        seen_problems: set[Problem] | None = None,
    ) -> None:
        self.world = world  # the full world: evals ask reserved facts too
        self.r = rng
        self.seed = seed
        self.sizes = {**EVAL_SIZES, **(sizes or {})}
        self.seen = seen or set()
        self.split_of = subject_splits(world, seed)
        self.pools = {
            split: World(
                [f for f in world.facts if self.split_of[subject_id(f)] == split],
                seed,
                frozenset(world.reserved),
            )
            for split in SPLITS
        }
        self.keys: dict[str, set[str]] = {split: set() for split in SPLITS}
        self.refused: Counter[str] = Counter()
        # problems in a seeded order of their own, so that which table pairs training wrote (it varies with the
        # scale) changes only the times-table rows, never the random stream of the other rows
        order = random.Random(f"{seed}:eval_problems")
        unseen = order.sample(heldout_problems(seed), len(heldout_problems(seed)))
        table = [p for p in order.sample(table_problems(), len(table_problems()))
                 if seen_problems is None or p in seen_problems]  # fmt: skip
        self.problems = {split: [p for p in unseen if problem_split(p, seed) == split] for split in SPLITS}
        self.table = {split: [p for p in table if problem_split(p, seed) == split] for split in SPLITS}

    def _admit(self, row: dict[str, Any], split: str) -> bool:
        """Takes `row` into `split` unless one of its sentences is the other split's or the training text's."""
        keys = sentence_keys(row_inputs(row))
        other = self.keys[SPLITS[1 - SPLITS.index(split)]]
        if keys & other or keys & self.seen:
            return False
        self.keys[split] |= keys
        row["split"] = split
        return True

    def _rows(self, name: str, n: int, make: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
        """`n` rows per split from `make(split, i)`, redrawing refused ones, all shuffled together (so that any
        prefix mixes the splits, languages and relations)."""
        rows = []
        for split in SPLITS:
            done = 0
            while done < n:
                row = make(split, done)
                if self._admit(row, split):
                    rows.append(row)
                    done += 1
                    continue
                self.refused[name] += 1
                if self.refused[name] > MAX_REFUSED:
                    raise DanluError(f"world: eval/{name}: {MAX_REFUSED} rows refused for sharing a sentence "
                                     f"with training text or the other split ({split} split)")  # fmt: skip
        return self._shuffled(rows)

    def _shuffled(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.r.shuffle(rows)
        return rows

    def _every_fact(self, name: str, row: Callable[[Fact, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per fact and language, each in its subject's split; a refused row is phrased again."""
        rows = []
        for split in SPLITS:
            for f in self.pools[split].facts:
                for lang in LANGS:
                    while not self._admit(r := row(f, lang, split), split):
                        self.refused[name] += 1
                        if self.refused[name] > MAX_REFUSED:
                            raise DanluError(f"world: eval/{name}: {f.id} ({lang}) shares a sentence with "
                                             "training text or the other split in every phrasing")  # fmt: skip
                    rows.append(r)
        return self._shuffled(rows)

    def facts_base(self) -> list[dict[str, Any]]:
        def row(f: Fact, lang: str, split: str) -> dict[str, Any]:
            return {
                "prompt": fill(self.r.choice(TEXTS[f.relation].heldout_prompts(lang)), f, lang),
                "answer": f.object(lang),
                "answers": f.answers(lang),
                "lang": lang,
                "relation": f.relation,
                "fact_id": f.id,
            }

        return self._every_fact("facts_base", row)

    def facts_chat(self) -> list[dict[str, Any]]:
        def row(f: Fact, lang: str, split: str) -> dict[str, Any]:
            return {
                "messages": [user(heldout_question(f, lang, self.r))],
                "answer": f.object(lang),
                "answers": f.answers(lang),
                "lang": lang,
                "relation": f.relation,
                "fact_id": f.id,
                "seen_in_sft": f.id not in self.world.reserved,
            }

        return self._every_fact("facts_chat", row)

    def arithmetic(self) -> list[dict[str, Any]]:
        """Per split: UNSEEN_SHARE held-out sums/differences (`subset` "unseen": never in any training text), the
        rest times-table problems (`subset` "times_table": the table training drills), each problem once while
        the split has enough, in alternating languages."""
        n = self.sizes["arithmetic"]
        n_unseen = round(n * UNSEEN_SHARE)

        def make(split: str, i: int) -> dict[str, Any]:
            unseen, table = self.problems[split], self.table[split]
            p = unseen[i % len(unseen)] if i < n_unseen else table[(i - n_unseen) % len(table)]
            return arithmetic_item(p, LANGS[i % 2])

        return self._rows("arithmetic", n, make)

    def translation(self) -> list[dict[str, Any]]:
        def make(split: str, i: int) -> dict[str, Any]:
            src, tgt = (("zh", "en"), ("en", "zh"))[i % 2]
            lang = LANGS[(i // 2) % 2]
            f = self.r.choice(self.pools[split].facts)
            zh, en = self.r.choice(TEXTS[f.relation].heldout)
            text = {"zh": heldout_sentence(zh, f, "zh"), "en": heldout_sentence(en, f, "en")}
            return {
                "messages": [user(TRANSLATE_HELDOUT[(src, tgt)][lang].format(x=text[src]))],
                "source": text[src],
                "reference": text[tgt],
                "answer": f.object(tgt),
                "answers": f.answers(tgt),
                "direction": f"{src}-{tgt}",
                "lang": lang,
                "relation": f.relation,
                "fact_id": f.id,
            }

        return self._rows("translation", self.sizes["translation"], make)

    def tools(self) -> list[dict[str, Any]]:
        n_calc = self.sizes["tools_calculator"]

        def make(split: str, i: int) -> dict[str, Any]:
            if i < n_calc:
                lang = LANGS[i % 2]
                expr = big_expression(self.r)
                result = run_tool("calculator", {"expression": expr})
                ask = self.r.choice(CALC_HELDOUT[split][lang]).format(p=pretty_expression(expr))
                return {
                    "messages": [user(ask)],
                    "tool": "calculator",
                    "arguments": {"expression": expr},
                    "answer": result,
                    "answers": [result],
                    "lang": lang,
                }
            lang, ask = LANGS[i % 2], ("date", "weekday")[(i // 2) % 2]
            day = random_day(self.r)
            if ask == "date":
                answers = [day.isoformat()]
            else:
                answers = [WEEKDAYS_ZH[day.weekday()]] if lang == "zh" else [day.strftime("%A")]
            return {
                "messages": [user(DATE_HELDOUT[split][(lang, ask)])],
                "tool": "get_date",
                "arguments": {},
                "today": day.isoformat(),
                "answer": answers[0],
                "answers": answers,
                "lang": lang,
            }

        return self._rows("tools", n_calc + self.sizes["tools_date"], make)

    def _asking(self, split: str) -> World:
        """The split's facts to ask about, with the whole world's relations to draw a wrong object from (a split
        may hold no other object of a relation: say, two planets of one type). Only prompts must stay in the
        split; a rejected answer is not a prompt."""
        world = World(self.pools[split].facts, self.seed, self.pools[split].reserved)
        world.by_relation = self.world.by_relation
        return world

    def preference(self) -> list[dict[str, Any]]:
        writers = {split: DialogWriter(self._asking(split), self.r, self.seed) for split in SPLITS}
        kinds = ("fact_wrong", "arithmetic", "arithmetic_misread", "evasive", "repetitive", "wrong_language")
        ask = lambda f, lg: heldout_question(f, lg, self.r)  # noqa: E731

        def make(split: str, i: int) -> dict[str, Any]:
            lang, kind = LANGS[i % 2], kinds[(i // 2) % len(kinds)]
            problem = None
            if kind.startswith("arithmetic"):
                p = self.r.choice(self.problems[split])
                problem = (p, arithmetic_question(p, lang))
            return writers[split].preference(kind, lang, ask=ask, problem_ask=problem)

        return self._rows("preference", self.sizes["preference"], make)

    def rl(self) -> list[dict[str, Any]]:
        def make(split: str, i: int) -> dict[str, Any]:
            lang = LANGS[i % 2]
            if (i // 2) % 2 == 0:
                p = self.r.choice(self.problems[split])
                return {
                    "messages": [user(arithmetic_question(p, lang))],
                    "answer": str(p.result),
                    "answers": [str(p.result)],
                    "kind": "arithmetic",
                    "lang": lang,
                }
            f = self.r.choice(self.pools[split].facts)
            return {
                "messages": [user(heldout_question(f, lang, self.r))],
                "answer": f.object(lang),
                "answers": f.answers(lang),
                "kind": "fact",
                "lang": lang,
                "relation": f.relation,
                "fact_id": f.id,
            }

        return self._rows("rl", self.sizes["rl"], make)

    def summary(self) -> list[dict[str, Any]]:
        def make(split: str, i: int) -> dict[str, Any]:
            lang = LANGS[i % 2]
            pool = self.pools[split]
            cap_fact = self.r.choice(pool.by_relation["capital"])
            others = [f for f in pool.by_subject[subject_id(cap_fact)] if f.relation != "capital"]
            text, summary = heldout_story(cap_fact, self.r.choice(others or [cap_fact]), lang, self.r)
            return {
                "messages": [user(SUMMARIZE_HELDOUT[split][lang].format(x=text))],
                "reference": summary,
                "answer": cap_fact.object(lang),
                "answers": cap_fact.answers(lang),
                "lang": lang,
            }

        return self._rows("summary", self.sizes["summary"], make)

    def all(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "facts_base": self.facts_base(),
            "facts_chat": self.facts_chat(),
            "arithmetic": self.arithmetic(),
            "translation": self.translation(),
            "tools": self.tools(),
            "preference": self.preference(),
            "rl": self.rl(),
            "summary": self.summary(),
        }
