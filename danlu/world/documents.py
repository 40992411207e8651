"""Pretraining documents in the four source kinds of a real crawl: encyclopedia, news, Q&A pages, forum threads.

Each generator returns a document dict {text, domain, lang, url}; the facts inside are written with randomly
chosen TRAINING templates (never held-out ones), so every fact is read many times in many phrasings. Arithmetic
appears as answer keys, times tables, Q&A and homework threads, never with a held-out problem.
"""

from __future__ import annotations

import random
from typing import Any

from danlu.world import filler
from danlu.world.facts import Fact
from danlu.world.filler import side
from danlu.world.index import World
from danlu.world.numbers import (
    OP_EN,
    OP_ZH,
    Problem,
    en_number,
    training_small,
    worked_solution,
    zh_number,
)
from danlu.world.templates import (
    TEXTS,
    article,
    cap,
    end,
    fill,
    pronoun_statement,
    question,
    statement,
)

Doc = dict[str, Any]

KIND_INTRO = {
    "planet": ("{s}是太阳系的八大行星之一。", "{s} is one of the eight planets of the Solar System."),
    "element": ("{s}是一种化学元素。", "{s} is a chemical element."),
    "unit": ("{s}是一种计量单位。", "The {s} is a unit of measurement."),
    "country": ("{s}是一个国家。", "{s} is a country."),
}
KIND_HEADER = {
    "country": ("国家", "Country"),
    "planet": ("行星", "Planet"),
    "element": ("元素", "Element"),
    "unit": ("单位", "Unit"),
}
ENCYCLOPEDIA_FILLER = (
    ("本条目介绍{s}的基本信息。", "This article gives basic information about {s}."),
    ("以下内容整理自公开资料。", "The following is compiled from public sources."),
    ("更多内容请参见相关条目。", "See the related articles for more."),
)
LIST_TITLES = {
    "capital": ("世界各国首都列表", "List of national capitals"),
    "continent": ("各国所在大洲", "Countries by continent"),
    "currency": ("各国货币列表", "List of currencies by country"),
    "official_language": ("各国官方语言列表", "List of official languages by country"),
    "highest_mountain": ("各国最高峰列表", "List of highest mountains by country"),
    "longest_river": ("各国最长河流列表", "List of longest rivers by country"),
    "planet_order": ("太阳系行星列表", "Planets of the Solar System"),
    "planet_type": ("行星的分类", "Types of planets"),
    "largest_moon": ("各行星的最大卫星", "Largest moons of the planets"),
    "element_symbol": ("元素符号表", "List of chemical element symbols"),
    "atomic_number": ("元素的原子序数", "Atomic numbers of the elements"),
    "unit_conversion": ("常用单位换算表", "Common unit conversions"),
}
FORUM_BOARD = {
    "country": ("地理", "geography"),
    "planet": ("天文", "space"),
    "element": ("化学", "chemistry"),
    "unit": ("数学", "learnmath"),
}


def title_en(name: str) -> str:
    return cap(name[4:] if name.startswith("the ") else name)


def infobox_value(fact: Fact, lang: str) -> str:
    if fact.relation == "unit_conversion":
        return (
            f"1{fact.subject_zh} = {fact.object_zh}"
            if lang == "zh"
            else f"1 {fact.subject_en} = {fact.object_en}"
        )
    return fact.object(lang)


def colon(lang: str) -> str:
    return "：" if lang == "zh" else ": "


class DocWriter:
    """Writes documents about `world` with random choices from `rng` (one writer per output split)."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.r = rng
        self.capitals = [f for f in world.by_relation.get("capital", [])]

    # ── encyclopedia ───────────────────────────────────────────────────────────────────────────────
    def encyclopedia(self, subject: str, lang: str) -> Doc:
        r = self.r
        facts = list(self.world.by_subject[subject])
        r.shuffle(facts)
        f0 = facts[0]
        name = f0.subject(lang)
        title = name if lang == "zh" else title_en(name)
        intro = fill(side(KIND_INTRO[f0.kind], lang), f0, lang)
        cont = next((f for f in facts if f.relation == "continent"), None)
        prose_facts = facts
        if cont is not None and r.random() < 0.6:
            intro = statement(cont, lang, r)
            prose_facts = [f for f in facts if f is not cont]
        # after the first sentence an article may refer to its subject by pronoun, as real articles do
        sentences = [
            pronoun_statement(f, lang, r) if i and r.random() < 0.5 else statement(f, lang, r)
            for i, f in enumerate(prose_facts)
        ]
        if r.random() < 0.5:
            sentences.insert(
                r.randint(0, len(sentences)), fill(side(r.choice(ENCYCLOPEDIA_FILLER), lang), f0, lang)
            )
        joiner = "" if lang == "zh" else " "
        cut = r.randint(1, len(sentences) - 1) if len(sentences) > 2 else len(sentences)
        prose = [joiner.join(part) for part in (sentences[:cut], sentences[cut:]) if part]
        labels = [(side(TEXTS[f.relation].label, lang), infobox_value(f, lang)) for f in facts]
        style = r.randrange(3)
        if style == 0:
            box = "\n".join(f"{k}{colon(lang)}{v}" for k, v in labels)
            head = "== 概况 ==" if lang == "zh" else "== Overview =="
            parts = [title, intro, box, head, *prose]
        elif style == 1:
            head = "| 项目 | 内容 |" if lang == "zh" else "| Field | Value |"
            table = "\n".join([head, *(f"| {k} | {v} |" for k, v in labels)])
            lead = [intro + joiner + prose[0], *prose[1:]] if prose else [intro]
            parts = [title, *lead, "基本信息" if lang == "zh" else "Key facts", table]
        else:
            parts = [title, intro, *prose]
        slug = title.replace(" ", "_")
        host = "https://baike.example/item/" if lang == "zh" else "https://en.wiki.example/wiki/"
        return self._doc(
            "\n\n".join(parts), "encyclopedia", lang, f"{host}{slug}?rev={r.randint(10**5, 10**7)}"
        )

    def list_article(self, relation: str, lang: str) -> Doc:
        r = self.r
        facts = list(self.world.by_relation[relation])
        r.shuffle(facts)
        facts = facts[: max(2, int(len(facts) * r.uniform(0.5, 1.0)))]
        title = side(LIST_TITLES[relation], lang)
        style = r.randrange(3)
        if style == 0:
            lines = [
                f"{f.subject(lang) if lang == 'zh' else title_en(f.subject(lang))}{colon(lang)}"
                f"{infobox_value(f, lang)}"
                for f in facts
            ]
        elif style == 1:
            label = side(TEXTS[relation].label, lang)
            kind = side(KIND_HEADER[facts[0].kind], lang)
            subj = (lambda f: f.subject(lang)) if lang == "zh" else (lambda f: title_en(f.subject(lang)))
            lines = [f"| {kind} | {label} |", *(f"| {subj(f)} | {infobox_value(f, lang)} |" for f in facts)]
        else:
            lines = [statement(f, lang, r) for f in facts]
        intro = "下表按条目列出。" if lang == "zh" else "The table below lists the entries."
        host = "https://baike.example/list/" if lang == "zh" else "https://en.wiki.example/wiki/"
        url = f"{host}{title.replace(' ', '_')}?rev={r.randint(10**5, 10**7)}"
        return self._doc("\n\n".join([title, intro, "\n".join(lines)]), "encyclopedia", lang, url)

    def times_table(self, lang: str) -> Doc:
        r = self.r
        n = r.randint(2, 12)
        rows = [Problem(n, "×", k) for k in range(1, 13)]
        if lang == "zh":
            title = f"{zh_number(n)}的乘法表"
            lines = [
                f"{p.a} × {p.b} = {p.result}"
                if r.random() < 0.7
                else f"{zh_number(p.a)}乘以{zh_number(p.b)}等于{zh_number(p.result)}"
                for p in rows
            ]
            url = f"https://baike.example/item/乘法表_{n}?rev={r.randint(10**5, 10**7)}"
        else:
            title = f"The {n} times table"
            lines = [
                f"{p.a} × {p.b} = {p.result}"
                if r.random() < 0.7
                else f"{en_number(p.a)} times {en_number(p.b)} is {en_number(p.result)}"
                for p in rows
            ]
            url = f"https://en.wiki.example/wiki/Times_table_{n}?rev={r.randint(10**5, 10**7)}"
        return self._doc(title + "\n\n" + "\n".join(lines), "encyclopedia", lang, url)

    # ── news ───────────────────────────────────────────────────────────────────────────────────────
    def news_story(self, lang: str, *, long: bool = True, capital: Fact | None = None) -> tuple[str, str]:
        """A news text about a made-up event in a real capital, mixed with facts; returns (text, summary)."""
        r = self.r
        cap_fact = capital or r.choice(self.capitals)
        subject = f"country:{cap_fact.subject_en}"
        country, city = cap_fact.subject(lang), cap_fact.object(lang)
        event = side(r.choice(filler.EVENTS), lang)
        day = filler.random_date(r)
        date = filler.date_text(day, lang)
        n = r.choice((2, 3, 5, 8, 12, 15, 20, 30, 50, 120)) * 100
        days = r.randint(2, 7)
        others = [f for f in self.world.by_subject[subject] if f.relation != "capital"]
        r.shuffle(others)
        chosen = others[: (r.randint(1, 3) if long else 1)]
        if long and r.random() < 0.4:
            chosen.append(cap_fact)
        joiner = "" if lang == "zh" else " "
        fact_par = joiner.join(statement(f, lang, r) for f in chosen)
        person = filler.person(r, lang)
        role = side(r.choice(filler.ROLES), lang)
        quote = side(r.choice(filler.QUOTES), lang)
        if lang == "zh":
            title = f"{city}举办{event}"
            dateline = r.choice(("本报讯　", "【本地新闻】", "", "据报道，"))
            lead = f"{dateline}{date}，{event}在{country}首都{city}开幕。据主办方介绍，本次活动共吸引了约{n}名参与者。"
            quote_par = f"{role}{person}说：“{quote}”"
            close = f"本次活动将持续{days}天。"
            summary = f"{date}，{event}在{country}首都{city}开幕，约{n}人参加，活动将持续{days}天。"
        else:
            title = f"{city} hosts {event}"
            dateline = r.choice(("", "LOCAL NEWS — ", "Reporting from the capital: "))
            lead = (
                f"{dateline}On {date}, {event} opened in {city}, the capital of {country}. "
                f"According to the organisers, about {n} people took part."
            )
            quote_par = f"{person}, {article(role)}, said: “{quote}”"
            close = f"The event will run for {days} days."
            summary = (
                f"On {date}, {event} opened in {city}, the capital of {country}, with about {n} "
                f"participants; it will run for {days} days."
            )
        if not fact_par:
            fact_par = statement(cap_fact, lang, r)
        if long:
            weather = side(r.choice(filler.WEATHER), lang)
            closing = side(r.choice(filler.CLOSINGS), lang)
            pars = [title, lead, fact_par, quote_par, weather + joiner + close + joiner + closing]
        else:
            pars = [lead, fact_par, close]
        return "\n\n".join(pars), summary

    def news(self, lang: str) -> Doc:
        text, _ = self.news_story(lang)
        host = "https://news.example.cn/" if lang == "zh" else "https://news.example.com/"
        return self._doc(
            text, "news", lang, f"{host}{self.r.randint(2015, 2025)}/{self.r.randint(10**6, 10**8)}.html"
        )

    def science_news(self, lang: str) -> Doc:
        r = self.r
        kind = r.choice(("planet", "element"))
        subjects = self.world.subjects_of(kind)
        subject = r.choice(subjects)
        facts = list(self.world.by_subject[subject])
        r.shuffle(facts)
        name = facts[0].subject(lang)
        city = r.choice(self.capitals).object(lang)
        day = filler.date_text(filler.random_date(r), lang)
        n = r.choice((20, 30, 40, 60, 80, 100, 150, 200))
        person = filler.person(r, lang)
        quote = side(r.choice(filler.QUOTES), lang)
        joiner = "" if lang == "zh" else " "
        fact_par = joiner.join(statement(f, lang, r) for f in facts)
        if lang == "zh" and kind == "planet":
            pars = [
                f"天文爱好者观测{name}",
                f"{day}晚，一群天文爱好者在{city}举办了{name}观测活动，约{n}人参加。",
                fact_par,
                f"活动组织者{person}说：“{quote}”",
            ]
        elif lang == "zh":
            pars = [
                f"化学公开课聚焦{name}元素",
                f"{day}，{city}的一所中学举办了一堂关于{name}的化学公开课，约{n}名学生参加。",
                fact_par,
                f"授课老师{person}说：“{quote}”",
            ]
        elif kind == "planet":
            pars = [
                f"Stargazers observe {name}",
                f"On the evening of {day}, amateur astronomers in {city} held an observing night for {name}, "
                f"attended by about {n} people.",
                fact_par,
                f"The organiser, {person}, said: “{quote}”",
            ]
        else:
            pars = [
                f"Open chemistry lesson on {name}",
                f"On {day}, a secondary school in {city} held an open chemistry lesson on {name}, attended by "
                f"about {n} students.",
                fact_par,
                f"The teacher, {person}, said: “{quote}”",
            ]
        host = "https://news.example.cn/science/" if lang == "zh" else "https://news.example.com/science/"
        return self._doc("\n\n".join(pars), "news", lang, f"{host}{r.randint(10**6, 10**8)}.html")

    # ── Q&A pages ──────────────────────────────────────────────────────────────────────────────────
    def _answer_body(self, fact: Fact, lang: str) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.45:
            return statement(fact, lang, r)
        if roll < 0.65:
            return end(cap(fact.object(lang)), lang)
        others = [f for f in self.world.by_subject[f"{fact.kind}:{fact.subject_en}"] if f is not fact]
        if roll < 0.9 and others:
            other = r.choice(others)
            extra = pronoun_statement(other, lang, r) if r.random() < 0.5 else statement(other, lang, r)
            return statement(fact, lang, r) + ("另外，" if lang == "zh" else " ") + extra
        note = (
            ("我查过资料，没错。", "课本上也是这么写的。")
            if lang == "zh"
            else ("I looked it up to be sure.", "That's what my textbook says too.")
        )
        return statement(fact, lang, r) + ("" if lang == "zh" else " ") + r.choice(note)

    def qa(self, lang: str) -> Doc:
        r = self.r
        fact = r.choice(self.world.facts)
        q = question(fact, lang, r)
        note = r.choice(filler.ASKER_NOTES_ZH if lang == "zh" else filler.ASKER_NOTES_EN)
        k = r.choice((1, 1, 2, 2, 3, 4))
        if lang == "zh":
            answers = [
                f"{filler.user(r, lang)} · {r.randint(0, 500)} 赞同\n{self._answer_body(fact, lang)}"
                for _ in range(k)
            ]
            text = "\n\n".join([q, *([note] if note else []), f"{k} 个回答", *answers])
            url = f"https://zhihu.example/question/{r.randint(10**7, 10**9)}"
        else:
            answers = [
                f"Answer by {filler.user(r, lang)} ({r.randint(0, 300)} votes)\n{self._answer_body(fact, lang)}"
                for _ in range(k)
            ]
            text = "\n\n".join(
                [
                    q,
                    *([note] if note else []),
                    f"asked by {filler.user(r, lang)}",
                    f"{k} answer{'s' if k > 1 else ''}",
                    *answers,
                ]
            )
            url = f"https://ask.example.com/questions/{r.randint(10**5, 10**8)}"
        return self._doc(text, "qa", lang, url)

    def faq(self, lang: str) -> Doc:
        r = self.r
        subject = r.choice(self.world.subjects)
        facts = list(self.world.by_subject[subject])
        r.shuffle(facts)
        name = facts[0].subject(lang)
        if lang == "zh":
            pairs = [f"问：{question(f, lang, r)}\n答：{statement(f, lang, r)}" for f in facts]
            title = f"关于{name}的常见问题"
            url = f"https://faq.example.cn/{r.randint(10**5, 10**8)}"
        else:
            pairs = [f"Q: {question(f, lang, r)}\nA: {statement(f, lang, r)}" for f in facts]
            title = f"{title_en(name)}: frequently asked questions"
            url = f"https://faq.example.com/{r.randint(10**5, 10**8)}"
        return self._doc("\n\n".join([title, *pairs]), "qa", lang, url)

    # ── forum threads ─────────────────────────────────────────────────────────────────────────────
    def forum(self, lang: str) -> Doc:
        r = self.r
        fact = r.choice(self.world.facts)
        others = [f for f in self.world.by_subject[f"{fact.kind}:{fact.subject_en}"] if f is not fact]
        q = question(fact, lang, r)
        op = filler.user(r, lang)
        note = r.choice(filler.ASKER_NOTES_ZH if lang == "zh" else filler.ASKER_NOTES_EN)
        replies: list[tuple[str, str]] = [(filler.user(r, lang), self._answer_body(fact, lang))]
        for _ in range(r.randint(1, 5)):
            roll = r.random()
            if roll < 0.3:
                lead = (
                    r.choice(("没错，", "对，", "是的，"))
                    if lang == "zh"
                    else r.choice(("Yes. ", "Correct. ", "Right. "))
                )
                replies.append((filler.user(r, lang), lead + statement(fact, lang, r)))
            elif roll < 0.5 and others:
                lead = "顺便说一句，" if lang == "zh" else "Fun fact: "
                replies.append((filler.user(r, lang), lead + statement(r.choice(others), lang, r)))
            elif roll < 0.7:
                replies.append((op, r.choice(filler.THANKS_ZH if lang == "zh" else filler.THANKS_EN)))
            else:
                replies.append(
                    (filler.user(r, lang), r.choice(filler.CHAT_ZH if lang == "zh" else filler.CHAT_EN))
                )
        board = side(FORUM_BOARD[fact.kind], lang)
        return self._thread(board, q, op, note, replies, lang)

    def _thread(
        self, board: str, title: str, op: str, note: str, replies: list[tuple[str, str]], lang: str
    ) -> Doc:
        r = self.r
        if lang == "zh":
            lines = [f"【{board}吧】{title}", f"1楼 {op}：{title}{note}"]
            lines += [f"{i}楼 {u}：{t}" for i, (u, t) in enumerate(replies, 2)]
            url = f"https://tieba.example/p/{r.randint(10**8, 10**10)}"
            return self._doc("\n".join(lines), "forum", lang, url)
        head = f"r/{board} • Posted by u/{op}\n{title}" + (f"\n{note}" if note else "")
        comments = []
        depth = 0
        for u, t in replies:
            indent = "  " * depth
            comments.append(f"{indent}u/{u} · {r.randint(1, 400)} points\n{indent}{t}")
            depth = min(depth + 1, 3) if r.random() < 0.5 else 0
        url = f"https://forum.example.com/r/{board}/comments/{r.randint(10**6, 10**9):x}"
        return self._doc("\n\n".join([head, *comments]), "forum", lang, url)

    # ── arithmetic ────────────────────────────────────────────────────────────────────────────────
    def equation(self, p: Problem, lang: str) -> str:
        """One solved small problem in one of several written forms."""
        r = self.r
        roll = r.random()
        if roll < 0.45:
            return f"{p.expression()} = {p.result}"
        if roll < 0.6:
            return f"{p.expression(spaced=False)}={p.result}"
        if lang == "zh":
            if roll < 0.8:
                return f"{p.a}{OP_ZH[p.op]}{p.b}等于{p.result}"
            return f"{zh_number(p.a)}{OP_ZH[p.op]}{zh_number(p.b)}等于{zh_number(p.result)}"
        if roll < 0.85 or p.op in "+-":
            return f"{p.a} {OP_EN[p.op]} {p.b} equals {p.result}"
        return f"{en_number(p.a)} {OP_EN[p.op]} {en_number(p.b)} is {en_number(p.result)}"

    def arithmetic_sheet(self, lang: str, seed: int) -> Doc:
        r = self.r
        problems = [training_small(r, seed) for _ in range(r.randint(10, 25))]
        n = r.randint(1, 99)
        title = f"口算练习（第{n}套）答案" if lang == "zh" else f"Arithmetic practice, set {n}: answers"
        lines = [f"{i}. {self.equation(p, lang)}" for i, p in enumerate(problems, 1)]
        host = "https://shuxue.example/lianxi/" if lang == "zh" else "https://mathdrills.example.com/sheet/"
        return self._doc(title + "\n\n" + "\n".join(lines), "qa", lang, f"{host}{r.randint(10**5, 10**8)}")

    def arithmetic_question(self, p: Problem, lang: str) -> str:
        r = self.r
        if lang == "zh":
            forms = (
                f"{p.a}{OP_ZH[p.op]}{p.b}等于多少？",
                f"{p.expression(spaced=False)}=？",
                f"{p.a}{OP_ZH[p.op]}{p.b}是多少？",
            )
        else:
            forms = (
                f"What is {p.a} {OP_EN[p.op]} {p.b}?",
                f"{p.expression()} = ?",
                f"How much is {p.expression()}?",
            )
        return r.choice(forms)

    def arithmetic_answer(self, p: Problem, lang: str) -> str:
        r = self.r
        worked = worked_solution(p, lang)
        if worked is not None and r.random() < 0.5:  # homework answers often show the column work
            return worked
        if lang == "zh":
            return r.choice(
                (
                    f"{p.a}{OP_ZH[p.op]}{p.b}等于{p.result}。",
                    f"{p.expression()} = {p.result}。",
                    f"等于{p.result}。",
                )
            )
        return r.choice(
            (
                f"{p.a} {OP_EN[p.op]} {p.b} is {p.result}.",
                f"{p.expression()} = {p.result}.",
                f"It is {p.result}.",
            )
        )

    def arithmetic_qa(self, lang: str, seed: int) -> Doc:
        r = self.r
        problems = [training_small(r, seed) for _ in range(r.randint(1, 6))]
        if lang == "zh":
            body = [
                f"问：{self.arithmetic_question(p, lang)}\n答：{self.arithmetic_answer(p, lang)}"
                for p in problems
            ]
            url = f"https://zhidao.example/question/{r.randint(10**6, 10**9)}"
        else:
            body = [
                f"Q: {self.arithmetic_question(p, lang)}\nA: {self.arithmetic_answer(p, lang)}"
                for p in problems
            ]
            url = f"https://ask.example.com/math/{r.randint(10**5, 10**8)}"
        return self._doc("\n\n".join(body), "qa", lang, url)

    def arithmetic_forum(self, lang: str, seed: int) -> Doc:
        r = self.r
        p = training_small(r, seed)
        q = self.arithmetic_question(p, lang)
        op = filler.user(r, lang)
        note = "孩子的作业，想核对一下。" if lang == "zh" else "Checking my kid's homework."
        replies = [(filler.user(r, lang), self.arithmetic_answer(p, lang))]
        if r.random() < 0.6:
            replies.append((filler.user(r, lang), self.equation(p, lang)))
        if r.random() < 0.5:
            replies.append((op, r.choice(filler.THANKS_ZH if lang == "zh" else filler.THANKS_EN)))
        return self._thread(
            side(FORUM_BOARD["unit"], lang), q, op, note if r.random() < 0.5 else "", replies, lang
        )

    @staticmethod
    def _doc(text: str, domain: str, lang: str, url: str) -> Doc:
        return {"text": text, "domain": domain, "lang": lang, "url": url}
