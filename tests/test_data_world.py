"""The default data pipeline on the real world corpus: clean synthetic text must come through nearly whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from danlu.data.pipeline import run_data
from danlu.world.build import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "world"
    build_world(out, scale=0.05)
    return out


def test_default_pipeline_keeps_the_world_corpus(world: Path, tmp_path: Path) -> None:
    """Templated, short and numeric text (Q&A threads, stub articles, arithmetic sheets) is not spam."""
    stats = run_data({"inputs": [{"path": str(world / "pretrain.jsonl")}]}, tmp_path / "out")
    n = stats["documents_in"]
    assert n > 1000
    assert stats["documents_out"] >= 0.9 * n, stats["removed_by_reason"]
    steps = {s["step"]: s for s in stats["steps"]}
    for name, row in steps.items():  # no single rule takes a real bite out of clean text
        assert sum(row["removed"].values()) <= 0.03 * n, (name, row["removed"])
    assert set(stats["languages"]) == {"zh", "en"} and set(stats["domains"]) == {"encyclopedia", "news", "qa", "forum"}  # fmt: skip


def test_validation_text_is_still_text_the_pipeline_keeps(world: Path, tmp_path: Path) -> None:
    """pretrain_val holds only sentences unseen in training (seen ones are cut out of each document); what is left
    must still read as documents, not as scraps a quality filter would throw away, or its bits per byte would
    measure a kind of text training never had."""
    stats = run_data({"inputs": [{"path": str(world / "pretrain_val.jsonl")}]}, tmp_path / "val")
    n = stats["documents_in"]
    assert n >= 60
    assert stats["documents_out"] >= 0.85 * n, stats["removed_by_reason"]
    assert set(stats["languages"]) == {"zh", "en"}
