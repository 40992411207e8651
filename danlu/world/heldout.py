"""HELD-OUT evaluation sets: phrasings and question/fact pairings that no training split contains.

- facts_base / facts_chat ask every fact (reserved ones too) with held-out templates; `seen_in_sft` says whether
  the fact was ever asked in an SFT dialog, so the report can separate transfer from pretraining.
- arithmetic asks held-out two-digit sums/differences (never in any training text) and times-table problems,
  always with held-out phrasings.
- translation, tools, preference, rl and summary use held-out instructions, sentences and items.
Rows are shuffled so that any prefix (evals often take the first N) mixes languages and relations.
"""

from __future__ import annotations

import random
from typing import Any

from danlu.tools import run_tool
from danlu.world.dialogs import WEEKDAYS_ZH, DialogWriter, random_day, user
from danlu.world.documents import DocWriter
from danlu.world.facts import Fact
from danlu.world.index import World
from danlu.world.numbers import (
    Problem,
    big_expression,
    heldout_small,
    phrase_problem,
    pretty_expression,
    training_small,
)
from danlu.world.templates import TEXTS, fill, heldout_sentence

LANGS = ("zh", "en")
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
SUMMARIZE_HELDOUT = {
    "zh": "请用一句话总结下面这篇报道：\n\n{x}",
    "en": "In one sentence, summarize the following news article:\n\n{x}",
}
ARITH_HELDOUT = {
    "zh": "{a}{op}{b}的结果是多少？",
    "en": "What is the result of {a} {op} {b}?",
}
ARITH_BASE_HELDOUT = {"zh": "{a}{op}{b}的计算结果是", "en": "The result of {a} {op} {b} is"}
CALC_HELDOUT = {
    "zh": ("请算一下{p}的结果。", "请帮我计算{p}的结果。"),
    "en": (
        "Please compute the result of {p} for me.",
        "What is the result of {p}? Please use the calculator.",
    ),
}
DATE_HELDOUT = {
    ("zh", "date"): "请问今天的日期是几月几号？",
    ("zh", "weekday"): "你知道今天是星期几吗？",
    ("en", "date"): "Please give me the date of today.",
    ("en", "weekday"): "Do you know which day of the week it is today?",
}
EVAL_SIZES = {
    "arithmetic": 400,  # RL's before/after: 200 rows left ±3 points of noise
    "translation": 200,
    "tools_calculator": 100,
    "tools_date": 60,
    "preference": 200,
    "rl": 200,
    "summary": 100,
}


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
    }


class EvalWriter:
    def __init__(
        self, world: World, rng: random.Random, seed: int, sizes: dict[str, int] | None = None
    ) -> None:
        self.world = world  # the full world: evals ask reserved facts too
        self.r = rng
        self.seed = seed
        self.sizes = {**EVAL_SIZES, **(sizes or {})}

    def _shuffled(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.r.shuffle(rows)
        return rows

    def facts_base(self) -> list[dict[str, Any]]:
        rows = []
        for f in self.world.facts:
            for lang in LANGS:
                prompt = fill(self.r.choice(TEXTS[f.relation].heldout_prompts(lang)), f, lang)
                rows.append(
                    {
                        "prompt": prompt,
                        "answer": f.object(lang),
                        "answers": f.answers(lang),
                        "lang": lang,
                        "relation": f.relation,
                        "fact_id": f.id,
                    }
                )
        return self._shuffled(rows)

    def facts_chat(self) -> list[dict[str, Any]]:
        rows = []
        for f in self.world.facts:
            for lang in LANGS:
                rows.append(
                    {
                        "messages": [user(heldout_question(f, lang, self.r))],
                        "answer": f.object(lang),
                        "answers": f.answers(lang),
                        "lang": lang,
                        "relation": f.relation,
                        "fact_id": f.id,
                        "seen_in_sft": f.id not in self.world.reserved,
                    }
                )
        return self._shuffled(rows)

    def arithmetic(self) -> list[dict[str, Any]]:
        n = self.sizes["arithmetic"]
        rows = []
        for i in range(n):
            lang = LANGS[i % 2]
            if i < n * 0.7:
                p = heldout_small(self.r, self.seed)
            else:
                p = training_small(self.r, self.seed, self.r.choice("×÷"))
            rows.append(arithmetic_item(p, lang))
        return self._shuffled(rows)

    def translation(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(self.sizes["translation"]):
            src, tgt = (("zh", "en"), ("en", "zh"))[i % 2]
            lang = LANGS[(i // 2) % 2]
            f = self.r.choice(self.world.facts)
            zh, en = self.r.choice(TEXTS[f.relation].heldout)
            text = {"zh": heldout_sentence(zh, f, "zh"), "en": heldout_sentence(en, f, "en")}
            rows.append(
                {
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
            )
        return self._shuffled(rows)

    def tools(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(self.sizes["tools_calculator"]):
            lang = LANGS[i % 2]
            expr = big_expression(self.r)
            result = run_tool("calculator", {"expression": expr})
            ask = self.r.choice(CALC_HELDOUT[lang]).format(p=pretty_expression(expr))
            rows.append(
                {
                    "messages": [user(ask)],
                    "tool": "calculator",
                    "arguments": {"expression": expr},
                    "answer": result,
                    "answers": [result],
                    "lang": lang,
                }
            )
        for i in range(self.sizes["tools_date"]):
            lang, ask = LANGS[i % 2], ("date", "weekday")[(i // 2) % 2]
            day = random_day(self.r)
            if ask == "date":
                answers = [day.isoformat()]
            else:
                answers = [WEEKDAYS_ZH[day.weekday()]] if lang == "zh" else [day.strftime("%A")]
            rows.append(
                {
                    "messages": [user(DATE_HELDOUT[(lang, ask)])],
                    "tool": "get_date",
                    "arguments": {},
                    "today": day.isoformat(),
                    "answer": answers[0],
                    "answers": answers,
                    "lang": lang,
                }
            )
        return self._shuffled(rows)

    def preference(self) -> list[dict[str, Any]]:
        writer = DialogWriter(self.world, self.r, self.seed)
        kinds = ("fact_wrong", "arithmetic", "arithmetic_misread", "evasive", "repetitive", "wrong_language")
        rows = []
        for i in range(self.sizes["preference"]):
            lang, kind = LANGS[i % 2], kinds[(i // 2) % len(kinds)]
            problem = None
            if kind.startswith("arithmetic"):
                p = heldout_small(self.r, self.seed)
                problem = (p, arithmetic_question(p, lang))
            ask = lambda f, lg: heldout_question(f, lg, self.r)  # noqa: E731
            rows.append(writer.preference(kind, lang, ask=ask, problem_ask=problem))
        return self._shuffled(rows)

    def rl(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for i in range(self.sizes["rl"]):
            lang = LANGS[i % 2]
            if (i // 2) % 2 == 0:
                p = heldout_small(self.r, self.seed)
                q = arithmetic_question(p, lang)
                rows.append(
                    {
                        "messages": [user(q)],
                        "answer": str(p.result),
                        "answers": [str(p.result)],
                        "kind": "arithmetic",
                        "lang": lang,
                    }
                )
            else:
                f = self.r.choice(self.world.facts)
                rows.append(
                    {
                        "messages": [user(heldout_question(f, lang, self.r))],
                        "answer": f.object(lang),
                        "answers": f.answers(lang),
                        "kind": "fact",
                        "lang": lang,
                        "relation": f.relation,
                        "fact_id": f.id,
                    }
                )
        return self._shuffled(rows)

    def summary(self) -> list[dict[str, Any]]:
        docs = DocWriter(self.world, self.r)
        rows = []
        for i in range(self.sizes["summary"]):
            lang = LANGS[i % 2]
            cap_fact = self.r.choice(docs.capitals)
            text, summary = docs.news_story(lang, long=False, capital=cap_fact)
            rows.append(
                {
                    "messages": [user(SUMMARIZE_HELDOUT[lang].format(x=text))],
                    "reference": summary,
                    "answer": cap_fact.object(lang),
                    "answers": cap_fact.answers(lang),
                    "lang": lang,
                }
            )
        return self._shuffled(rows)

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
