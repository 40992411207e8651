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


def test_a_failing_stage_stops_the_run_and_leaves_earlier_stages(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import danlu.stages.tokenizer as tokenizer_stage

    def fails(ctx: object) -> None:
        raise DanluError("no text to train on")  # what only the stage can find out, when it runs

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_stage, "run_stage", fails)
        with pytest.raises(DanluError, match=r"stage 'tokenizer' failed: no text.*earlier stages are intact"):
            run_pipeline(dict(RECIPE), run)
    assert (run / "world" / "stage.json").exists() and (run / "world" / "eval" / "facts_base.jsonl").exists()
    assert not (run / "tokenizer" / "stage.json").exists()
    assert "world" in json.loads((run / "summary.json").read_text())["stages"]
    assert (run / "report.html").exists()  # what finished is still reported
    run_pipeline(dict(RECIPE), run)  # fixing the recipe continues from the failed stage
    assert "world: unchanged" in capsys.readouterr().out and (run / "tokenizer" / "stage.json").exists()


def test_every_section_is_read_before_the_first_stage_runs(tmp_path: Path) -> None:
    """A typo in a late stage's section, its engine settings or `model:` stops `danlu run` before any stage has
    run (it used to surface after pretraining and SFT), with the key and the section named."""
    recipe = {**RECIPE, "tokens": {}, "pretrain": {"train": {"steps": 2}}, "grpo": {"group_size": 2}}
    cases = [
        ({"grpo": {"group_sise": 4}}, "grpo: unknown key 'group_sise'"),
        ({"grpo": {"train": {"stpes": 3}}}, "grpo.train: unknown key 'stpes'"),
        ({"train": {"lr": "fast"}}, r"pretrain.train.lr: expected a number, got 'fast'"),
        ({"dtype": "bf17"}, r"pretrain.train.dtype: 'bf17' is not one of"),  # a top-level engine key
        ({"model": {"dept": 4}}, "model: unknown key 'dept'"),
        ({"tokenizer": {"vocab_size": 300, "bogus_key": 1}}, "tokenizer: unknown key 'bogus_key'"),
    ]
    for change, message in cases:
        run = tmp_path / "run"
        with pytest.raises(DanluError, match=message):
            run_pipeline({**recipe, **change}, run)
        assert not run.exists(), change  # nothing ran, nothing written


def test_from_and_unknown_sections_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DanluError, match="--from 'sft': not a stage of this recipe; its stages: world, tokenizer"
    ):
        run_pipeline(dict(RECIPE), tmp_path / "r", from_stage="sft")
    with pytest.raises(DanluError, match="unknown section 'evaluation'"):
        run_pipeline({**RECIPE, "evaluation": {}}, tmp_path / "r")


def test_eval_stage_puts_one_figure_per_quantity_per_checkpoint_in_the_summary(
    tmp_path: Path, tiny_tokenizer
) -> None:
    from tests.conftest import make_checkpoint

    run = tmp_path / "run"
    run_pipeline({"seed": 0, "world": {"scale": 0.02}}, run)
    make_checkpoint(run / "pretrain", tiny_tokenizer, chat=False)
    (run / "pretrain" / "stage.json").write_text(json.dumps({"fingerprint": "x", "metrics": {}}))
    recipe = {"seed": 0, "world": {"scale": 0.02}, "eval": {"limit": 3, "tasks": ["world_base"]}}
    summary = run_pipeline(recipe, run)
    assert summary["stages"]["eval"]["split"] == "dev"
    figures = summary["evaluation"]["dev"]["pretrain"]
    assert {"facts_base", "arithmetic_base_unseen", "preference_base", "bpb"} <= set(figures)
    assert set(figures) <= {"facts_base", "arithmetic_base_unseen", "arithmetic_base_times_table", "preference_base",
                            "bpb"}  # fmt: skip
    for f in figures.values():  # each with its row count, a 95% interval around it and what it counts
        assert (
            f["n"] > 0 and f["ci95"][0] <= f["value"] <= f["ci95"][1] and f["counts"] and "examples" not in f
        )
    assert figures["facts_base"]["n"] == figures["preference_base"]["n"] == 3
    assert sum(f["n"] for q, f in figures.items() if q.startswith("arithmetic_base")) == 3
    assert json.loads((run / "summary.json").read_text())["evaluation"] == summary["evaluation"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["split"] == "dev" and results["checkpoints"]["pretrain"]["facts_base"]["examples"]
    assert "| pretrain |" in (run / "eval" / "results.md").read_text()
    best = summary["best_checkpoint"]
    assert best["checkpoint"] == "pretrain" and "no chat checkpoint" in best["reason"]
    from danlu.pipeline import StageContext
    from danlu.stages.eval import run_stage

    with pytest.raises(DanluError, match="eval.checkpoints: sfx are not model stages"):
        run_stage(StageContext("eval", run, {"checkpoints": ["sfx"]}, recipe))
    test_ctx = StageContext(
        "eval", run, {"split": "test", "limit": 3, "tasks": ["world_base"], "bpb": False}, recipe
    )
    if "split" not in json.loads((run / "world" / "eval" / "facts_base.jsonl").read_text().splitlines()[0]):
        with pytest.raises(DanluError, match=r"facts_base\.jsonl: .*no dev/test split.*rebuild the world"):
            run_stage(test_ctx)  # a world from before splits has no test split to report
    else:
        run_stage(test_ctx)
        tested = json.loads((run / "eval" / "results.json").read_text())["checkpoints"]["pretrain"]
        assert tested["facts_base"]["split"] == "test" and tested["facts_base"]["n"] == 3


def test_imports_point_one_way() -> None:
    """The runner imports stages and the report; stages, the report and the evaluator never import the runner, the
    report never imports a stage, and no stage imports another."""
    import ast

    root = Path(__file__).parent.parent / "danlu"

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    for path in [root / "pipeline.py", *(root / "eval").glob("*.py")]:
        bad = {m for m in imports(path) if m == "danlu.runner" or m.startswith("danlu.stages")}
        assert not bad, f"{path.name} imports {bad}"
    for name in ("eval", "sft"):
        mods = imports(root / "stages" / f"{name}.py")
        assert "danlu.runner" not in mods
        assert not {m for m in mods if m.startswith("danlu.stages.") and m != "danlu.stages.common"}
