"""Multiple choice by log-likelihood for C-Eval, CMMLU and MMLU style files.

Each question is shown with its lettered choices and "Answer:"/"答案：", and the model's log-probability of each
answer letter decides (the MMLU paper's protocol, also lm-evaluation-harness'). The prompt is the harness' own,
character for character (its `mmlu`, `ceval-valid` and `cmmlu` templates: the answer follows the cue after one
space, " A", in Chinese too), so that a score here and the harness' score on the same items agree
(tests/test_lm_eval.py, benchmarks/lm_eval_match.py); the one difference left is the header, where the harness
names C-Eval/CMMLU subjects in Chinese and danlu uses the file name. Few-shot examples come from a dev split of the
same subject, the first N in file order (the harness' `first_n` sampler), never the question being asked.

Accuracy is reported per subject and overall, beside the random baseline (1/choices) and the row count, because a
tiny model's score only means something next to chance; beside it the share of always answering the commonest
correct letter, and the distribution of predicted letters (a model answering "B" to 107 of 150 questions scores
near chance without knowing anything, and the distribution shows it). Files are read in any encoding
(danlu.files); an empty file, a header with a gap in its choices or a row with an empty choice is an error, and a
file with fewer than four choices a warning.

Files read (header names as the benchmarks publish them):
- C-Eval:  id,question,A,B,C,D,answer[,explanation]     (answer a letter)
- CMMLU:   ,Question,A,B,C,D,Answer                      (answer a letter)
- MMLU:    question,choice0..choice3,answer              (answer an index 0–3), or the original header-less
           question,A,B,C,D,answer rows (answer a letter); JSONL with question, choices (a list) and answer too.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError

LETTERS = "ABCDEFGHIJ"
SPLIT_SUFFIX = re.compile(r"(_(dev|val|validation|test|train))$")
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str
    where: str  # file:line, for errors and examples


@dataclass
class Subject:
    name: str
    questions: list[Question] = field(default_factory=list)


def subject_name(path: Path) -> str:
    return SPLIT_SUFFIX.sub("", path.stem)


def _answer_index(value: str, n_choices: int, where: str) -> int:
    v = str(value).strip()
    if len(v) == 1 and v.upper() in LETTERS:
        idx = LETTERS.index(v.upper())
    elif v.lstrip("-").isdigit():
        idx = int(v)
    else:
        raise DanluError(
            f"{where}: answer {value!r} is neither a letter ({LETTERS[:n_choices]}) nor an index"
        )
    if not 0 <= idx < n_choices:
        shown = LETTERS[idx] if v.isalpha() else v
        raise DanluError(
            f"{where}: answer {shown!r} is out of range: this question has {n_choices} choices "
            f"({LETTERS[:n_choices]} or 0–{n_choices - 1})"
        )
    return idx


def _columns(header: list[str], where: str = "") -> tuple[str | None, list[str], str | None]:
    """(question column, choice columns, answer column) from a header, matched case-insensitively. Choice columns
    must run from A (or choice0) without a gap: a file missing column C would otherwise be scored wrongly."""
    lower = {h.strip().lower(): h for h in header}
    q = lower.get("question")
    letters = [c for c in LETTERS if c.lower() in lower]
    numbered = [i for i in range(len(LETTERS)) if f"choice{i}" in lower]
    if len(letters) >= 2:
        if letters != list(LETTERS[: len(letters)]):
            raise DanluError(f"{where}: choice columns {', '.join(letters)} have a gap (expected A, B, C, …)")
        choices = [lower[c.lower()] for c in letters]
    else:
        if numbered and numbered != list(range(len(numbered))):
            raise DanluError(
                f"{where}: choice columns choice{', choice'.join(map(str, numbered))} have a gap"
            )
        choices = [lower[f"choice{i}"] for i in numbered]
    return q, choices, lower.get("answer")


def read_csv(path: Path, subject: str | None = None, encoding: str | None = None) -> list[Question]:
    from danlu.files import bad_byte_error, open_text

    subject = subject or subject_name(path)
    try:
        with open_text(path, encoding, newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise bad_byte_error(path, f.encoding) from None
    if not rows:
        raise DanluError(f"{path}: empty file (no header, no questions)")
    q_col, choice_cols, a_col = _columns(rows[0], f"{path}:1")
    if q_col is None and len(rows[0]) >= 4 and _looks_like_answer(rows[0][-1], len(rows[0]) - 2):
        # the original MMLU release: no header, question, choices…, answer letter
        header, body, first_line = None, rows, 1
    else:
        missing = [name for name, ok in (("question", q_col), ("answer", a_col)) if not ok]
        if len(choice_cols) < 2:
            missing.append("choices (A,B,C,D or choice0..choice3)")
        if missing:
            raise DanluError(
                f"{path}:1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; found columns "
                f"{', '.join(repr(h) for h in rows[0])}. Expected C-Eval (question,A,B,C,D,answer), "
                "CMMLU (Question,A,B,C,D,Answer) or MMLU (question,choice0..choice3,answer)"
            )
        header, body, first_line = rows[0], rows[1:], 2
    out = []
    for line, row in enumerate(body, first_line):
        where = f"{path}:{line}"
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            if len(row) < 4:
                raise DanluError(f"{where}: expected question, choices and answer; got {len(row)} cells")
            question, choices, answer = row[0], row[1:-1], row[-1]
        else:
            if len(row) != len(header):
                raise DanluError(f"{where}: {len(row)} cells, the header has {len(header)}")
            cell = dict(zip(header, row))
            question, choices, answer = cell[q_col], [cell[c] for c in choice_cols], cell[a_col]
            empty = [h for h in choice_cols if not cell[h].strip()]
            if empty:
                raise DanluError(
                    f"{where}: choice {', '.join(empty)} is empty; this file's header has {len(choice_cols)} "
                    f"choices ({', '.join(choice_cols)}) and every question must fill them"
                )
        # choices as the file has them: the harness' templates do not strip them (CMMLU has '根 '), the question yes
        out.append(Question(question.strip(), list(choices), _answer_index(answer, len(choices), where),
                            subject, where))  # fmt: skip
    if not out:
        raise DanluError(f"{path}: no questions (a header and no rows)")
    if header is not None and len(choice_cols) < 4:
        import sys

        print(f"[danlu] eval: WARNING: {path}: only {len(choice_cols)} choice columns ({', '.join(choice_cols)}): "
              f"scored as {len(choice_cols)}-choice questions (chance {1 / len(choice_cols):.0%}); C-Eval, CMMLU and "
              "MMLU have 4", file=sys.stderr)  # fmt: skip
    return out


def _looks_like_answer(value: str, n: int) -> bool:
    v = value.strip().upper()
    return len(v) == 1 and v in LETTERS[: max(n, 1)]


def read_jsonl(path: Path, subject: str | None = None, encoding: str | None = None) -> list[Question]:
    from danlu.files import read_records

    out = []
    for line, row in enumerate(read_records(path, encoding=encoding), 1):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DanluError(f"{where}: expected an object with question, choices and answer")
        choices = row.get("choices")
        if choices is None:
            choices = [row[c] for c in LETTERS if c in row] or None
        missing = [
            k
            for k, v in (
                ("question", row.get("question")),
                ("choices", choices),
                ("answer", row.get("answer")),
            )
            if v is None
        ]
        if missing:
            raise DanluError(f"{where}: missing {', '.join(missing)}; keys present: {', '.join(row)}")
        choices = [str(c) for c in choices]
        out.append(Question(str(row["question"]), choices, _answer_index(str(row["answer"]), len(choices), where),
                            str(row.get("subject") or subject or subject_name(path)), where))  # fmt: skip
    if not out:
        raise DanluError(f"{path}: empty file (no questions)")
    return out


def read_questions(path: str | Path, encoding: str | None = None) -> dict[str, Subject]:
    """Questions by subject from a CSV/JSONL file or a folder of them (one subject per file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".jsonl"))
        if not files:
            raise DanluError(f"{path}: no .csv or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise DanluError(f"{path}: no such file or folder")
    subjects: dict[str, Subject] = {}
    for f in files:
        qs = read_csv(f, encoding=encoding) if f.suffix == ".csv" else read_jsonl(f, encoding=encoding)
        for q in qs:
            subjects.setdefault(q.subject, Subject(q.subject)).questions.append(q)
    return subjects


def is_chinese(text: str) -> bool:
    return bool(CJK.search(text))


def format_question(q: Question, *, with_answer: bool) -> str:
    zh = is_chinese(q.question)
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    lines.append("答案：" if zh else "Answer:")
    text = "\n".join(lines)
    if with_answer:
        text += answer_text(q.answer) + "\n\n"
    return text


def answer_text(index: int) -> str:
    """The scored continuation for choice `index`: " A". One space after the cue in both languages, as the harness
    writes it (its target delimiter), so that both score the same tokens."""
    return " " + LETTERS[index]


def header(subject: str, zh: bool) -> str:
    name = subject.replace("_", " ")
    if zh:
        return f"以下是关于{name}的单项选择题，请选出其中的正确答案。\n\n"
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"


def build_prompt(q: Question, shots: list[Question]) -> str:
    return header(q.subject, is_chinese(q.question)) + "".join(
        format_question(s, with_answer=True) for s in shots
    ) + format_question(q, with_answer=False)  # fmt: skip


def _same_question(a: Question, b: Question) -> bool:
    """The question being asked, or a copy of it elsewhere in the file (MMLU's college_physics dev has one): never a
    few-shot example, or the prompt would hold its answer. The harness leaves out every equal row too."""
    return a is b or a.where == b.where or (a.question, a.choices) == (b.question, b.choices)


@dataclass
class ScoredQuestion:
    """One question as scored: the prompt shown, each choice's log-probability and the choice picked."""

    question: Question
    prompt: str
    logprobs: list[float]
    cut: bool  # the prompt lost its beginning to the model's window

    @property
    def prediction(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)


def score_questions(
    model: Any, tokenizer: Any, data: str | Path, *, dev: str | Path | None = None, shots: int = 0,
    limit: int = 0, batch_size: int = 16, encoding: str | None = None,
) -> list[ScoredQuestion]:  # fmt: skip
    """Every question of `data` (the first `limit` per subject) scored by the log-probability of each answer letter.

    Few-shot examples for a subject come from `dev` (a file or folder with the same subject names); without it,
    from the evaluated file itself, never the question being asked. Kept apart from the accuracy so that a caller
    can compare item by item (against lm-evaluation-harness: benchmarks/lm_eval_match.py).
    """
    from danlu.eval.loglik import loglikelihoods

    subjects = read_questions(data, encoding)
    dev_subjects = read_questions(dev, encoding) if dev else subjects
    window = model.config.max_position_embeddings
    requests: list[tuple[list[int], list[int]]] = []
    pending: list[tuple[Question, str, bool]] = []  # (question, prompt, cut) in request order
    for name, subj in subjects.items():
        qs = subj.questions[:limit] if limit else subj.questions
        pool = dev_subjects.get(name, Subject(name)).questions
        if shots and dev and name not in dev_subjects:
            raise DanluError(
                f"{dev}: no dev examples for subject {name!r} (have: {', '.join(dev_subjects) or 'none'})"
            )
        for q in qs:
            fewshot = [s for s in pool if not _same_question(s, q)][:shots] if shots else []
            prompt = build_prompt(q, fewshot)
            ctx = [tokenizer.bos_id, *tokenizer.encode(prompt)]
            conts = [tokenizer.encode(answer_text(i)) for i in range(len(q.choices))]
            cut = any(
                len(ctx) + len(c) > window + 1 for c in conts
            )  # loglikelihoods cuts these from the left
            requests += [(ctx, c) for c in conts]
            pending.append((q, prompt, cut))
    scores = loglikelihoods(model, requests, batch_size=batch_size, pad_id=tokenizer.pad_id,
                            vocab_size=tokenizer.vocab_size)  # fmt: skip
    out, pos = [], 0
    for q, prompt, cut in pending:
        n = len(q.choices)
        out.append(ScoredQuestion(q, prompt, [s for s, _ in scores[pos : pos + n]], cut))
        pos += n
    return out


def evaluate_multiple_choice(
    model: Any, tokenizer: Any, data: str | Path, *, dev: str | Path | None = None, shots: int = 0,
    limit: int = 0, batch_size: int = 16, keep_examples: int = 3, encoding: str | None = None, task: str = "mc",
) -> dict[str, Any]:  # fmt: skip
    """Accuracy per subject and overall (micro and macro), with the random baseline and row count beside each."""
    from danlu.eval.generative import warn_cut

    scored = score_questions(model, tokenizer, data, dev=dev, shots=shots, limit=limit, batch_size=batch_size,
                             encoding=encoding)  # fmt: skip
    window = model.config.max_position_embeddings
    per: dict[str, list[float]] = {}
    examples = []
    correct_total = 0
    baseline_total = 0.0
    predicted: dict[str, int] = {}
    gold: dict[str, int] = {}
    for item in scored:
        q, n, pred = item.question, len(item.logprobs), item.prediction
        ok = pred == q.answer
        correct_total += ok
        predicted[LETTERS[pred]] = predicted.get(LETTERS[pred], 0) + 1
        gold[LETTERS[q.answer]] = gold.get(LETTERS[q.answer], 0) + 1
        baseline_total += 1 / n
        acc = per.setdefault(q.subject, [0, 0, 0.0])
        acc[0] += ok
        acc[1] += 1
        acc[2] += 1 / n
        if len(examples) < keep_examples:
            examples.append({"question": q.question, "prediction": LETTERS[pred], "answer": LETTERS[q.answer],
                             "correct": ok, "where": q.where})  # fmt: skip
    n_cut = sum(item.cut for item in scored)
    n_total = max(1, len(scored))
    by_subject = {
        s: {"accuracy": round(c / t, 4), "n": t, "random": round(b / t, 4)}
        for s, (c, t, b) in sorted(per.items())
    }
    macro = sum(v["accuracy"] for v in by_subject.values()) / max(1, len(by_subject))
    warn_cut(task, n_cut, len(scored), window, "use fewer --shots or a longer-context model")
    top = max(predicted, key=predicted.__getitem__) if predicted else ""
    return {
        "accuracy": round(correct_total / n_total, 4),
        "accuracy_macro": round(macro, 4),
        "random": round(baseline_total / n_total, 4),
        # the chance lines: guessing uniformly (random), and always answering the commonest correct letter
        "majority_letter": round(max(gold.values(), default=0) / n_total, 4),
        "predicted_letters": dict(sorted(predicted.items())),
        "answer_letters": dict(sorted(gold.items())),
        "top_prediction_share": round(predicted.get(top, 0) / n_total, 4),
        "n": len(scored),
        "shots": shots,
        "prompts_truncated": n_cut,
        "subjects": by_subject,
        "examples": examples,
    }
