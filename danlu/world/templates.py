"""Phrasings of every relation: training templates, and HELD-OUT templates that no training text ever uses.

Why two sets: a model that answers 「中国最高的山是」 after reading 「中国最高的山是珠穆朗玛峰」 a hundred times may only
have memorized a string. The evaluation sets ask with held-out phrasings (「中国境内海拔最高的山峰名叫」), so a
correct answer shows the fact was learned, not the sentence. Held-out statement prompts are written as parallel
(zh, en) pairs ending right before the object: they serve the completion eval (prompt → object) and, with the
object appended, the translation eval (zh sentence ↔ en sentence).

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

    def statements(self, lang: str) -> tuple[str, ...]:
        i = 0 if lang == "zh" else 1
        return tuple(p[i] for p in self.pairs) + (self.extra_zh if lang == "zh" else self.extra_en)

    def questions(self, lang: str) -> tuple[str, ...]:
        return self.questions_zh if lang == "zh" else self.questions_en

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
        questions_en=("What is the capital of {s}?", "Which city is the capital of {s}?",
                      "What is the capital city of {s}?", "Do you know the capital of {s}?", "What's the capital of {s}?"),
        heldout=(("{s}的首都名叫", "The capital of {s} is named"),
                 ("提到{s}的首都，答案是", "When asked for the capital of {s}, the answer is")),
        heldout_questions_zh=("{s}的首都叫什么名字？", "哪座城市是{s}的首都？"),
        heldout_questions_en=("Which city serves as the national capital of {s}?", "Tell me the capital of {s}."),
        followups_zh=("那它的首都呢？", "它的首都是哪里？"),
        followups_en=("And its capital?", "What about its capital city?"),
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
        questions_en=("Which continent is {s} in?", "On which continent is {s}?", "What continent is {s} located in?",
                      "{s} is on which continent?"),
        heldout=(("{s}所在的大洲是", "The continent where {s} can be found is"),
                 ("从大洲来看，{s}归属于", "In terms of continents, {s} is part of")),
        heldout_questions_zh=("{s}坐落在哪一个大洲上？", "哪个大洲包含{s}？"),
        heldout_questions_en=("Which of the continents is home to {s}?", "Tell me the continent that {s} is part of."),
        followups_zh=("那它在哪个洲？", "它位于哪个大洲？"),
        followups_en=("And which continent is it in?", "What continent is it on?"),
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
        questions_en=("What is the currency of {s}?", "What currency does {s} use?", "Which currency is used in {s}?",
                      "What money do people use in {s}?"),
        heldout=(("{s}流通的钱币叫作", "The money that circulates in {s} is called the"),
                 ("要在{s}付款，得用", "To pay for things in {s} you need the")),
        heldout_questions_zh=("{s}的国家货币叫什么？", "在{s}购物要付哪种钱？"),
        heldout_questions_en=("Which currency would I need to pay in {s}?", "Tell me the name of the money used in {s}."),
        followups_zh=("那它用什么货币？", "它的货币是什么？"),
        followups_en=("And what currency does it use?", "What about its currency?"),
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
        questions_en=("What is the official language of {s}?", "Which language is official in {s}?",
                      "What official language does {s} use?"),
        heldout=(("{s}法定的官方用语是", "By law, the official tongue of {s} is"),
                 ("在{s}的政府机关里，使用的官方语言为", "In government offices in {s}, the official language used is")),
        heldout_questions_zh=("{s}以哪种语言作为官方语言？", "{s}的官方用语是哪一种？"),
        heldout_questions_en=("Which tongue is the official one in {s}?", "Tell me the official language of {s}."),
        followups_zh=("它的官方语言呢？", "那它的官方语言是什么？"),
        followups_en=("And its official language?", "What about its official language?"),
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
        questions_en=("What is the highest mountain in {s}?", "Which is the highest mountain in {s}?",
                      "What is the highest peak in {s}?", "What's the tallest mountain in {s}?"),
        heldout=(("{s}境内海拔最高的山峰名叫", "The loftiest summit anywhere in {s} is"),
                 ("在{s}所有的山里，最高的一座是", "Of all the mountains in {s}, the tallest one is")),
        heldout_questions_zh=("{s}境内哪座山峰的海拔最高？", "在{s}的所有山中，哪一座最高？"),
        heldout_questions_en=("Which summit in {s} rises higher than any other?",
                              "Among all the mountains in {s}, which one is the tallest?"),
        followups_zh=("那它最高的山呢？", "它最高的山是哪座？"),
        followups_en=("And its highest mountain?", "What about its highest mountain?"),
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
        questions_en=("What is the longest river in {s}?", "Which river is the longest in {s}?",
                      "What's the longest river of {s}?"),
        heldout=(("论长度，{s}排名第一的河流是", "Measured by length, the number one river in {s} is the"),
                 ("{s}的河流当中，长度最长的那条是", "Among the rivers of {s}, the one with the greatest length is the")),
        heldout_questions_zh=("{s}哪一条河流的长度排第一？", "{s}的河流里哪条最长？"),
        heldout_questions_en=("Which river in {s} has the greatest length?", "Tell me the longest river flowing in {s}."),
        followups_zh=("那它最长的河呢？", "它最长的河流是哪条？"),
        followups_en=("And its longest river?", "What about its longest river?"),
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
        questions_en=("What position is {s} from the Sun?", "Which planet from the Sun is {s}?",
                      "Counting from the Sun, where does {s} come?"),
        heldout=(("由内往外排，{s}在八大行星中位列", "Going outward from the Sun, {s} is the"),
                 ("数一数太阳系的行星，从内侧起算，{s}排", "Listing the planets by distance from the Sun, {s} ranks")),
        heldout_questions_zh=("按照与太阳的距离，{s}排在第几位？", "{s}在八大行星里离太阳的远近排第几？"),
        heldout_questions_en=("In order of distance from the Sun, what place does {s} take?",
                              "Tell me where {s} ranks among the planets by distance from the Sun."),
        followups_zh=("那它是离太阳第几近的行星？",),
        followups_en=("And what position is it from the Sun?",),
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
        questions_en=("What type of planet is {s}?", "What kind of planet is {s}?"),
        heldout=(("按照行星的分类方法，{s}被划入", "Under planetary classification, {s} is a kind of"),
                 ("就类型而言，{s}算是一颗", "Scientists describe {s} as a type of")),
        heldout_questions_zh=("{s}在行星分类里算哪一类？", "天文学上{s}被归入哪一类行星？"),
        heldout_questions_en=("How would astronomers categorise {s}?", "Which category of planet does {s} fall into?"),
        followups_zh=("那它是什么类型的行星？",),
        followups_en=("And what type of planet is it?",),
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
        questions_en=("What is the largest moon of {s}?", "Which is the biggest moon of {s}?",
                      "What is the biggest moon of {s}?"),
        heldout=(("环绕{s}运行的卫星里，个头最大的是", "Of the satellites that orbit {s}, the biggest is"),
                 ("{s}的天然卫星中体积最大的一颗叫", "The largest natural satellite of {s} is")),
        heldout_questions_zh=("绕着{s}转的卫星中哪颗最大？", "{s}的天然卫星里个头最大的是哪一颗？"),
        heldout_questions_en=("Which natural satellite of {s} is the biggest?",
                              "Tell me the largest of the moons circling {s}."),
        followups_zh=("那它最大的卫星呢？",),
        followups_en=("And its largest moon?",),
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
        questions_en=("What is the chemical symbol of {s}?", "What is the symbol for {s}?", "Which symbol stands for {s}?"),
        heldout=(("在元素周期表上，{s}对应的字母记号是", "On the periodic table, the letters that stand for {s} are"),
                 ("写化学式时，代表{s}的符号为", "When writing chemical formulas, {s} is abbreviated as")),
        heldout_questions_zh=("周期表里{s}用哪个字母代号？", "{s}这种元素的缩写符号怎么写？"),
        heldout_questions_en=("How is {s} abbreviated on the periodic table?",
                              "Which letters represent {s} in chemical formulas?"),
        followups_zh=("那它的元素符号呢？",),
        followups_en=("And its chemical symbol?",),
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
        questions_en=("What is the atomic number of {s}?", "What element number is {s}?"),
        heldout=(("按原子序数排列，{s}对应的数字是", "Ordered by atomic number, the number belonging to {s} is"),
                 ("{s}原子核内的质子数目是", "The count of protons inside the {s} nucleus is")),
        heldout_questions_zh=("{s}在周期表上排第几号？", "{s}的原子核中有几个质子？"),
        heldout_questions_en=("How many protons does the {s} nucleus contain?",
                              "Where does {s} sit in the periodic table by number?"),
        followups_zh=("那它的原子序数是多少？",),
        followups_en=("And its atomic number?",),
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
        questions_en=("How many {u} are in one {s}?", "How many {u} make 1 {s}?", "1 {s} equals how many {u}?"),
        heldout=(("换算一下，1{s}折合", "Converted, a single {s} amounts to"),
                 ("把1{s}换成{u}来算，结果是", "Expressed in {u}, one {s} comes to")),
        heldout_questions_zh=("1{s}能换算成几{u}？", "把一{s}换成{u}，是多少？"),
        heldout_questions_en=("If I convert one {s} into {u}, what do I get?", "What does a single {s} equal in {u}?"),
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


def training_renderings(fact: Fact, lang: str) -> list[str]:
    """Every training statement and question of `fact` in `lang` (used to prove held-out facts stay unseen)."""
    t = TEXTS[fact.relation]
    return [fill(x, fact, lang) for x in (*t.statements(lang), *t.questions(lang))]


def heldout_renderings(fact: Fact, lang: str) -> list[str]:
    """Every held-out prompt and question of `fact` in `lang`."""
    t = TEXTS[fact.relation]
    return [fill(x, fact, lang) for x in (*t.heldout_prompts(lang), *t.heldout_questions(lang))]
