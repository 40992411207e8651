"""Each task format on the real benchmark files in ../shared/data (C-Eval, CMMLU, MMLU dev; GSM8K), tiny model.

A random 1-layer model scores near chance; what these prove is that the real files parse (headers, answer letters
and indices, quoting, multi-line explanations) and run end to end. Skipped where ../shared/data is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from danlu.eval.multiple_choice import read_questions
from danlu.eval.tasks import EvalOptions, run_tasks
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
    res = run_tasks(ckpt, [bench], EvalOptions(data=str(one), shots=1, limit=3))[bench]
    assert res["n"] == 3 and res["random"] == 0.25 and 0 <= res["accuracy"] <= 1


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
