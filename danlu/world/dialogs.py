"""Post-training data: SFT dialogs (OpenAI `messages`), preference pairs and RL prompts with checkable answers.

All of it is written from the OPEN world (reserved facts removed) with training phrasings only. Answers are short
(the default model has a context of a few hundred tokens). Tool dialogs use the OpenAI shape and the results of
`danlu.tools.run_tool`, so what the model learns to copy is exactly what the runtime will return.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
from typing import Any

from danlu.tools import run_tool
from danlu.world import filler
from danlu.world.documents import DocWriter
from danlu.world.facts import Fact
from danlu.world.index import SHOWCASE, World, subject_id
from danlu.world.numbers import (
    OP_EN,
    OP_ZH,
    Problem,
    big_expression,
    misread,
    phrase_problem,
    pretty_expression,
    training_column_problem,
    training_small,
    worked_solution,
    worked_steps,
    zh_number,
)
from danlu.world.templates import SAME_RELATION_FOLLOWUPS, TEXTS, cap, end, fill, question, statement

Message = dict[str, Any]
SHOWCASE_WEIGHT = 4
SYSTEM_HELPFUL = {"zh": "你是一个乐于助人的助手。", "en": "You are a helpful assistant."}
WEEKDAYS_ZH = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")

# Kind → share of the SFT dialogs.
SFT_MIX = {
    "fact": 0.30,
    "fact_multi": 0.12,
    "fact_context": 0.12,
    "translation": 0.09,
    "summary": 0.04,
    "plan": 0.04,
    "arithmetic": 0.24,  # worked column arithmetic takes practice
    "calculator": 0.11,
    "date_tool": 0.05,
    "date_system": 0.04,
    "chitchat": 0.03,
}
PREFERENCE_MIX = {
    "fact_wrong": 0.35,
    "arithmetic": 0.12,  # right columns, a conclusion that does not follow
    "arithmetic_misread": 0.18,  # a misread operand worked out: the SFT model's own commonest mistake
    "evasive": 0.12,
    "repetitive": 0.08,
    "wrong_language": 0.15,
}

TRANSLATE = {
    ("zh", "en"): {
        "zh": ("把这句话翻译成英文：{x}", "请将下面的句子翻译成英语：\n{x}", "翻译成英文：{x}"),
        "en": ("Translate into English: {x}", "Translate this sentence to English:\n{x}"),
    },
    ("en", "zh"): {
        "zh": ("把这句话翻译成中文：{x}", "请将下面的句子翻译成汉语：\n{x}", "翻译成中文：{x}"),
        "en": ("Translate into Chinese: {x}", "Translate this sentence to Chinese:\n{x}"),
    },
}
SUMMARIZE = {
    "zh": ("请用一句话概括下面这篇新闻：\n\n{x}", "总结一下这篇报道：\n\n{x}"),
    "en": (
        "Summarize this news article in one sentence:\n\n{x}",
        "Give a one-sentence summary of the following report:\n\n{x}",
    ),
}
PLAN_ASK = {
    "zh": (
        "我想去{s}旅游，能帮我做一个三步计划吗？",
        "请帮我制定一个去{s}首都游玩的三步计划。",
        "给我一个去{s}旅行的简单计划，三步就好。",
    ),
    "en": (
        "I want to visit {s}. Can you give me a 3-step plan?",
        "Please make a three-step plan for a trip to the capital of {s}.",
        "Give me a simple three-step travel plan for {s}.",
    ),
}
DATE_ASK = {
    ("zh", "date"): (
        "今天几号？",
        "今天是几月几号？",
        "今天的日期是什么？",
        "今天是哪一天？",
        "请问今天几月几日？",
        "我想知道今天的日期。",
        "今天是哪年哪月哪日？",
    ),
    ("zh", "weekday"): ("今天星期几？", "今天是星期几？", "请问今天是周几？", "我想知道今天是星期几。"),
    ("en", "date"): (
        "What's the date today?",
        "What is today's date?",
        "What date is it today?",
        "Can you give me today's date?",
        "I want to know the date today.",
        "Which date is it today?",
    ),
    ("en", "weekday"): (
        "What day of the week is it?",
        "Which day of the week is today?",
        "What day is it today?",
        "Is today Monday or some other day?",
        "I want to know what day of the week it is.",
    ),
}
CALC_ASK = {
    "zh": (
        "{p}等于多少？",
        "帮我算一下{p}。",
        "{e}是多少？",
        "计算{p}",
        "请计算{p}。",
        "{p}得多少？",
        "用计算器算{p}。",
        "我想知道{p}等于多少。",
    ),
    "en": (
        "What is {p}?",
        "Calculate {p}.",
        "What's {e}?",
        "Can you compute {p}?",
        "Please work out {p}.",
        "How much is {p}?",
        "Use the calculator for {p}.",
        "I want to know what {p} equals.",
    ),
}
EVASIVE = {
    "zh": ("这个问题我不太清楚。", "抱歉，我无法回答这个问题。", "你可以自己查一下。", "这个不好说。"),
    "en": ("I'm not sure.", "Sorry, I can't answer that.", "You could look it up yourself.", "Hard to say."),
}
CHITCHAT = {
    "zh": (
        ("你好", "你好！有什么可以帮你的吗？"),
        ("你好！", "你好！想问点什么？"),
        ("你是谁？", "我是一个由丹炉训练的小型助手，可以回答地理、天文、化学和算术方面的问题。"),
        ("谢谢", "不客气！"),
        ("谢谢你的帮助！", "不客气，很高兴能帮到你。"),
        ("再见", "再见，祝你愉快！"),
        (
            "你能做什么？",
            "我可以回答关于国家、行星、化学元素和单位换算的问题，做简单的算术，还会使用计算器和日期工具。",
        ),
        ("早上好", "早上好！今天想问点什么？"),
    ),
    "en": (
        ("Hello", "Hello! How can I help you?"),
        ("Hi!", "Hi! What would you like to know?"),
        (
            "Who are you?",
            "I am a small assistant trained with danlu. I can answer questions about geography, "
            "planets, chemistry and arithmetic.",
        ),
        ("Thanks", "You're welcome!"),
        ("Thank you for your help!", "You're welcome, glad I could help."),
        ("Bye", "Goodbye, have a nice day!"),
        (
            "What can you do?",
            "I can answer questions about countries, planets, chemical elements and units, do "
            "simple arithmetic, and use a calculator and a date tool.",
        ),
        ("Good morning", "Good morning! What would you like to ask?"),
    ),
}


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def tool_call(name: str, arguments: dict[str, Any]) -> Message:
    call = {
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def tool_result(name: str, content: str) -> Message:
    return {"role": "tool", "name": name, "content": content}


def ascii_punct(text: str, rng: random.Random, share: float = 0.3) -> str:
    """Chinese users type both ？ and ?: a share of user turns gets the ASCII forms."""
    return text.replace("？", "?").replace("，", ",") if rng.random() < share else text


def answer_sentence(fact: Fact, lang: str, rng: random.Random) -> str:
    """A short assistant answer: usually a canonical statement, sometimes just the object."""
    if rng.random() < 0.2:
        return end(cap(fact.object(lang)), lang)
    pairs = TEXTS[fact.relation].pairs
    return fill(rng.choice(pairs)[0 if lang == "zh" else 1], fact, lang)


def date_answer(day: dt.date, lang: str, ask: str, rng: random.Random) -> str:
    iso, wd_zh, wd_en = day.isoformat(), WEEKDAYS_ZH[day.weekday()], day.strftime("%A")
    if ask == "weekday":
        return f"今天是{wd_zh}。" if lang == "zh" else f"Today is {wd_en}."
    if lang == "zh":
        return rng.choice((f"今天是{iso}，{wd_zh}。", f"今天是{iso}。", f"今天的日期是{iso}，{wd_zh}。"))
    return rng.choice((f"Today is {wd_en}, {iso}.", f"Today's date is {iso}.", f"It is {iso} ({wd_en})."))


def date_system_prompt(day: dt.date, lang: str, rng: random.Random) -> str:
    iso, wd_zh, wd_en = day.isoformat(), WEEKDAYS_ZH[day.weekday()], day.strftime("%A")
    if lang == "zh":
        return rng.choice(
            (
                f"今天是{iso} {wd_zh}。",
                f"你是一个乐于助人的助手。今天是{iso} {wd_zh}。",
                f"当前日期：{iso}（{wd_zh}）",
            )
        )
    return rng.choice(
        (
            f"Today is {iso} ({wd_en}).",
            f"You are a helpful assistant. Today is {iso} ({wd_en}).",
            f"Current date: {iso} ({wd_en})",
        )
    )


def random_day(rng: random.Random) -> dt.date:
    return filler.random_date(rng, 1990, 2060)


def wrong_fact(fact: Fact, world: World, rng: random.Random) -> Fact:
    """The same statement with a wrong object: another subject's object, or a wrong count for units."""
    if fact.relation == "unit_conversion":
        n = int(fact.number)
        wrong = rng.choice([m for m in (n * 10, n // 10, n + rng.randint(1, 9), n * 100) if m > 0 and m != n])
        return dataclasses.replace(
            fact, number=str(wrong), object_zh=f"{wrong}{fact.unit_zh}", object_en=f"{wrong} {fact.unit_en}"
        )
    accepted = set(fact.answers("zh")) | set(fact.answers("en"))
    pool = [
        f
        for f in world.by_relation[fact.relation]
        if f.object_zh not in accepted and f.object_en not in accepted
    ]
    other = rng.choice(pool)
    return dataclasses.replace(fact, object_zh=other.object_zh, object_en=other.object_en)


def problem_question(p: Problem, lang: str, rng: random.Random) -> str:
    if lang == "zh":
        forms = [
            f"{p.a}{OP_ZH[p.op]}{p.b}等于多少？",
            f"计算{p.expression(spaced=False)}",
            f"{p.expression()} = ？",
            f"{p.a}{OP_ZH[p.op]}{p.b}是多少？",
            f"请问{p.a}{OP_ZH[p.op]}{p.b}得几？",
            f"我想知道{p.expression(spaced=False)}等于几。",
        ]
        if rng.random() < 0.15:
            return f"{zh_number(p.a)}{OP_ZH[p.op]}{zh_number(p.b)}等于几？"
        return ascii_punct(rng.choice(forms), rng)
    return rng.choice(
        (
            f"What is {p.a} {OP_EN[p.op]} {p.b}?",
            f"What's {p.expression()}?",
            f"Compute {p.expression()}.",
            f"{p.expression()} = ?",
            f"How much is {p.a} {OP_EN[p.op]} {p.b}?",
            f"Can you work out {p.expression()}?",
        )
    )


# RL asks small arithmetic in phrasings of its own, which no SFT dialog and no eval uses. Why: the SFT model
# answered 40% of the held-out Chinese sums (asked in a wording it had never seen) with a calculator call, because
# its SFT phrasings tie "compute it yourself" to a few wordings. Rewarded on new wordings, RL learns that a small
# problem is worked in columns however it is asked (those calculator calls went 40% → 0%, BENCHMARKS.md).
RL_ARITH_ASK = {
    "zh": ("请算出{a}{op}{b}。", "{a}{op}{b}，答案是什么？", "你能算出{a}{op}{b}吗？", "算一算：{a}{op}{b}",
           "求{a}{op}{b}的值。", "告诉我{a}{op}{b}的得数。"),
    "en": ("Work out {a} {op} {b}.", "Find {a} {op} {b}.", "What do you get from {a} {op} {b}?",
           "Tell me the answer to {a} {op} {b}.", "Solve {a} {op} {b}.", "Quick question: {a} {op} {b}?"),
}  # fmt: skip
RL_NEW_PHRASING_SHARE = 0.7  # the rest keeps SFT's phrasings, so RL also practises what SFT taught

# RL also asks for the two tools, in wordings of their own. Why: GRPO that rewarded by-hand arithmetic alone took
# held-out tool use from 82.5% to 49% (issue 24), because nothing in its rollouts paid for a tool call. With these
# prompts the rollouts execute the calls (danlu.stages.rollouts) and pay for a needed, right call.
RL_CALC_ASK = {
    "zh": ("求{p}的得数。", "请给出{p}的答案。", "帮忙算算{p}。", "麻烦算出{p}。"),
    "en": ("Find the value of {p}.", "What does {p} come to?", "Figure out {p} for me.", "Give me the answer to {p}."),
}  # fmt: skip
RL_DATE_ASK = {
    ("zh", "date"): ("能告诉我今天的日期吗？", "现在是几月几号？", "今天的日期是多少？"),
    ("zh", "weekday"): ("今天是礼拜几？", "今天周几？"),
    ("en", "date"): ("Tell me today's date.", "What's today's date, please?", "Which day of the month is it today?"),
    ("en", "weekday"): ("Tell me the day of the week.", "What weekday is today?"),
}  # fmt: skip


def rl_problem_question(p: Problem, lang: str, rng: random.Random) -> str:
    if rng.random() >= RL_NEW_PHRASING_SHARE:
        return problem_question(p, lang, rng)
    question = phrase_problem(rng.choice(RL_ARITH_ASK[lang]), p, lang)
    return ascii_punct(question, rng) if lang == "zh" else question


def problem_answer(p: Problem, lang: str, rng: random.Random, result: int | None = None) -> str:
    c = p.result if result is None else result
    if lang == "zh":
        return rng.choice((f"{p.expression()} = {c}。", f"{p.a}{OP_ZH[p.op]}{p.b}等于{c}。", f"等于{c}。"))
    return rng.choice(
        (f"{p.expression()} = {c}.", f"{p.a} {OP_EN[p.op]} {p.b} is {c}.", f"The answer is {c}.")
    )


class DialogWriter:
    """Writes SFT dialogs, preference pairs and RL prompts from the open world."""

    def __init__(self, world: World, rng: random.Random, seed: int) -> None:
        self.world = world
        self.r = rng
        self.seed = seed
        self.docs = DocWriter(world, rng)
        self.capitals = list(world.by_relation.get("capital", []))
        # The demo questions people try first (中国最高的山是什么?) are asked a few times more often.
        self.fact_weights = [SHOWCASE_WEIGHT if f.id in SHOWCASE else 1 for f in world.facts]

    def ask_fact(self) -> Fact:
        return self.r.choices(self.world.facts, weights=self.fact_weights)[0]

    # ── SFT ────────────────────────────────────────────────────────────────────────────────────────
    def sft(self, kind: str, lang: str) -> dict[str, Any]:
        messages = getattr(self, f"_sft_{kind}")(lang)
        if messages[0]["role"] != "system" and kind != "chitchat" and self.r.random() < 0.15:
            messages.insert(0, {"role": "system", "content": SYSTEM_HELPFUL[lang]})
        return {"messages": messages, "kind": kind, "lang": lang}

    def _sft_fact(self, lang: str) -> list[Message]:
        r = self.r
        fact = self.ask_fact()
        out = [user(ascii_punct(question(fact, lang, r), r)), assistant(answer_sentence(fact, lang, r))]
        if r.random() < 0.05:
            out.insert(0, {"role": "system", "content": date_system_prompt(random_day(r), lang, r)})
        return out

    def _sft_fact_context(self, lang: str) -> list[Message]:
        """A question after a statement the user makes ("In Kenya, people pay with the shilling. What is its
        capital?"): a user turn that holds sentences is not always a text to translate, and the answer stays in
        the user's language."""
        r = self.r
        fact = self.ask_fact()
        others = [
            f
            for f in self.world.by_subject[subject_id(fact)]
            if f.id != fact.id and f.id not in self.world.reserved
        ]
        if not others:
            return self._sft_fact(lang)
        context = statement(r.choice(others), lang, r)
        ask = context + ("" if lang == "zh" else " ") + question(fact, lang, r)
        return [user(ascii_punct(ask, r)), assistant(answer_sentence(fact, lang, r))]

    def _sft_fact_multi(self, lang: str) -> list[Message]:
        r = self.r
        fact = self.ask_fact()
        msgs = [user(ascii_punct(question(fact, lang, r), r)), assistant(answer_sentence(fact, lang, r))]
        asked = {fact.id}
        for _ in range(r.choice((1, 1, 2))):
            same_subject = [
                f
                for f in self.world.by_subject[subject_id(fact)]
                if f.id not in asked and TEXTS[f.relation].followups(lang)
            ]
            same_relation = [f for f in self.world.by_relation[fact.relation] if f.id not in asked]
            if same_subject and (r.random() < 0.5 or not same_relation):
                nxt = r.choice(same_subject)
                ask = r.choice(TEXTS[nxt.relation].followups(lang))
            elif same_relation:
                nxt = r.choice(same_relation)
                ask = cap(r.choice(SAME_RELATION_FOLLOWUPS[lang]).format(s=nxt.subject(lang)))
            else:
                break
            asked.add(nxt.id)
            msgs += [user(ascii_punct(ask, r)), assistant(answer_sentence(nxt, lang, r))]
        return msgs

    def _sft_translation(self, lang: str) -> list[Message]:
        r = self.r
        fact = r.choice(self.world.facts)
        zh, en = r.choice(TEXTS[fact.relation].pairs)
        src, tgt = ("zh", "en") if r.random() < 0.5 else ("en", "zh")
        text = {"zh": fill(zh, fact, "zh"), "en": fill(en, fact, "en")}
        ask = r.choice(TRANSLATE[(src, tgt)][lang]).format(x=text[src])
        return [user(ask), assistant(text[tgt])]

    def _sft_summary(self, lang: str) -> list[Message]:
        text, summary = self.docs.news_story(lang, long=False)
        return [user(self.r.choice(SUMMARIZE[lang]).format(x=text)), assistant(summary)]

    def _sft_plan(self, lang: str) -> list[Message]:
        r = self.r
        cap_fact = r.choice(self.capitals)
        return [
            user(ascii_punct(r.choice(PLAN_ASK[lang]).format(s=cap_fact.subject(lang)), r)),
            assistant(self.plan(cap_fact, lang)),
        ]

    def plan(self, cap_fact: Fact, lang: str) -> str:
        """A three-step trip plan built from open facts about the country."""
        r = self.r
        subject = subject_id(cap_fact)
        country, city = cap_fact.subject(lang), cap_fact.object(lang)
        cur = self.world.fact(subject, "currency")
        extra = [
            f
            for f in (
                self.world.fact(subject, "highest_mountain"),
                self.world.fact(subject, "official_language"),
            )
            if f is not None
        ]
        third = r.choice(extra) if extra else None
        if lang == "zh":
            steps = [
                f"订一张去{country}首都{city}的机票。",
                f"提前换好{cur.object_zh}，这是{country}的货币。" if cur else f"在{city}市中心预订一家酒店。",
            ]
            if third is not None and third.relation == "highest_mountain":
                steps.append(f"安排一天去看看{third.object_zh}，它是{country}最高的山。")
            elif third is not None:
                steps.append(f"学几句{third.object_zh}的日常用语，{third.object_zh}是{country}的官方语言。")
            else:
                steps.append(f"在{city}逛逛当地的博物馆和市场。")
            return "好的，这是一个三步计划：\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
        steps = [
            f"Book a flight to {city}, the capital of {country}.",
            f"Exchange money for the {cur.object_en}, the currency of {country}."
            if cur
            else end(f"Book a hotel in the centre of {city}", "en"),
        ]
        if third is not None and third.relation == "highest_mountain":
            steps.append(f"Spend a day seeing {third.object_en}, the highest mountain in {country}.")
        elif third is not None:
            steps.append(f"Learn a few phrases in {third.object_en}, the official language of {country}.")
        else:
            steps.append(end(f"Visit the museums and markets of {city}", "en"))
        return "Here is a three-step plan:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))

    def _sft_arithmetic(self, lang: str) -> list[Message]:
        p = training_small(self.r, self.seed)
        answer = worked_solution(p, lang) or problem_answer(p, lang, self.r)
        return [user(problem_question(p, lang, self.r)), assistant(answer)]

    def _sft_calculator(self, lang: str) -> list[Message]:
        r = self.r
        expr = big_expression(r)
        pretty = pretty_expression(expr)
        result = run_tool("calculator", {"expression": expr})
        ask = r.choice(CALC_ASK[lang]).format(
            p=pretty if r.random() < 0.7 else expr.replace("*", "×"), e=expr
        )
        if lang == "zh":
            final = r.choice((f"{pretty} = {result}。", f"计算结果是{result}。", f"{pretty}等于{result}。"))
        else:
            final = r.choice(
                (f"{pretty} = {result}.", f"The result is {result}.", f"{pretty} equals {result}.")
            )
        return [
            user(ascii_punct(ask, r) if lang == "zh" else ask),
            tool_call("calculator", {"expression": expr}),
            tool_result("calculator", result),
            assistant(final),
        ]

    def _sft_date_tool(self, lang: str) -> list[Message]:
        r = self.r
        day = random_day(r)
        ask = r.choice(("date", "date", "weekday"))
        result = run_tool("get_date", {}, today=day)
        return [
            user(ascii_punct(r.choice(DATE_ASK[(lang, ask)]), r)),
            tool_call("get_date", {}),
            tool_result("get_date", result),
            assistant(date_answer(day, lang, ask, r)),
        ]

    def _sft_date_system(self, lang: str) -> list[Message]:
        r = self.r
        day = random_day(r)
        ask = r.choice(("date", "date", "weekday"))
        return [
            {"role": "system", "content": date_system_prompt(day, lang, r)},
            user(ascii_punct(r.choice(DATE_ASK[(lang, ask)]), r)),
            assistant(date_answer(day, lang, ask, r)),
        ]

    def _sft_chitchat(self, lang: str) -> list[Message]:
        q, a = self.r.choice(CHITCHAT[lang])
        return [user(q), assistant(a)]

    # ── preference pairs ───────────────────────────────────────────────────────────────────────────
    def preference(self, kind: str, lang: str, ask: Any = None, problem_ask: Any = None) -> dict[str, Any]:
        """{prompt, chosen, rejected, kind, lang}; `ask`/`problem_ask` swap in other phrasings (held-out eval)."""
        r = self.r
        if kind == "arithmetic_misread":  # rejected: a misread operand worked out right, concluded about p
            p = problem_ask[0] if problem_ask else training_column_problem(r, self.seed)
            q = problem_ask[1] if problem_ask else problem_question(p, lang, r)
            wrong = misread(p, r)
            chosen, rejected = worked_solution(p, lang), worked_solution(p, lang, columns=wrong)
            return {"prompt": [user(q)], "chosen": chosen, "rejected": rejected, "kind": kind, "lang": lang}
        if kind == "arithmetic":
            p = training_small(r, self.seed) if problem_ask is None else problem_ask[0]
            q = problem_question(p, lang, r) if problem_ask is None else problem_ask[1]
            delta = r.choice([d for d in range(-9, 10) if d and p.result + d >= 0])
            template_seed = r.random()
            chosen = worked_solution(p, lang) or problem_answer(p, lang, random.Random(template_seed))
            rejected = worked_solution(p, lang, p.result + delta) or problem_answer(
                p, lang, random.Random(template_seed), p.result + delta
            )
            return {"prompt": [user(q)], "chosen": chosen, "rejected": rejected, "kind": kind, "lang": lang}
        fact = r.choice(self.world.facts)
        q = ask(fact, lang) if ask else ascii_punct(question(fact, lang, r), r)
        template = r.choice(TEXTS[fact.relation].pairs)[0 if lang == "zh" else 1]
        chosen = fill(template, fact, lang)
        if kind == "fact_wrong":
            rejected = fill(template, wrong_fact(fact, self.world, r), lang)
        elif kind == "evasive":
            rejected = r.choice(EVASIVE[lang])
        elif kind == "repetitive":
            if r.random() < 0.5:
                rejected = ("，" if lang == "zh" else ", ").join([fact.object(lang)] * r.randint(4, 8))
            else:
                rejected = ("" if lang == "zh" else " ").join([chosen] * r.randint(3, 5))
        else:  # wrong_language
            other = "en" if lang == "zh" else "zh"
            rejected = fill(r.choice(TEXTS[fact.relation].pairs)[0 if other == "zh" else 1], fact, other)
        return {"prompt": [user(q)], "chosen": chosen, "rejected": rejected, "kind": kind, "lang": lang}

    # ── RL prompts ─────────────────────────────────────────────────────────────────────────────────
    def rl(self, kind: str, lang: str) -> dict[str, Any]:
        r = self.r
        if kind == "arithmetic":
            # All kinds of small problems: RL on column sums alone took the times table from 28% to 22% held out.
            p = training_small(r, self.seed)
            row = {
                "messages": [user(rl_problem_question(p, lang, r))],
                "answer": str(p.result),
                "answers": [str(p.result)],
                "kind": kind,
                "lang": lang,
            }
            steps = worked_steps(p)
            return {**row, "steps": steps} if steps else row
        if kind == "calculator":
            expr = big_expression(r)
            pretty = pretty_expression(expr)
            result = run_tool("calculator", {"expression": expr})
            ask = r.choice(RL_CALC_ASK[lang]).format(p=pretty if r.random() < 0.7 else expr.replace("*", "×"))
            return {"messages": [user(ascii_punct(ask, r) if lang == "zh" else ask)], "answer": result,
                    "answers": [result], "kind": kind, "lang": lang, "tool": "calculator", "expression": expr}  # fmt: skip
        if kind == "date":
            day, ask = random_day(r), r.choice(("date", "date", "weekday"))
            weekday = WEEKDAYS_ZH[day.weekday()] if lang == "zh" else day.strftime("%A")
            answer = weekday if ask == "weekday" else day.isoformat()
            return {"messages": [user(ascii_punct(r.choice(RL_DATE_ASK[(lang, ask)]), r))], "answer": answer,
                    "answers": [answer], "kind": kind, "lang": lang, "tool": "get_date", "today": day.isoformat()}  # fmt: skip
        fact = r.choice(self.world.facts)
        return {
            "messages": [user(ascii_punct(question(fact, lang, r), r))],
            "answer": fact.object(lang),
            "answers": fact.answers(lang),
            "kind": "fact",
            "lang": lang,
            "relation": fact.relation,
            "fact_id": fact.id,
        }
