"""The pipeline runner: skip unchanged stages, --from, a failing stage stops cleanly, the report after each run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.runner import run_pipeline

RECIPE = {"seed": 0, "world": {"scale": 0.02}, "tokenizer": {"vocab_size": 300}}


def _stamp(run: Path, stage: str) -> float:
    return json.loads((run / stage / "stage.json").read_text())["finished_at"]


def test_unchanged_stages_are_skipped_and_from_reruns(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run_pipeline(dict(RECIPE), run)
    first = {s: _stamp(run, s) for s in ("world", "tokenizer")}
    assert (run / "report.html").exists() and (run / "report.md").exists()  # written at the end of each run

    run_pipeline(dict(RECIPE), run)
    assert "world: unchanged since its last run, skipped" in capsys.readouterr().out
    assert {s: _stamp(run, s) for s in first} == first

    changed = {
        **RECIPE,
        "tokenizer": {"vocab_size": 320},
    }  # a changed config reruns that stage, not earlier ones
    run_pipeline(changed, run)
    assert _stamp(run, "world") == first["world"] and _stamp(run, "tokenizer") != first["tokenizer"]

    again = _stamp(run, "tokenizer")
    run_pipeline(changed, run, from_stage="tokenizer")
    assert _stamp(run, "world") == first["world"] and _stamp(run, "tokenizer") != again


def test_new_danlu_code_reruns_the_world_and_what_follows(tmp_path: Path, monkeypatch) -> None:
    import danlu
    import danlu.runner

    run = tmp_path / "run"
    run_pipeline(dict(RECIPE), run)
    first = {s: _stamp(run, s) for s in ("world", "tokenizer")}
    real = danlu.runner.code_signature
    monkeypatch.setattr(
        danlu.runner, "code_signature", lambda name: real(name) + ("+edited" if name == "world" else "")
    )
    run_pipeline(dict(RECIPE), run)  # the corpus generator changed: its output and everything after are stale
    assert all(_stamp(run, s) != first[s] for s in first)
    monkeypatch.setattr(danlu, "__version__", "99.0")
    again = {s: _stamp(run, s) for s in first}
    run_pipeline(dict(RECIPE), run)
    assert all(_stamp(run, s) != again[s] for s in first)


def test_a_failing_stage_stops_the_run_and_leaves_earlier_stages(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    bad = {**RECIPE, "tokenizer": {"vocab_size": 300, "bogus_key": 1}}
    with pytest.raises(DanluError, match=r"stage 'tokenizer' failed: .*bogus_key.*earlier stages are intact"):
        run_pipeline(bad, run)
    assert (run / "world" / "stage.json").exists() and (run / "world" / "eval" / "facts_base.jsonl").exists()
    assert not (run / "tokenizer" / "stage.json").exists()
    assert "world" in json.loads((run / "summary.json").read_text())["stages"]
    assert (run / "report.html").exists()  # what finished is still reported
    run_pipeline(dict(RECIPE), run)  # fixing the recipe continues from the failed stage
    assert "world: unchanged" in capsys.readouterr().out and (run / "tokenizer" / "stage.json").exists()


def test_from_and_unknown_sections_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DanluError, match="--from 'sft': not a stage of this recipe; its stages: world, tokenizer"
    ):
        run_pipeline(dict(RECIPE), tmp_path / "r", from_stage="sft")
    with pytest.raises(DanluError, match="unknown section 'evaluation'"):
        run_pipeline({**RECIPE, "evaluation": {}}, tmp_path / "r")


def test_eval_stage_scores_the_run_checkpoints(tmp_path: Path, tiny_tokenizer) -> None:
    from tests.conftest import make_checkpoint

    run = tmp_path / "run"
    run_pipeline({"seed": 0, "world": {"scale": 0.02}}, run)
    make_checkpoint(run / "pretrain", tiny_tokenizer, chat=False)
    (run / "pretrain" / "stage.json").write_text(json.dumps({"fingerprint": "x", "metrics": {}}))
    recipe = {"seed": 0, "world": {"scale": 0.02}, "eval": {"limit": 3, "tasks": ["world_base"]}}
    from danlu.runner import StageContext
    from danlu.stages.eval import run_stage

    metrics = run_stage(StageContext("eval", run, recipe["eval"], recipe))
    assert set(metrics) == {"pretrain/facts_base/accuracy", "pretrain/arithmetic_base/accuracy",
                            "pretrain/preference_base/accuracy", "pretrain/bpb/bpb"}  # fmt: skip
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["pretrain"]["world/facts_base"]["n"] == 3
    assert "| pretrain |" in (run / "eval" / "results.md").read_text()
    with pytest.raises(DanluError, match="eval.checkpoints: sfx are not model stages"):
        run_stage(StageContext("eval", run, {"checkpoints": ["sfx"]}, recipe))
