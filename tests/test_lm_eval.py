"""Compatibility: lm-evaluation-harness runs offline on a danlu checkpoint through its standard `hf` model type.

The task is a local YAML task over a JSONL file the test writes, so nothing is downloaded: this proves a user can
point the standard harness (and its hundreds of tasks) at any model danlu exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TASK_YAML = """task: danlu_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_harness_scores_a_danlu_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = [
        {"question": "日本的首都是", "choices": ["东京", "大阪", "京都"], "answer": 0},
        {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0},
        {"question": "中国最高的山是", "choices": ["泰山", "珠穆朗玛峰", "华山"], "answer": 1},
        {"question": "12 + 34 =", "choices": [" 46", " 47", " 45"], "answer": 0},
    ]
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "danlu_capitals.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_checkpoint},dtype=float32",
        tasks=["danlu_capitals"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4,
        device="cpu",
    )
    res = out["results"]["danlu_capitals"]
    acc = res.get("acc,none", res.get("acc"))
    assert acc is not None and 0.0 <= acc <= 1.0
    assert out["n-samples"]["danlu_capitals"]["effective"] == len(rows)
