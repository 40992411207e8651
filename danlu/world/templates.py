"""Phrasings of every relation: training templates, and HELD-OUT templates that no training text ever uses.

Why two sets: a model that answers 「中国最高的山是」 after reading 「中国最高的山是珠穆朗玛峰」 a hundred times may only
have memorized a string. The evaluation sets ask with held-out phrasings (「在中国，最高的山是」, "As for China, its
highest peak is"), so a correct answer shows the fact was learned, not the sentence.

Held-out phrasings are new sentences made of words the corpus teaches (a test checks every word): the world corpus is
the model's whole experience, so a word it never read ("loftiest", 「流通」) would test vocabulary the corpus cannot
give, not whether the fact was learned. Held-out statement prompts are written as parallel (zh, en) pairs ending
right before the object: they serve the completion eval (prompt → object) and, with the object appended, the
translation eval (zh sentence ↔ en sentence).

Slots: {s} subject, {o} object, {a_o} object with "a"/"an", {n} number and {u} smaller unit (unit conversions).
English sentences get their first letter capitalized after filling (so {s} may start a sentence).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from danlu.world.facts import Fact

Pair = tuple[str, str]


@dataclass(frozen=True)
class RelationText:
    label: Pair  # infobox label (zh, en)
    pairs: tuple[Pair, ...]  # parallel training statements: all text, and translation dialogs
    extra_zh: tuple[str, ...]  # more training statements, one language only
    extra_en: tuple[str, ...]
    questions_zh: tuple[str, ...]  # training questions: Q&A pages, forums, SFT
    questions_en: tuple[str, ...]
    heldout: tuple[Pair, ...]  # held-out completion prompts, parallel, ending right before the object
    heldout_questions_zh: tuple[str, ...]
    heldout_questions_en: tuple[str, ...]
    followups_zh: tuple[str, ...] = ()  # asking this relation about the subject just discussed
    followups_en: tuple[str, ...] = ()
    # statements about the subject just named, by pronoun (它的首都是… / Its capital is…), as real articles write
    pronoun: tuple[Pair, ...] = ()
    # requests that are not questions (我想知道… / I want to know…): users ask both ways
    requests: tuple[Pair, ...] = ()

    def statements(self, lang: str) -> tuple[str, ...]:
        i = 0 if lang == "zh" else 1
        return tuple(p[i] for p in self.pairs) + (self.extra_zh if lang == "zh" else self.extra_en)

    def questions(self, lang: str) -> tuple[str, ...]:
        asked = self.questions_zh if lang == "zh" else self.questions_en
        return asked + tuple(p[0 if lang == "zh" else 1] for p in self.requests)

    def heldout_prompts(self, lang: str) -> tuple[str, ...]:
        i = 0 if lang == "zh" else 1
        return tuple(p[i] for p in self.heldout)

    def heldout_questions(self, lang: str) -> tuple[str, ...]:
        return self.heldout_questions_zh if lang == "zh" else self.heldout_questions_en

    def followups(self, lang: str) -> tuple[str, ...]:
        return self.followups_zh if lang == "zh" else self.followups_en


# fmt: off
TEXTS: dict[str, RelationText] = {
    "capital": RelationText(
        label=("首都", "Capital"),
        pairs=(
            ("{s}的首都是{o}。", "The capital of {s} is {o}."),
            ("{o}是{s}的首都。", "{o} is the capital of {s}."),
            ("{s}的首都城市是{o}。", "The capital city of {s} is {o}."),
            ("{s}以{o}为首都。", "{s} has {o} as its capital."),
            ("{o}是{s}的首都城市。", "{o} is the capital city of {s}."),
        ),
        extra_zh=("{s}的首都叫{o}。", "大家都知道，{s}的首都是{o}。", "{o}作为{s}的首都，是一座重要的城市。",
                  "{s}首都{o}是该国的重要城市。"),
        extra_en=("{o} serves as the capital of {s}.", "As the capital of {s}, {o} is an important city.",
                  "The capital of {s}? That is {o}.", "Everyone knows that the capital of {s} is {o}."),
        questions_zh=("{s}的首都是哪里？", "{s}的首都是什么？", "{s}的首都是哪座城市？", "{s}的首都在哪里？",
                      "请问{s}的首都是哪个城市？", "你知道{s}的首都吗？"),
        requests=(("我想知道{s}的首都。", "I want to know the capital of {s}."), ("请说出{s}的首都。", "Name the capital of {s}.")),
        questions_en=("What is the capital of {s}?", "Which city is the capital of {s}?",
                      "What is the capital city of {s}?", "Do you know the capital of {s}?", "What's the capital of {s}?"),
        heldout=(("在{s}，首都城市是", "In {s}, the capital city is"),
                 ("提到{s}，它的首都是", "As for {s}, its capital is")),
        heldout_questions_zh=("{s}这个国家的首都是哪座城市？", "哪座城市是{s}的首都？"),
        heldout_questions_en=("In {s}, which city is the capital?",
                              "Please give me the capital of {s}."),
        followups_zh=("那它的首都呢？", "它的首都是哪里？"),
        followups_en=("And its capital?", "What about its capital city?"),
        pronoun=(("它的首都是{o}。", "Its capital is {o}."), ("它的首都城市是{o}。", "Its capital city is {o}.")),
    ),
    "continent": RelationText(
        label=("所在大洲", "Continent"),
        pairs=(
            ("{s}位于{o}。", "{s} is located in {o}."),
            ("{s}是一个{o}国家。", "{s} is a country in {o}."),
            ("{s}地处{o}。", "{s} lies in {o}."),
            ("从地理上看，{s}属于{o}。", "Geographically, {s} belongs to {o}."),
        ),
        extra_zh=("{s}是{o}的国家之一。", "{s}位于{o}，是{o}的一个国家。"),
        extra_en=("{s} is one of the countries of {o}.", "{s} is a country located in {o}."),
        questions_zh=("{s}位于哪个洲？", "{s}在哪个大洲？", "{s}属于哪个洲？", "{s}是哪个洲的国家？"),
        requests=(("我想知道{s}位于哪个洲。", "I want to know which continent {s} is in."),),
        questions_en=("Which continent is {s} in?", "On which continent is {s}?", "What continent is {s} located in?",
                      "{s} is on which continent?"),
        heldout=(("从地理上看，{s}这个国家位于", "Geographically, the country of {s} is located in"),
                 ("提到{s}，它位于", "As for {s}, it is located in")),
        heldout_questions_zh=("{s}这个国家位于哪个洲？", "从地理上看，{s}属于哪个洲？"),
        heldout_questions_en=("Geographically, which continent is {s} in?",
                              "Please give me the continent of {s}."),
        followups_zh=("那它在哪个洲？", "它位于哪个大洲？"),
        followups_en=("And which continent is it in?", "What continent is it on?"),
        pronoun=(("它位于{o}。", "It is located in {o}."), ("它是一个{o}国家。", "It is a country in {o}.")),
    ),
    "currency": RelationText(
        label=("货币", "Currency"),
        pairs=(
            ("{s}的货币是{o}。", "The currency of {s} is the {o}."),
            ("{s}使用的货币是{o}。", "The currency used in {s} is the {o}."),
            ("{o}是{s}的货币。", "The {o} is the currency of {s}."),
            ("{s}的法定货币是{o}。", "The official currency of {s} is the {o}."),
            ("在{s}，人们用{o}付款。", "In {s}, people pay with the {o}."),
        ),
        extra_zh=("去{s}旅行，需要准备一些{o}。", "{s}通用的货币是{o}。"),
        extra_en=("Travellers to {s} pay in the {o}.", "{s} uses the {o} as its currency."),
        questions_zh=("{s}的货币是什么？", "{s}用什么货币？", "{s}使用哪种货币？", "在{s}用什么钱？", "{s}的法定货币是什么？"),
        requests=(("我想知道{s}的货币。", "I want to know the currency of {s}."), ("请说出{s}的货币。", "Name the currency of {s}.")),
        questions_en=("What is the currency of {s}?", "What currency does {s} use?", "Which currency is used in {s}?",
                      "What money do people use in {s}?"),
        heldout=(("在{s}，人们使用的货币是", "In {s}, the money people use is the"),
                 ("提到{s}，它的货币是", "As for {s}, its currency is the")),
        heldout_questions_zh=("在{s}，人们使用哪种货币？", "{s}这个国家的货币是什么？"),
        heldout_questions_en=("In {s}, which currency do people pay with?",
                              "Please give me the currency of {s}."),
        followups_zh=("那它用什么货币？", "它的货币是什么？"),
        followups_en=("And what currency does it use?", "What about its currency?"),
        pronoun=(("它的货币是{o}。", "Its currency is the {o}."), ("那里的人们用{o}付款。", "People there pay with the {o}.")),
    ),
    "official_language": RelationText(
        label=("官方语言", "Official language"),
        pairs=(
            ("{s}的官方语言是{o}。", "The official language of {s} is {o}."),
            ("{o}是{s}的官方语言。", "{o} is the official language of {s}."),
            ("在{s}，官方语言是{o}。", "In {s}, the official language is {o}."),
            ("{s}把{o}作为官方语言。", "{s} uses {o} as its official language."),
        ),
        extra_zh=("{s}规定的官方语言是{o}。",),
        extra_en=("{o} is the language that {s} has made official.",),
        questions_zh=("{s}的官方语言是什么？", "{s}的官方语言是哪种语言？", "{s}用什么官方语言？"),
        requests=(("我想知道{s}的官方语言。", "I want to know the official language of {s}."), ("请说出{s}的官方语言。", "Name the official language of {s}.")),
        questions_en=("What is the official language of {s}?", "Which language is official in {s}?",
                      "What official language does {s} use?"),
        heldout=(("在{s}这个国家，官方语言是", "In the country of {s}, the language that is official is"),
                 ("提到{s}，它的官方语言是", "As for {s}, its official language is")),
        heldout_questions_zh=("在{s}，官方语言是哪种？", "{s}这个国家的官方语言是什么？"),
        heldout_questions_en=("In {s}, which language is official?",
                              "Please give me the official language of {s}."),
        followups_zh=("它的官方语言呢？", "那它的官方语言是什么？"),
        followups_en=("And its official language?", "What about its official language?"),
        pronoun=(("它的官方语言是{o}。", "Its official language is {o}."),),
    ),
    "highest_mountain": RelationText(
        label=("最高峰", "Highest mountain"),
        pairs=(
            ("{s}最高的山是{o}。", "The highest mountain in {s} is {o}."),
            ("{o}是{s}最高的山。", "{o} is the highest mountain in {s}."),
            ("{s}的最高峰是{o}。", "The highest peak in {s} is {o}."),
            ("{o}是{s}的最高峰。", "{o} is the highest peak in {s}."),
            ("{s}海拔最高的山是{o}。", "The tallest mountain in {s} is {o}."),
        ),
        extra_zh=("登上{o}，就到了{s}的最高点。", "{s}最高的山叫{o}。"),
        extra_en=("Climbing {o} takes you to the highest point in {s}.", "No mountain in {s} is higher than {o}."),
        questions_zh=("{s}最高的山是什么？", "{s}最高的山是哪座？", "{s}的最高峰是哪座山？", "{s}海拔最高的山是什么？",
                      "{s}最高的山叫什么？"),
        requests=(("我想知道{s}最高的山。", "I want to know the highest mountain in {s}."), ("请说出{s}最高的山。", "Name the highest mountain in {s}.")),
        questions_en=("What is the highest mountain in {s}?", "Which is the highest mountain in {s}?",
                      "What is the highest peak in {s}?", "What's the tallest mountain in {s}?"),
        heldout=(("在{s}，最高的山是", "In {s}, the highest mountain is"),
                 ("提到{s}，它的最高峰是", "As for {s}, its highest peak is")),
        heldout_questions_zh=("在{s}，哪座山是最高的？", "{s}这个国家最高的山是哪座？"),
        heldout_questions_en=("In {s}, which mountain is the highest?",
                              "Please give me the highest mountain in {s}."),
        followups_zh=("那它最高的山呢？", "它最高的山是哪座？"),
        followups_en=("And its highest mountain?", "What about its highest mountain?"),
        pronoun=(("它最高的山是{o}。", "Its highest mountain is {o}."), ("它的最高峰是{o}。", "Its highest peak is {o}.")),
    ),
    "longest_river": RelationText(
        label=("最长河流", "Longest river"),
        pairs=(
            ("{s}最长的河是{o}。", "The longest river in {s} is the {o}."),
            ("{o}是{s}最长的河流。", "The {o} is the longest river in {s}."),
            ("{s}最长的河流是{o}。", "The longest river of {s} is the {o}."),
            ("{o}是{s}第一长河。", "The {o} is the longest river of {s}."),
        ),
        extra_zh=("{o}流经{s}，是那里最长的河。", "{s}第一长河是{o}。"),
        extra_en=("The {o} flows through {s} and is its longest river.", "No river in {s} is longer than the {o}."),
        questions_zh=("{s}最长的河是哪条？", "{s}最长的河流是什么？", "{s}最长的河叫什么？", "{s}第一长河是哪条河？"),
        requests=(("我想知道{s}最长的河。", "I want to know the longest river in {s}."), ("请说出{s}最长的河。", "Name the longest river in {s}.")),
        questions_en=("What is the longest river in {s}?", "Which river is the longest in {s}?",
                      "What's the longest river of {s}?"),
        heldout=(("在{s}，最长的河流是", "In {s}, the longest river is the"),
                 ("提到{s}，它最长的河是", "As for {s}, its longest river is the")),
        heldout_questions_zh=("在{s}，哪条河是最长的？", "{s}这个国家最长的河流是哪条？"),
        heldout_questions_en=("In {s}, which river is the longest?",
                              "Please give me the longest river in {s}."),
        followups_zh=("那它最长的河呢？", "它最长的河流是哪条？"),
        followups_en=("And its longest river?", "What about its longest river?"),
        pronoun=(("它最长的河流是{o}。", "Its longest river is the {o}."), ("它最长的河是{o}。", "Its longest river is the {o}.")),
    ),
    "planet_order": RelationText(
        label=("离太阳的次序", "Order from the Sun"),
        pairs=(
            ("{s}是离太阳{o}近的行星。", "{s} is the {o} planet from the Sun."),
            ("在太阳系中，{s}是距离太阳{o}近的行星。", "In the Solar System, {s} is the {o} planet from the Sun."),
            ("从太阳往外数，{s}排在{o}位。", "Counting outward from the Sun, {s} comes {o}."),
        ),
        extra_zh=("{s}是太阳系从内向外数的{o}颗行星。",),
        extra_en=("{s} orbits the Sun as the {o} planet.",),
        questions_zh=("{s}是离太阳第几近的行星？", "{s}是太阳系的第几颗行星？", "从太阳往外数，{s}排第几？"),
        requests=(("我想知道{s}是离太阳第几近的行星。", "I want to know which planet from the Sun {s} is."),),
        questions_en=("What position is {s} from the Sun?", "Which planet from the Sun is {s}?",
                      "Counting from the Sun, where does {s} come?"),
        heldout=(("在太阳系中，从太阳往外数，{s}是", "In the Solar System, counting from the Sun, {s} is the"),
                 ("提到{s}，它是离太阳", "As for {s}, it is the")),
        heldout_questions_zh=("在太阳系中，{s}是离太阳第几近的？", "从太阳往外数，{s}是第几颗行星？"),
        heldout_questions_en=("In the Solar System, which position from the Sun is {s}?",
                              "Please give me the position of {s} from the Sun."),
        followups_zh=("那它是离太阳第几近的行星？",),
        followups_en=("And what position is it from the Sun?",),
        pronoun=(("它是离太阳{o}近的行星。", "It is the {o} planet from the Sun."),),
    ),
    "planet_type": RelationText(
        label=("类型", "Type"),
        pairs=(
            ("{s}是一颗{o}。", "{s} is {a_o}."),
            ("天文学家把{s}归为{o}。", "Astronomers classify {s} as {a_o}."),
            ("从类型上看，{s}是一颗{o}。", "By type, {s} is {a_o}."),
        ),
        extra_zh=("{s}属于{o}。",),
        extra_en=("{s} belongs to the {o}s.",),
        questions_zh=("{s}是哪种类型的行星？", "{s}属于什么类型的行星？", "{s}是什么类型的行星？"),
        requests=(("我想知道{s}是什么类型的行星。", "I want to know what type of planet {s} is."),),
        questions_en=("What type of planet is {s}?", "What kind of planet is {s}?"),
        heldout=(("提到{s}，天文学家把它归为", "As for {s}, astronomers classify it as"),
                 ("在太阳系中，{s}的类型是", "In the Solar System, the type of {s} is")),
        heldout_questions_zh=("在太阳系中，{s}是哪种行星？", "天文学家把{s}归为什么类型？"),
        heldout_questions_en=("Which type of planet is {s}?",
                              "Please give me the type of the planet {s}."),
        followups_zh=("那它是什么类型的行星？",),
        followups_en=("And what type of planet is it?",),
        pronoun=(("它是一颗{o}。", "It is {a_o}."),),
    ),
    "largest_moon": RelationText(
        label=("最大卫星", "Largest moon"),
        pairs=(
            ("{s}最大的卫星是{o}。", "The largest moon of {s} is {o}."),
            ("{o}是{s}最大的卫星。", "{o} is the largest moon of {s}."),
            ("在{s}的卫星中，{o}最大。", "Among the moons of {s}, {o} is the largest."),
        ),
        extra_zh=("{s}最大的卫星叫{o}。",),
        extra_en=("The biggest moon of {s} is {o}.",),
        questions_zh=("{s}最大的卫星是什么？", "{s}最大的卫星叫什么？", "{s}最大的一颗卫星是哪颗？"),
        requests=(("我想知道{s}最大的卫星。", "I want to know the largest moon of {s}."), ("请说出{s}最大的卫星。", "Name the largest moon of {s}.")),
        questions_en=("What is the largest moon of {s}?", "Which is the biggest moon of {s}?",
                      "What is the biggest moon of {s}?"),
        heldout=(("在{s}的卫星中，最大的是", "Of the moons of {s}, the largest is"),
                 ("提到{s}，它最大的卫星是", "As for {s}, its largest moon is")),
        heldout_questions_zh=("在{s}的卫星中，哪颗是最大的？", "{s}这颗行星最大的卫星是哪颗？"),
        heldout_questions_en=("Among the moons of {s}, which is the largest?",
                              "Please give me the largest moon of {s}."),
        followups_zh=("那它最大的卫星呢？",),
        followups_en=("And its largest moon?",),
        pronoun=(("它最大的卫星是{o}。", "Its largest moon is {o}."),),
    ),
    "element_symbol": RelationText(
        label=("元素符号", "Symbol"),
        pairs=(
            ("{s}的元素符号是{o}。", "The chemical symbol of {s} is {o}."),
            ("{o}是{s}的元素符号。", "{o} is the chemical symbol for {s}."),
            ("{s}元素用符号{o}表示。", "The element {s} is written with the symbol {o}."),
        ),
        extra_zh=("化学中，{s}写作{o}。", "{s}的化学符号是{o}。"),
        extra_en=("In chemistry, {s} is written as {o}.", "The symbol for {s} is {o}."),
        questions_zh=("{s}的元素符号是什么？", "{s}的化学符号是什么？", "{s}元素用什么符号表示？"),
        requests=(("我想知道{s}的元素符号。", "I want to know the chemical symbol of {s}."), ("请说出{s}的元素符号。", "Name the chemical symbol of {s}.")),
        questions_en=("What is the chemical symbol of {s}?", "What is the symbol for {s}?", "Which symbol stands for {s}?"),
        heldout=(("在化学中，{s}的符号是", "In chemistry, the symbol of {s} is"),
                 ("提到{s}，它的元素符号是", "As for {s}, its chemical symbol is")),
        heldout_questions_zh=("在化学中，{s}用哪个符号？", "{s}这个元素的符号是什么？"),
        heldout_questions_en=("In chemistry, which symbol is used for {s}?",
                              "Please give me the chemical symbol of {s}."),
        followups_zh=("那它的元素符号呢？",),
        followups_en=("And its chemical symbol?",),
        pronoun=(("它的元素符号是{o}。", "Its chemical symbol is {o}."),),
    ),
    "atomic_number": RelationText(
        label=("原子序数", "Atomic number"),
        pairs=(
            ("{s}的原子序数是{o}。", "The atomic number of {s} is {o}."),
            ("{s}是第{o}号元素。", "{s} is element number {o}."),
            ("原子序数为{o}的元素是{s}。", "The element with atomic number {o} is {s}."),
        ),
        extra_zh=("{s}原子的原子核里有{o}个质子。",),
        extra_en=("In the periodic table, {s} has the atomic number {o}.",),
        questions_zh=("{s}的原子序数是多少？", "{s}是第几号元素？", "{s}的原子序数是几？"),
        requests=(("我想知道{s}的原子序数。", "I want to know the atomic number of {s}."), ("请说出{s}的原子序数。", "Name the atomic number of {s}.")),
        questions_en=("What is the atomic number of {s}?", "What element number is {s}?"),
        heldout=(("在化学中，{s}的原子序数是", "In chemistry, the atomic number of {s} is"),
                 ("提到{s}，它的原子序数是", "As for {s}, its atomic number is")),
        heldout_questions_zh=("{s}这个元素的原子序数是几？", "在化学中，{s}是第几号元素？"),
        heldout_questions_en=("In chemistry, what is the atomic number of {s}?",
                              "Please give me the atomic number of {s}."),
        followups_zh=("那它的原子序数是多少？",),
        followups_en=("And its atomic number?",),
        pronoun=(("它的原子序数是{o}。", "Its atomic number is {o}."),),
    ),
    "unit_conversion": RelationText(
        label=("换算", "Conversion"),
        pairs=(
            ("1{s}等于{o}。", "1 {s} equals {o}."),
            ("一{s}是{o}。", "One {s} is {o}."),
            ("{o}等于1{s}。", "{o} make 1 {s}."),
            ("一{s}有{n}{u}。", "There are {n} {u} in one {s}."),
        ),
        extra_zh=("换算关系：1{s} = {o}。", "记住：1{s}就是{o}。"),
        extra_en=("Conversion: 1 {s} = {o}.", "Remember: 1 {s} is the same as {o}."),
        questions_zh=("1{s}等于多少{u}？", "一{s}有多少{u}？", "1{s}是多少{u}？"),
        requests=(("我想知道1{s}等于多少{u}。", "I want to know how many {u} are in one {s}."),),
        questions_en=("How many {u} are in one {s}?", "How many {u} make 1 {s}?", "1 {s} equals how many {u}?"),
        heldout=(("记住这个换算：1{s}等于", "Remember this conversion: 1 {s} equals"),
                 ("提到{s}，1{s}等于", "As for the {s}, 1 {s} equals")),
        heldout_questions_zh=("请问1{s}等于多少个{u}？", "在换算中，1{s}是多少{u}？"),
        heldout_questions_en=("In {u}, how much is 1 {s}?",
                              "Please give me the number of {u} in 1 {s}."),
    ),
}

# Asking the same relation about another subject, after a first answer: "那日本呢？" / "What about Japan?"
SAME_RELATION_FOLLOWUPS = {"zh": ("那{s}呢？", "{s}呢？", "那么{s}呢？"), "en": ("What about {s}?", "And {s}?")}
# fmt: on


def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def tidy(text: str) -> str:
    """One full stop after an object that already ends with one ("Washington, D.C.." → "Washington, D.C.")."""
    return text.replace("..", ".")


def end(text: str, lang: str) -> str:
    """`text` closed as a sentence in `lang`."""
    return text + "。" if lang == "zh" else tidy(text + ".")


def fill(template: str, fact: Fact, lang: str) -> str:
    """Renders one template for one fact in `lang` (English sentences start with a capital letter)."""
    obj = fact.object(lang)
    text = template.format(
        s=fact.subject(lang),
        o=obj,
        a_o=article(obj),
        n=fact.number,
        u=fact.unit_zh if lang == "zh" else fact.unit_en,
    )
    return tidy(cap(text)) if lang == "en" else text


def heldout_sentence(prompt: str, fact: Fact, lang: str) -> str:
    """A held-out prompt completed with its object into a full sentence (for the translation eval)."""
    return end(fill(prompt, fact, lang) + ("" if lang == "zh" else " ") + fact.object(lang), lang)


def statement(fact: Fact, lang: str, rng: random.Random) -> str:
    return fill(rng.choice(TEXTS[fact.relation].statements(lang)), fact, lang)


def question(fact: Fact, lang: str, rng: random.Random) -> str:
    return fill(rng.choice(TEXTS[fact.relation].questions(lang)), fact, lang)


def pronoun_statement(fact: Fact, lang: str, rng: random.Random) -> str:
    """A statement about the subject just named (「它的首都是东京。」); a plain statement where the relation has none."""
    forms = TEXTS[fact.relation].pronoun
    if not forms:
        return statement(fact, lang, rng)
    return fill(rng.choice(forms)[0 if lang == "zh" else 1], fact, lang)


def training_renderings(fact: Fact, lang: str) -> list[str]:
    """Every training statement and question of `fact` in `lang` (used to prove held-out facts stay unseen)."""
    t = TEXTS[fact.relation]
    pronoun = tuple(p[0 if lang == "zh" else 1] for p in t.pronoun)
    return [fill(x, fact, lang) for x in (*t.statements(lang), *t.questions(lang), *pronoun)]


def heldout_renderings(fact: Fact, lang: str) -> list[str]:
    """Every held-out prompt and question of `fact` in `lang`."""
    t = TEXTS[fact.relation]
    return [fill(x, fact, lang) for x in (*t.heldout_prompts(lang), *t.heldout_questions(lang))]
