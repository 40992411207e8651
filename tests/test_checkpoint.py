"""Checkpoint folders load in transformers with the same logits and greedy tokens, and bad folders fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.generate import Generator, SamplingParams
from danlu.io import load_checkpoint
from tests.conftest import make_checkpoint


def test_transformers_loads_our_checkpoint_with_identical_logits_and_greedy_tokens(
    tmp_path: Path, tiny_tokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    path = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, chat=False, depth=2)
    config = json.loads((path / "config.json").read_text())
    assert (
        config["architectures"] == ["LlamaForCausalLM"]
        and "rope_theta" in config
        and "num_key_value_heads" in config
    )
    ours = load_checkpoint(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "中国最高的山是"
    ids = [ours.tokenizer.bos_id, *ours.tokenizer.encode(text)]
    assert hf_tok(text)["input_ids"] == ids[1:]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours.model(x), atol=1e-4, rtol=0)
        hf_greedy = theirs.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours_greedy = Generator(ours.model, ours.tokenizer).generate(
        [ids], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
    )[0]
    assert hf_greedy[0, len(ids) :].tolist() == ours_greedy.token_ids


def test_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(DanluError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(DanluError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_tokenizer_that_does_not_fit_the_model_is_rejected(tmp_path: Path, tiny_tokenizer) -> None:
    path = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 64  # a model whose embedding is smaller than the tokenizer
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DanluError, match="tokenizer has .* tokens but the model's embedding has only 64"):
        load_checkpoint(path)


def test_truncated_weights_are_reported(tmp_path: Path, tiny_tokenizer) -> None:
    path = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DanluError, match="partial or corrupt"):
        load_checkpoint(path)


def test_interrupted_swap_is_recovered(tmp_path: Path, tiny_tokenizer) -> None:
    path = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    shutil.move(path, tmp_path / ".ckpt.old")  # killed between atomic_path's two renames
    assert load_checkpoint(path).config.num_hidden_layers == 1
