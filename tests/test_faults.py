"""Faults (issue 15): kills between a save's renames, interrupts, full disks, bad files, runaway arithmetic.

Each test reproduces one defect the fault probe found and checks the fix: a complete checkpoint is never lost to a
rerun, Ctrl-C/SIGTERM save before stopping, temp leftovers and redone metrics lines go away, a full disk or a
malformed file is one DanluError naming the path, and every calculator failure is a tool error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.data.shards import TokenRows, tokenize_corpus
from danlu.engine import Hooks, TrainConfig, Trainer, checkpoint_step
from danlu.files import atomic_path, is_disk_full, leftovers, write_jsonl_atomic
from danlu.io import load_checkpoint, save_model_dir
from danlu.model import ModelConfig, Transformer
from danlu.runner import interrupted_step
from danlu.tools import run_tool
from tests.conftest import SAMPLE_TEXT, make_checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    base = tmp_path_factory.mktemp("fault_shards")
    tiny_tokenizer.save(base / "tok")
    write_jsonl_atomic(base / "train.jsonl", ({"text": t + f" {i}"} for i, t in enumerate(SAMPLE_TEXT * 4)))
    tokenize_corpus(
        {"train": [base / "train.jsonl"]}, base / "tok", base / "shards", workers=1, progress=False
    )
    return base / "shards"


def _trainer(shards: Path, out: Path, tokenizer, steps: int = 6, loss=None, **kw) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=2, lr=3e-3, warmup_steps=1, dtype="fp32", device="cpu",
                      log_every=1, eval_every=0, progress=False, compile="off", **kw)  # fmt: skip
    mcfg = ModelConfig(vocab_size=tokenizer.padded_vocab_size(64), depth=1, max_position_embeddings=16)
    data = TokenRows(shards, "train", 16, cfg.batch_size, seed=1)

    def save(state, folder, meta):
        save_model_dir(folder, state, mcfg, tokenizer, meta)

    def plain_loss(m, b):
        return m(b["input_ids"], b["targets"]), {}

    return Trainer(
        cfg, Transformer(mcfg), data, loss or plain_loss, out, Hooks(save_model=save), stage="pretrain"
    )


def _state(out: Path) -> dict:
    return json.loads((out / "trainer_state" / "state.json").read_text())


# ---- 3: a rerun never deletes the last good checkpoint ----------------------------------------------------------
def test_kill_between_renames_then_a_rerun_without_resume_keeps_the_newest_checkpoint(
    tmp_path: Path, shards, tiny_tokenizer
) -> None:
    out = tmp_path / "ckpt"
    _trainer(shards, out, tiny_tokenizer, steps=2).fit()
    # a save of step 4 was complete in its temp folder when the kill came between the two renames
    newer = tmp_path / ".ckpt.abcd1234.tmp"
    shutil.copytree(out, newer)
    state = _state(newer)
    (newer / "trainer_state" / "state.json").write_text(json.dumps({**state, "step": 4, "finished": False}))
    partial = tmp_path / ".ckpt.zzzz9999.tmp"  # and an older save was cut short: no state.json
    shutil.copytree(out, partial)
    (partial / "trainer_state" / "state.json").unlink()
    out.rename(tmp_path / ".ckpt.old")
    assert not out.exists() and checkpoint_step(partial) is None

    _trainer(shards, out, tiny_tokenizer, steps=2)  # a rerun without --resume, as `danlu run` used to do
    assert _state(out)["step"] == 4, "the complete newer checkpoint from the temp folder is in place"
    assert leftovers(out) == []


def test_only_the_swapped_out_checkpoint_left_is_put_back_and_runner_says_so(
    tmp_path: Path, shards, tiny_tokenizer
) -> None:
    out = tmp_path / "pretrain"
    t = _trainer(shards, out, tiny_tokenizer, steps=2)
    t.fit()
    state = _state(out)
    (out / "trainer_state" / "state.json").write_text(json.dumps({**state, "finished": False}))
    out.rename(tmp_path / ".pretrain.old")
    assert interrupted_step(out) == 2  # what `danlu run` prints before continuing the stage
    assert checkpoint_step(out) == 2 and leftovers(out) == []


# ---- 4: Ctrl-C and SIGTERM save before stopping; saves by time --------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_finished_step_and_resume_cuts_the_metrics(
    tmp_path: Path, shards, tiny_tokenizer, sig: signal.Signals
) -> None:
    out = tmp_path / "run"
    holder: dict[str, Trainer] = {}

    def loss(m, b):
        if holder["t"].step == 3 and holder["t"]._interrupted is None:
            os.kill(os.getpid(), sig)  # arrives mid-step: the step finishes, then the loop saves and stops
        return m(b["input_ids"], b["targets"]), {}

    holder["t"] = _trainer(shards, out, tiny_tokenizer, steps=8, loss=loss, save_minutes=0)
    # what the process had before (a shell's background job starts with SIGINT ignored, not the default handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        holder["t"].fit()
    assert _state(out)["step"] == 4 and not _state(out)["finished"]
    assert {s: signal.getsignal(s) for s in before} == before  # handlers are restored
    # lines logged after the checkpoint (a crash after the save) are redone on resume, so they must go
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": "pretrain", "step": 5, "event": "train", "loss": 9.9}) + "\n")
    t = _trainer(shards, out, tiny_tokenizer, steps=8)
    t.resume()
    t.fit()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(5) == 1 and steps[-1] == 8


def test_saves_by_time_without_save_every(tmp_path: Path, shards, tiny_tokenizer) -> None:
    out = tmp_path / "timed"
    holder: dict[str, Trainer] = {}

    def loss(m, b):
        if holder["t"].step == 3:
            raise RuntimeError("the machine went away")
        return m(b["input_ids"], b["targets"]), {}

    holder["t"] = _trainer(shards, out, tiny_tokenizer, steps=8, loss=loss, save_minutes=1e-9)
    assert holder["t"].cfg.save_every == 0 and TrainConfig().save_minutes > 0  # the default saves by time
    with pytest.raises(RuntimeError):
        holder["t"].fit()
    assert _state(out)["step"] == 3


# ---- 7: full disk and malformed files: one line naming the path --------------------------------------------------
def test_full_disk_is_one_error_naming_the_checkpoint(
    tmp_path: Path, shards, tiny_tokenizer, monkeypatch
) -> None:
    out = tmp_path / "full"
    t = _trainer(shards, out, tiny_tokenizer, steps=1)
    t.fit()

    def torch_on_a_full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos; basic_ios::clear")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(DanluError, match=rf"{out}: no space left on device"):
        t.save()
    assert checkpoint_step(out) == 1 and leftovers(out) == []
    with pytest.raises(DanluError, match="no space left"), atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
        raise OSError(28, "No space left on device")
    assert is_disk_full(OSError(28, "x")) and not is_disk_full(RuntimeError("basic_ios::clear"))


@pytest.mark.parametrize(
    "change",
    [{"hidden_size": "wide"}, {"num_hidden_layers": [1]}, {"rope_theta": {"a": 1}}, {"vocab_size": None}],
)
def test_config_of_the_wrong_types_is_named(tmp_path: Path, tiny_tokenizer, change: dict) -> None:
    path = make_checkpoint(tmp_path / "c", tiny_tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(DanluError, match=rf"{path}/config.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("text", ["{bad", "[1, 2]"])
def test_malformed_danlu_json_is_named(tmp_path: Path, tiny_tokenizer, text: str) -> None:
    path = make_checkpoint(tmp_path / "c", tiny_tokenizer)
    (path / "danlu.json").write_text(text)
    with pytest.raises(DanluError, match=rf"{path}/danlu.json"):
        load_checkpoint(path)


# ---- 6: the calculator: every failure is a tool error -------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("1e6**64", "cannot compute"),
        ("*".join(["9**64"] * 20), "more than 1000 digits"),
        ("(-8)**0.5//2", "not a real number"),
        ("(-8)**0.5", "not a real number"),
        ("1e308*10", "too large"),
        ("2**65", "exponent too large"),
        ("1/0", "division by zero"),
        ("(" * 100 + "1" + ")" * 100, "not an arithmetic expression|longer than"),
        ("__import__('os')", "not an arithmetic expression"),
    ],
)
def test_calculator_failures_are_tool_errors(expression: str, error: str) -> None:
    result = run_tool("calculator", {"expression": expression})
    assert result.startswith("error: ")
    assert re.search(error, result), result


@pytest.mark.parametrize("arguments", ["[1, 2]", '"1+1"', "3", "not json"])
def test_calculator_arguments_that_are_not_an_object(arguments: str) -> None:
    assert run_tool("calculator", arguments).startswith("error: ")


def test_calculator_still_calculates() -> None:
    assert run_tool("calculator", {"expression": "1234*5678"}) == "7006652"
    assert run_tool("calculator", {"expression": "9**64"}) == str(9**64)
