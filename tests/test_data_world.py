"""The default data pipeline on the real world corpus: clean synthetic text must come through nearly whole."""

from __future__ import annotations

from danlu.data.pipeline import run_data
from danlu.world.build import build_world


def test_default_pipeline_keeps_the_world_corpus(tmp_path):
    """Templated, short and numeric text (Q&A threads, stub articles, arithmetic sheets) is not spam."""
    build_world(tmp_path / "world", scale=0.05)
    stats = run_data({"inputs": [{"path": str(tmp_path / "world" / "pretrain.jsonl")}]}, tmp_path / "out")
    n = stats["documents_in"]
    assert n > 1000
    assert stats["documents_out"] >= 0.9 * n, stats["removed_by_reason"]
    steps = {s["step"]: s for s in stats["steps"]}
    for name, row in steps.items():  # no single rule takes a real bite out of clean text
        assert sum(row["removed"].values()) <= 0.03 * n, (name, row["removed"])
    assert set(stats["languages"]) == {"zh", "en"} and set(stats["domains"]) == {"encyclopedia", "news", "qa", "forum"}  # fmt: skip
