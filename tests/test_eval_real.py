"""Each task format on the real benchmark files in ../shared/data (C-Eval, CMMLU, MMLU dev; GSM8K), tiny model.

A random 1-layer model scores near chance; what these prove is that the real files parse (headers, answer letters
and indices, quoting, multi-line explanations) and run end to end. Skipped where ../shared/data is absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from danlu.eval.multiple_choice import read_questions
from danlu.eval.tasks import EvalOptions, letter_lines, run_tasks, table_rows
from danlu.io import load_checkpoint


@pytest.mark.parametrize("bench", ["ceval", "cmmlu", "mmlu"])
def test_real_multiple_choice_files_parse_and_score(
    bench: str, shared_data: Path, tiny_checkpoint: Path
) -> None:
    folder = shared_data / bench / "dev"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    subjects = read_questions(folder)
    questions = [q for s in subjects.values() for q in s.questions]
    assert len(subjects) > 5 and len(questions) > 200
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 and q.question for q in questions)
    assert len({q.answer for q in questions}) == 4  # letters and indices both map onto all four choices
    one = sorted(folder.glob("*.csv"))[0]
    ckpt = load_checkpoint(tiny_checkpoint)
    results = run_tasks(ckpt, [bench], EvalOptions(data=str(one), shots=1, limit=3))
    res = results[bench]
    assert res["n"] == 3 and res["random"] == 0.25 and 0 <= res["accuracy"] <= 1
    # every report line of a multiple-choice result carries its chance line and row count
    (row,) = [r for r in table_rows(results) if r[0] == bench]
    assert row[-2:] == ("0.2500", "3")  # (…, random, n): the last two columns
    (line,) = letter_lines(results)
    assert "chance 0.2500 (uniform)" in line and re.search(r"; n 3\b", line)


def test_real_gsm8k_references_and_a_short_run(
    shared_data: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from danlu.eval.generative import extract_reference
    from danlu.files import read_records

    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = []
    for row in read_records(path):
        rows.append(row)
        if len(rows) == 200:
            break
    assert all(extract_reference(r["answer"]).lstrip("-").replace(".", "", 1).isdigit() for r in rows)
    assert extract_reference(rows[0]["answer"]) == "72"
    small = tmp_path / "gsm8k.jsonl"
    import json

    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]), encoding="utf-8")
    res = run_tasks(
        load_checkpoint(tiny_checkpoint), ["gsm8k"], EvalOptions(data=str(small), max_tokens=8, batch_size=2)
    )
    assert res["gsm8k"]["n"] == 4


def test_a_duplicated_question_is_never_its_own_shot(shared_data: Path, tiny_checkpoint: Path) -> None:
    """MMLU's college_physics dev file holds one question twice (lines 2 and 5): the copy must not be the few-shot
    example of the other, or the prompt would carry the answer to the question asked (the harness skips it too)."""
    from danlu.eval.multiple_choice import score_questions

    path = shared_data / "mmlu" / "dev" / "college_physics_dev.csv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ckpt = load_checkpoint(tiny_checkpoint)
    scored = score_questions(ckpt.model, ckpt.tokenizer, path, shots=1)
    first, dup = scored[0], scored[3]
    assert dup.question.question == first.question.question and dup.question.where != first.question.where
    assert dup.prompt.count(dup.question.question) == 1  # asked once, not shown answered before
    assert scored[1].question.question in dup.prompt  # the next question in the file is the shot instead
