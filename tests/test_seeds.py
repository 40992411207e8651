"""Runs over seeds: the aggregation on made-up summaries (both summary.json shapes), and `danlu run --seeds 2` on
the smoke recipe's cheapest stages."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.eval.seeds import aggregate, markdown, metric_leaves, write_seed_report


def _summary(bpb: float, facts: float, n: int = 200) -> dict:
    """A summary in the shape `danlu run` writes: flat stage metrics, and the evaluation table of figures."""
    return {
        "stages": {
            "pretrain": {
                "steps": 40,
                "val_bpb_end": bpb,
                "packed": True,
                "heldout_fact_examples": [{"x": 1.0}],
            },
            "eval": {"tasks": {"ceval": {"accuracy": facts / 2, "n": 24}}},
        },
        "evaluation": {
            "dev": {
                "sft": {
                    "world/facts": {
                        "metric": "accuracy",
                        "value": facts,
                        "n": n,
                        "correct": round(facts * n),
                        "ci95": [facts - 0.05, facts + 0.05],
                        "counts": "facts",
                        "lang=en": {"value": facts + 0.1, "n": n // 2},
                    }
                }
            }  # fmt: skip
        },
        "best_checkpoint": "sft",
    }


def test_metric_leaves_read_plain_numbers_and_figures_by_value() -> None:
    leaves = {path: (value, rows) for path, value, rows in metric_leaves(_summary(2.5, 0.4))}
    assert leaves["stages.pretrain.val_bpb_end"] == (2.5, None)
    assert leaves["stages.eval.tasks.ceval.accuracy"] == (0.2, None)
    assert leaves["evaluation.dev.sft.world/facts"] == (0.4, 200)  # the figure counts once, by its value…
    assert leaves["evaluation.dev.sft.world/facts.lang=en"] == (
        pytest.approx(0.5),
        100,
    )  # …its sub-figures too
    # a figure's n, correct and interval are not metrics; booleans, strings and example lists are skipped
    assert not any(p.endswith((".correct", ".ci95", ".n", ".packed")) or "examples" in p for p in leaves if
                   p != "stages.eval.tasks.ceval.n")  # fmt: skip
    assert "best_checkpoint" not in leaves


def test_aggregate_mean_std_and_missing_metrics() -> None:
    bpbs, facts = [2.5, 2.7, 2.9], [0.40, 0.46, 0.43]
    runs = {seed: _summary(b, f) for seed, (b, f) in enumerate(zip(bpbs, facts))}
    del runs[2]["stages"]["eval"]  # a stage that did not run in one seed
    res = aggregate(runs)
    bpb = res["metrics"]["stages.pretrain.val_bpb_end"]
    assert res["seeds"] == [0, 1, 2] and bpb["n"] == 3 and bpb["values"] == bpbs
    assert bpb["mean"] == pytest.approx(2.7) and bpb["std"] == pytest.approx(statistics.stdev(bpbs))  # n − 1
    fig = res["metrics"]["evaluation.dev.sft.world/facts"]
    assert fig["mean"] == pytest.approx(sum(facts) / 3) and fig["rows"] == 200
    ceval = res["metrics"]["stages.eval.tasks.ceval.accuracy"]
    assert ceval["n"] == 2 and ceval["values"][2] is None and ceval["mean"] == pytest.approx(0.215)
    one = aggregate({7: _summary(2.5, 0.4)})["metrics"]["stages.pretrain.val_bpb_end"]
    assert one["std"] is None and one["n"] == 1
    md = markdown(res, "t")
    assert "| stages.pretrain.val_bpb_end | 2.700 ± 0.2000 | 3 | 2.500 | 2.900 |  |" in md
    assert "| evaluation.dev.sft.world/facts | 0.4300 ± 0.0300 | 3 |" in md
    assert "The same in every run: stages.pretrain.steps 40" in md  # constants leave the table
    with pytest.raises(DanluError, match="no runs"):
        aggregate({})


def test_seed_report_names_the_missing_summary(tmp_path: Path) -> None:
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "summary.json").write_text(json.dumps(_summary(2.5, 0.4)), encoding="utf-8")
    with pytest.raises(DanluError, match=r"seed1/summary\.json: no summary\.json \(the run with seed 1"):
        write_seed_report(tmp_path, {0: tmp_path / "seed0", 1: tmp_path / "seed1"})


def test_danlu_run_with_two_seeds_aggregates_their_summaries(tmp_path: Path, capsys) -> None:
    from danlu.cli import main

    out = tmp_path / "run"
    assert (
        main(["run", "smoke", "--seeds", "2", "--out", str(out), "--only", "world", "data", "tokenizer"]) == 0
    )
    seeds = json.loads((out / "seeds.json").read_text(encoding="utf-8"))
    per_seed = [json.loads((out / f"seed{k}" / "summary.json").read_text(encoding="utf-8")) for k in (0, 1)]
    assert seeds["seeds"] == [0, 1] and json.loads((out / "seed1" / "recipe.json").read_text())["seed"] == 1
    docs = [s["stages"]["data"]["documents_out"] for s in per_seed]
    m = seeds["metrics"]["stages.data.documents_out"]
    assert m["values"] == docs and m["n"] == 2 and m["mean"] == pytest.approx(sum(docs) / 2)
    assert m["std"] == pytest.approx(statistics.stdev(docs))
    assert docs[0] != docs[1]  # the seed reached the world: two different corpora
    md = (out / "seeds.md").read_text(encoding="utf-8")
    assert "| stages.data.documents_out |" in md and "(2 runs)" in md
    capsys.readouterr()
    assert main(["run", "smoke", "--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds 0: give the number of runs" in capsys.readouterr().err
