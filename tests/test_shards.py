"""Token shards: tokenizing with clear errors, and a loader that is deterministic, rank-aware and resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danlu import DanluError
from danlu.cli import main
from danlu.data.shards import TokenRows, load_index, tokenize_corpus
from danlu.files import write_jsonl_atomic
from tests.conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("corpus")
    tiny_tokenizer.save(base / "tok")
    write_jsonl_atomic(base / "docs.jsonl", ({"text": f"{t} #{i}"} for i, t in enumerate(SAMPLE_TEXT * 3)))
    return base, base / "tok"


def test_documents_are_bos_separated_and_lossless(tmp_path: Path, corpus, tiny_tokenizer) -> None:
    base, tok = corpus
    index = tokenize_corpus({"train": [base / "docs.jsonl"]}, tok, tmp_path / "s", workers=2, progress=False)
    assert index["stats"]["train"]["documents"] == len(SAMPLE_TEXT) * 3
    tokens = np.fromfile(tmp_path / "s" / "train_00000.bin", dtype=index["dtype"])
    docs = [d for d in tiny_tokenizer.decode(tokens.tolist()).split("<|endoftext|>") if d]
    assert docs[:2] == [f"{SAMPLE_TEXT[0]} #0", f"{SAMPLE_TEXT[1]} #1"]
    assert load_index(tmp_path / "s")["tokenizer_sha256"]


def test_loader_is_deterministic_rank_aware_and_resumable(tmp_path: Path, corpus) -> None:
    base, tok = corpus
    tokenize_corpus({"train": [base / "docs.jsonl"]}, tok, tmp_path / "s", workers=1, progress=False)
    whole = TokenRows(tmp_path / "s", "train", 16, 4, seed=3)
    ranks = [TokenRows(tmp_path / "s", "train", 16, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        joined = torch.cat([r.next_batch()["input_ids"] for r in ranks])
        assert torch.equal(joined, whole.next_batch()["input_ids"])
    state = whole.state_dict()
    expected = [whole.next_batch()["targets"] for _ in range(40)]  # crosses an epoch boundary
    again = TokenRows(tmp_path / "s", "train", 16, 4, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()["targets"]) for a in expected)
    with pytest.raises(DanluError, match="belongs to other data"):
        TokenRows(tmp_path / "s", "train", 16, 4, seed=4).load_state_dict(state)


def test_bad_inputs_are_named(tmp_path: Path, corpus, capsys: pytest.CaptureFixture[str]) -> None:
    _, tok = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert (
        main(["data", "tokenize", str(bad), "--tokenizer", str(tok), "--out", str(out), "--workers", "1"])
        == 2
    )
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert (
        main(["data", "tokenize", str(empty), "--tokenizer", str(tok), "--out", str(out), "--workers", "1"])
        == 2
    )
    assert "no text found" in capsys.readouterr().err
    assert (
        main(
            ["data", "tokenize", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok), "--out", str(out)]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(DanluError, match="not a token shard folder"):
        TokenRows(tmp_path, "train", 16, 2)


def test_shards_of_another_tokenizer_are_refused_before_training(tmp_path: Path, corpus) -> None:
    """`tokenized_with` is the one check that shards hold this tokenizer's ids: pretraining refuses others."""
    from danlu.data.shards import tokenized_with
    from danlu.stages.pretrain import PretrainConfig, pretrain
    from danlu.tokenizer import Tokenizer

    base, tok = corpus
    tokenize_corpus({"train": [base / "docs.jsonl"]}, tok, tmp_path / "s", workers=1, progress=False)
    other = tmp_path / "other"
    Tokenizer.train([t[::-1] for t in SAMPLE_TEXT], vocab_size=300).save(other)
    index = load_index(tmp_path / "s")
    assert tokenized_with(index, tok) and not tokenized_with(index, other)
    with pytest.raises(DanluError, match="tokenized with a different tokenizer than .*other"):
        pretrain(tmp_path / "s", other, tmp_path / "out", recipe={}, cfg=PretrainConfig())
    assert not (tmp_path / "out").exists()
