"""Numbers in words (七十八, seventy-eight) and the arithmetic problems of the world corpus.

Small arithmetic is answered directly and must be learned by the model; big arithmetic is answered through the
`calculator` tool. The line between them is one rule (`is_small`) used by every generator, so the model can learn
when to call the tool. Some two-digit additions/subtractions are HELD OUT (`is_heldout`, a hash of the seed and
the operands): no training text contains them, and the arithmetic eval asks exactly those.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

_ZH_DIGITS = "零一二三四五六七八九"
_EN_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_EN_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

OPS = ("+", "-", "×", "÷")
OP_ZH = {"+": "加", "-": "减", "×": "乘以", "÷": "除以"}
OP_EN = {"+": "plus", "-": "minus", "×": "times", "÷": "divided by"}
OP_ASCII = {"+": "+", "-": "-", "×": "*", "÷": "/"}
HELDOUT_EVERY = 8  # about one in eight two-digit additions/subtractions is held out


def zh_number(n: int) -> str:
    """Standard Chinese reading of an integer: 56 → 五十六, 105 → 一百零五, 12345 → 一万二千三百四十五."""
    if n < 0:
        return "负" + zh_number(-n)
    if n == 0:
        return "零"
    if n >= 10**12:
        raise ValueError(f"{n} is too large")
    sections = [(n // 10**8, "亿"), (n // 10**4 % 10**4, "万"), (n % 10**4, "")]
    out, zero = "", False
    for value, name in sections:
        if value == 0:
            zero = zero or bool(out)
            continue
        zero = zero or (bool(out) and value < 1000)
        part = ""
        for digit, unit in zip(f"{value:04d}", ("千", "百", "十", "")):
            d = int(digit)
            if d == 0:
                zero = zero or bool(part)
                continue
            if zero and (out or part):
                part += "零"
            zero = False
            part += unit if (d == 1 and unit == "十" and not out and not part) else _ZH_DIGITS[d] + unit
        out += part + name
        zero = False
    return out


def en_number(n: int) -> str:
    """English words: 56 → fifty-six, 105 → one hundred and five (below one million)."""
    if n < 0:
        return "minus " + en_number(-n)
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + _EN_ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _EN_ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + en_number(rest))
    if n < 10**6:
        rest = n % 1000
        joiner = " and " if 0 < rest < 100 else " "
        return en_number(n // 1000) + " thousand" + ("" if rest == 0 else joiner + en_number(rest))
    raise ValueError(f"{n} is too large")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # one of OPS
    b: int

    @property
    def result(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        if self.op == "×":
            return self.a * self.b
        return self.a // self.b

    def expression(self, spaced: bool = True, ascii_ops: bool = False) -> str:
        op = OP_ASCII[self.op] if ascii_ops else self.op
        return f"{self.a} {op} {self.b}" if spaced else f"{self.a}{op}{self.b}"


def phrase_problem(template: str, p: Problem, lang: str) -> str:
    """A question template with slots {a}, {op}, {b} filled: the operator as a word (加, plus), operands in digits."""
    return template.format(a=p.a, b=p.b, op=OP_ZH[p.op] if lang == "zh" else OP_EN[p.op])


def worked_steps(p: Problem) -> list[str] | None:
    """The column equations of `worked_solution` (ones, then tens), compact: ["6+8=14", "4+2+1=7"]; None where
    the problem is answered directly. RL prompts carry them so a reward can credit each right step."""
    if p.op not in "+-" or not is_small(p) or max(p.a, p.b) < 10:
        return None
    (a1, a0), (b1, b0) = divmod(p.a, 10), divmod(p.b, 10)
    if p.op == "+":
        carry = int(a0 + b0 >= 10)
        return [f"{a0}+{b0}={a0 + b0}", f"{a1}+{b1}" + ("+1" if carry else "") + f"={a1 + b1 + carry}"]
    borrow = int(a0 < b0)
    return [
        f"{a0 + 10 * borrow}-{b0}={a0 + 10 * borrow - b0}",
        f"{a1}" + ("-1" if borrow else "") + f"-{b1}={a1 - borrow - b1}",
    ]


def worked_solution(
    p: Problem, lang: str, result: int | None = None, columns: Problem | None = None
) -> str | None:
    """Column arithmetic, ones then tens, for +/− of numbers below 100 with a two-digit operand; None otherwise.

    Why: a small model cannot add two-digit numbers it never saw in one step, but each column is a one-digit fact
    it has seen many times. Written out, the answer is a chain of known steps, and the last number is the result
    (what the arithmetic reward and eval check), so RL can improve the steps. Rejected answers of preference pairs
    bend it: `result` replaces the final number (a conclusion that does not follow from the steps), `columns`
    works another problem's columns and concludes about `p` with that problem's result (a misread operand).
    """
    worked = columns or p
    steps = worked_steps(worked)
    if steps is None:
        return None
    zh = lang == "zh"
    ones, tens = (
        steps if zh else [e.replace("+", " + ").replace("-", " - ").replace("=", " = ") for e in steps]
    )
    a0, b0 = worked.a % 10, worked.b % 10
    if worked.op == "+" and a0 + b0 >= 10:
        ones += f"，写{a0 + b0 - 10}进1" if zh else f", write {a0 + b0 - 10}, carry 1"
    if worked.op == "-" and a0 < b0:
        ones = (f"{a0}不够减{b0}，借1：" if zh else f"{a0} < {b0}, borrow 1: ") + ones
    c = worked.result if result is None else result
    if zh:
        return f"个位：{ones}；十位：{tens}；所以{p.a}{p.op}{p.b}={c}。"
    return f"Ones: {ones}. Tens: {tens}. So {p.a} {p.op} {p.b} = {c}."


def misread(p: Problem, rng: random.Random) -> Problem | None:
    """The problem a careless solver works instead of `p`: one operand digit copied wrong, or + and − swapped —
    the mistakes a small model makes on unseen sums ("90减25" worked as 0+4 in the ones). None if `p` has no
    worked solution."""
    if worked_steps(p) is None:
        return None
    candidates = [Problem(p.a, "-" if p.op == "+" else "+", p.b)]
    for which in ("a", "b"):
        n = getattr(p, which)
        for place in (1, 10):
            digit = n // place % 10
            for d in range(10):
                if d != digit and not (place == 10 and d == 0):
                    m = n + (d - digit) * place
                    candidates.append(Problem(m, p.op, p.b) if which == "a" else Problem(p.a, p.op, m))
    valid = [c for c in candidates if worked_steps(c) is not None and c.result != p.result]
    return rng.choice(valid) if valid else None


def is_small(p: Problem) -> bool:
    """Answered without a tool: +/− of numbers below 100, × and ÷ within the 12×12 table."""
    if p.op in "+-":
        return 0 <= p.a < 100 and 0 <= p.b < 100 and p.result >= 0
    if p.op == "×":
        return 0 <= p.a <= 12 and 0 <= p.b <= 12
    return 1 <= p.b <= 12 and p.a % p.b == 0 and 0 <= p.a // p.b <= 12


def is_heldout(p: Problem, seed: int) -> bool:
    """Two-digit additions and subtractions reserved for the eval (never in any training text)."""
    if p.op not in "+-" or not (10 <= p.a < 100 and 10 <= p.b < 100):
        return False
    return zlib.crc32(f"{seed}:{p.a}{p.op}{p.b}".encode()) % HELDOUT_EVERY == 0


def random_small(rng: random.Random, op: str | None = None) -> Problem:
    op = op or rng.choice(OPS)
    if op == "+":
        return Problem(rng.randint(0, 99), "+", rng.randint(0, 99))
    if op == "-":
        a = rng.randint(0, 99)
        return Problem(a, "-", rng.randint(0, a))
    if op == "×":
        return Problem(rng.randint(1, 12), "×", rng.randint(1, 12))
    b, q = rng.randint(1, 12), rng.randint(0, 12)
    return Problem(b * q, "÷", b)


def training_small(rng: random.Random, seed: int, op: str | None = None) -> Problem:
    """A small problem that is not held out."""
    while True:
        p = random_small(rng, op)
        if not is_heldout(p, seed):
            return p


def training_column_problem(rng: random.Random, seed: int) -> Problem:
    """A training +/− problem that is worked in columns (`worked_steps`): what RL and the misread pairs practise."""
    while True:
        p = training_small(rng, seed, rng.choice("+-"))
        if worked_steps(p) is not None:
            return p


def heldout_small(rng: random.Random, seed: int) -> Problem:
    """A held-out two-digit addition or subtraction."""
    while True:
        op = rng.choice("+-")
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        p = Problem(a, op, b)
        if is_heldout(p, seed):
            return p


_WRITTEN_TABLE = re.compile(r"(?<![\d.])(\d{1,3}) ?([×÷]) ?(\d{1,3})(?![\d.])")


def written_table_problems(texts: Iterable[str]) -> set[Problem]:
    """The × and ÷ problems of the 12×12 table that `texts` write with digits ("7 × 8", "56÷7"): what the eval may
    call seen in training (a pair written only in words is left out, which can only make the set smaller)."""
    out = set()
    for text in texts:
        for a, op, b in _WRITTEN_TABLE.findall(text):
            p = Problem(int(a), op, int(b))
            if is_small(p):
                out.add(p)
    return out


def big_expression(rng: random.Random) -> str:
    """An expression for the calculator tool (ASCII operators, as the tool call writes it)."""
    kind = rng.random()
    if kind < 0.45:
        return f"{rng.randint(100, 99999)}*{rng.randint(13, 9999)}"
    if kind < 0.65:
        return f"{rng.randint(1000, 999999)}+{rng.randint(1000, 999999)}"
    if kind < 0.8:
        a, b = rng.randint(1000, 999999), rng.randint(100, 99999)
        return f"{max(a, b)}-{min(a, b)}"
    if kind < 0.92:
        b = rng.randint(13, 999)
        if rng.random() < 0.5:
            return f"{b * rng.randint(13, 9999)}/{b}"
        return f"{rng.randint(1000, 999999)}/{b}"
    return f"({rng.randint(100, 9999)}+{rng.randint(100, 9999)})*{rng.randint(13, 999)}"


def pretty_expression(expr: str) -> str:
    """12345*6789 → 12345 × 6789 (how a person writes it)."""
    out = expr.replace("*", " × ").replace("/", " ÷ ").replace("+", " + ")
    if "-" in out:
        out = out.replace("-", " - ")
    return out.replace("( ", "(").replace(" )", ")")
