"""The `detect` pipeline stage on a tiny run: the world corpus, a random 1-layer model as the run's finished `sft`
(and a second one as `dpo`, the unseen generator), and a small real-text folder written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.runner import STAGES, run_pipeline


def _finished(run: Path, stage: str) -> None:
    (run / stage / "stage.json").write_text(
        json.dumps({"fingerprint": "test", "metrics": {}, "finished_at": 0})
    )


@pytest.fixture(scope="module")
def run_base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A run folder with world, sft and dpo finished (the models are random; the stage only needs them to generate)."""
    from conftest import make_checkpoint

    run = tmp_path_factory.mktemp("detect_run")
    run_pipeline({"seed": 0, "world": {"scale": 0.05}}, run)
    for stage, seed in (("sft", 0), ("dpo", 1)):
        make_checkpoint(run / stage, tiny_tokenizer, seed=seed)
        _finished(run, stage)
    return run


def _real_folder(root: Path) -> Path:
    """Two of the real sources, so the stage also has to say which ones it did not find."""
    (root / "kdconv" / "film").mkdir(parents=True)
    dialogs = [{"messages": [{"message": f"我觉得这部电影的第{i}个镜头拍得特别好看。"}]} for i in range(12)]
    (root / "kdconv" / "film" / "dev.json").write_text(
        json.dumps(dialogs, ensure_ascii=False), encoding="utf-8"
    )
    (root / "llamafactory_demo").mkdir()
    outputs = [
        {"instruction": "q", "output": f"Here is a detailed answer number {i} to your question."}
        for i in range(12)
    ]
    (root / "llamafactory_demo" / "alpaca_en_demo.json").write_text(json.dumps(outputs), encoding="utf-8")
    return root


def _recipe(detect: dict) -> dict:
    return {"seed": 0, "world": {"scale": 0.05}, "sft": {}, "dpo": {}, "detect": detect}


SMALL = {"prompts": 24, "max_new_tokens": 8, "max_tokens": 64, "batch_size": 16, "eval_share": 0.2,
         "train": {"steps": 3, "batch_size": 4, "device": "cpu", "log_every": 1}}  # fmt: skip


def test_stage_is_registered_between_eval_and_export() -> None:
    assert STAGES.index("eval") < STAGES.index("detect") < STAGES.index("export")


def test_detect_stage_reports_three_sets_and_writes_a_loadable_classifier(
    run_base: Path, tmp_path: Path
) -> None:
    from danlu.detect.classifier import Detector

    run = tmp_path / "run"
    shutil.copytree(run_base, run)
    real = _real_folder(tmp_path / "real")
    summary = run_pipeline(_recipe({**SMALL, "real": 5, "real_data": str(real)}), run, only=["detect"])
    m = summary["stages"]["detect"]
    assert json.loads((run / "detect" / "stage.json").read_text())["metrics"] == m
    held = 24 - round(0.8 * 24)
    for name in ("a_in_distribution", "b_unseen_temperature", "b_unseen_model_dpo"):
        assert m[f"{name}/n_human"] == held  # scored on the held-out prompts' answers only
        assert 0 < m[f"{name}/n_machine"] <= held * (2 if name == "b_unseen_temperature" else 1)
        for scorer in ("fine-tuned", "fast-detectgpt", "binoculars"):
            assert 0.0 <= m[f"{name}/{scorer}/auroc"] <= 1.0
            assert 0.0 <= m[f"{name}/{scorer}/tpr_at_1fpr"] <= 1.0
    assert (m["c_real/n_human"], m["c_real/n_machine"]) == (5, 10)  # 5 KdConv turns vs 2×5 alpaca outputs
    assert "poetry: not found" in m["c_real/skipped"] and "tinyshakespeare: not found" in m["c_real/skipped"]
    assert "b_unseen_model/skipped" not in m and m["steps"] == 3
    assert "no pretrain model" in m["binoculars/skipped"]

    results = json.loads((run / "detect" / "results.json").read_text())
    assert set(results["results"]["a_in_distribution"]["fine-tuned"]) >= {"all"}
    assert "| a_in_distribution | all | fine-tuned |" in (run / "detect" / "results.md").read_text()
    train_rows = (run / "detect" / "machine_train.jsonl").read_text().splitlines()
    assert len(train_rows) == m["train_machine"] > 0

    det = Detector.load(m["classifier"])
    texts = ["珠穆朗玛峰", "The capital of Japan is Tokyo."]
    p = det.probabilities(texts)
    assert len(p) == 2 and all(0.0 < v < 1.0 for v in p)
    cfg = json.loads((run / "detect" / "classifier" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "human", "1": "machine"}


def test_missing_real_data_and_other_models_are_stated(run_base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_base, run)
    shutil.rmtree(run / "dpo")
    recipe = _recipe({**SMALL, "zero_shot": False, "real_data": str(tmp_path / "absent")})
    m = run_pipeline(recipe, run, only=["detect"])["stages"]["detect"]
    assert "is absent" in m["c_real/skipped"] and "c_real/n_human" not in m
    assert "only unseen temperatures" in m["b_unseen_model/skipped"]
    assert not any("fast-detectgpt" in k for k in m) and "a_in_distribution/fine-tuned/auroc" in m


@pytest.mark.parametrize(
    ("detect", "message"),
    [
        ({"model": "grpo"}, "needs the output of stage 'grpo'"),
        ({"settings": [[0.7]]}, "each setting is [temperature, top_p]"),
        ({"unseen_settings": [[1.0, 1.5]]}, "top_p in (0, 1]"),
        ({"unseen_models": ["sft"]}, "is the training generator itself"),
        ({"unseen_models": ["ppo"]}, "stage 'ppo' has no finished model"),
        ({"heldout_share": 1.0}, "must be between 0 and 1"),
    ],
)
def test_bad_settings_fail_with_one_clear_message(run_base: Path, detect: dict, message: str) -> None:
    with pytest.raises(DanluError, match="stage 'detect' failed") as err:
        run_pipeline(_recipe({**SMALL, **detect}), run_base, only=["detect"])
    assert message in str(err.value)
