"""lm-evaluation-harness on danlu checkpoints, offline, through its standard `hf` model type.

First, compatibility: a local YAML task over a JSONL file the test writes (nothing is downloaded), so a user can point
the harness and its hundreds of tasks at any model danlu exports. Then agreement: the harness' own C-Eval, CMMLU, MMLU
and GSM8K templates on real items (../shared/data; skipped where absent) score the same checkpoint as danlu's
evaluator does, item by item: the same prompt text, each choice's log-likelihood within 1e-4, the same answer, the
same greedy completion and verdict (danlu.eval.lm_eval_tasks; full numbers: benchmarks/lm_eval_match.py).
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


# ───────────── danlu's evaluator against the harness on real benchmark items (../shared/data) ─────────────


def _random_checkpoint(folder: Path, tokenizer, family: str = "llama", scale: float = 1.0) -> Path:
    """A random model whose embedding has exactly the tokenizer's rows (no padding rows: danlu masks those and the
    harness does not, which shifts every log-likelihood by the same constant), saved as danlu writes it (llama) or
    as transformers does (qwen2, an imported family). `scale` sharpens the logits, so that greedy text varies with
    the prompt and now and then holds digits."""
    import torch
    import transformers

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer

    torch.manual_seed(0)
    if family == "llama":
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, depth=1, max_position_embeddings=2048)
        model = Transformer(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        save_model_dir(folder, model.state_dict(), cfg, tokenizer, {"stage": "test"}, chat=False)
        return folder
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )  # fmt: skip
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05).mul_(scale)
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_multiple_choice_matches_the_harness_item_by_item(
    family: str, shared_data: Path, tiny_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    """C-Eval, CMMLU and MMLU dev items, 1-shot, scored by danlu and by the harness' own templates: the same prompt
    text, each choice's log-likelihood within 1e-4 and the same answer on every item."""
    pytest.importorskip("lm_eval")
    from danlu.eval.lm_eval_tasks import compare_multiple_choice

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    ckpt = _random_checkpoint(tmp_path / "ckpt", tiny_tokenizer, family)
    for bench in ("ceval", "cmmlu", "mmlu"):
        files = sorted((shared_data / bench / "dev").glob("*.csv"))[:2]
        res = compare_multiple_choice(ckpt, bench, files, folder=tmp_path / bench, shots=1, limit=2)
        assert res["items"] == 4 and res["chance"] == 0.25
        assert res["same_prompt"] == 4, res["differ"]
        assert res["max_abs_loglik_diff"] < 1e-4 and res["same_choice"] == 4, res
        assert res["danlu_accuracy"] == res["harness_accuracy"]


def test_gsm8k_matches_the_harness_item_by_item(
    shared_data: Path, tiny_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    """Real GSM8K items, 1-shot, greedy: the same completion text and the same verdict on every item."""
    pytest.importorskip("lm_eval")
    from danlu.eval.lm_eval_tasks import compare_gsm8k
    from danlu.files import read_records

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = []
    for row in read_records(shared_data / "gsm8k" / "train.jsonl"):
        rows.append(row)
        if len(rows) == 7:
            break
    ckpt = _random_checkpoint(tmp_path / "ckpt", tiny_tokenizer, scale=4.0)
    res = compare_gsm8k(ckpt, rows[:1], rows[1:], folder=tmp_path / "gsm8k", max_tokens=12, batch_size=3)
    assert res["items"] == 6 and res["same_completion"] == 6, res["differ"]
    assert res["differ"] == [] and res["same_verdict_strict"] == 6
    assert res["danlu_accuracy"] == res["harness_flexible"] == res["harness_strict"]


@pytest.mark.parametrize(
    ("completion", "danlu", "strict", "flexible"),
    [
        ("She pays 3 * 6 = 18 dollars.\n#### 18", True, True, True),
        ("#### 1,800", True, True, True),  # thousands separators: ignored by both
        ("So the answer is $18.", True, False, True),  # no "####": danlu and flexible take the last number
        (
            "#### 18\nQuestion 2 asks 7",
            True,
            True,
            False,
        ),  # danlu prefers "####" as strict does; flexible: last
        ("18.00", True, False, False),  # danlu compares numbers; the harness strings
        ("no number at all", False, False, False),
    ],
)
def test_gsm8k_answer_rules_against_the_harness_filters(
    completion: str, danlu: bool, strict: bool, flexible: bool
) -> None:
    """How danlu's GSM8K verdict relates to the harness' two filters, with the reference '#### 18' (or 1800): the
    cases where they agree, and the stated ones where they do not."""
    pytest.importorskip("lm_eval")
    from danlu.eval.generative import extract_prediction, extract_reference
    from danlu.eval.lm_eval_tasks import harness_gsm8k_verdicts

    reference = "work…\n#### 1,800" if "1,800" in completion else "work…\n#### 18"
    assert (extract_prediction(completion) == extract_reference(reference)) is danlu
    assert harness_gsm8k_verdicts(completion, reference) == {
        "strict-match": strict,
        "flexible-extract": flexible,
    }


def test_gsm8k_references_read_the_same_by_both(shared_data: Path) -> None:
    """Every GSM8K reference answer, given as the completion, is right for danlu and for the harness' strict filter."""
    pytest.importorskip("lm_eval")
    from danlu.eval.generative import extract_prediction, extract_reference
    from danlu.eval.lm_eval_tasks import harness_gsm8k_verdicts
    from danlu.files import read_records

    rows = list(read_records(shared_data / "gsm8k" / "train.jsonl"))[:500]
    assert all(extract_prediction(r["answer"]) == extract_reference(r["answer"]) for r in rows)
    assert all(harness_gsm8k_verdicts(r["answer"], r["answer"])["strict-match"] for r in rows)
