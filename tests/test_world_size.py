"""A launch's world size against the batch (issue 19): `train.global_batch_size` resolved per process, and a resume on
another number of processes, which reshards every data source exactly under the same global batch and refuses another
global batch with the reason. In process: sources are built with rank/world_size arguments, as torchrun's ranks
would build them, so no process group is needed and the whole file runs in seconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from danlu import DanluError

PAD = 0


def _hashes(rows: torch.Tensor) -> list[str]:
    """Each row's tokens without its trailing padding (padding depends on the batch a row lands in)."""
    out = []
    for row in rows.tolist():
        while row and row[-1] == PAD:
            row = row[:-1]
        out.append(hashlib.sha256(json.dumps(row).encode()).hexdigest()[:16])
    return out


def _resume_on_two(make: Any, saved: dict[str, Any]) -> list[Any]:
    """Rank 0 and rank 1 of a 2-process run with batch 2 each, resumed from `saved` (through JSON, as on disk)."""
    ranks = [make(2, rank, 2) for rank in range(2)]
    for source in ranks:
        source.load_state_dict(json.loads(json.dumps(saved)))
    return ranks


def _check_reshards(make: Any, rows_of: Any, capsys: pytest.CaptureFixture[str], steps: int = 5) -> None:
    """Saves a 1-process run with batch 4 after 3 batches; 2 ranks × 2 resumed from it read, together and in
    order, the rows the 1-process run reads next (across an epoch); one line, from rank 0 alone, says so. Another
    global batch (2 × 1) is refused, naming the saved one and the setting that matches it."""
    one = make(4, 0, 1)
    for _ in range(3):
        one.next_batch()
    saved = one.state_dict()
    want = [rows_of([one.next_batch()]) for _ in range(steps)]
    capsys.readouterr()
    ranks = _resume_on_two(make, saved)
    assert capsys.readouterr().out.count("resharded from 1 to 2 processes") == 1
    for expected in want:
        assert rows_of([r.next_batch() for r in ranks]) == expected
    with pytest.raises(
        DanluError, match=r"global batches of 4 .* \(4 per process × 1\); this run's hold 2 \(1 × 2\)"
    ):
        make(1, 0, 2).load_state_dict(saved)


# ───────────────────────── train.global_batch_size ─────────────────────────


def test_global_batch_size_resolves_per_process_or_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    from danlu.stages.common import train_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DanluError) as e:
        train_config({"train": {"global_batch_size": 6}}, None, "sft")
    assert str(e.value) == ("train.global_batch_size 6 is not divisible by 4 processes; use a multiple of 4 or "
                            "launch 2, 3 or 6 processes")  # fmt: skip
    with pytest.raises(
        DanluError, match=r"dpo.train.global_batch_size 7 is not divisible .* launch 7 processes$"
    ):
        train_config({}, {"global_batch_size": 7}, "dpo")
    with pytest.raises(DanluError, match="global_batch_size -4: must be 0"):
        train_config({"train": {"global_batch_size": -4}}, None, "sft")

    monkeypatch.setenv("WORLD_SIZE", "2")
    # the global batch beats a batch_size of its own section (a command-line override beside the recipe's) and
    # the stage's built-in default; a stage's own batch_size beats a recipe-wide global batch
    recipe = {"train": {"batch_size": 16, "global_batch_size": 8}}
    assert train_config(recipe, None, "sft").batch_size == 4
    assert train_config(recipe, None, "dpo", {"batch_size": 8}).batch_size == 4
    own = train_config(recipe, {"batch_size": 5}, "dpo")
    assert (own.batch_size, own.global_batch_size) == (5, 0)
    assert train_config(recipe, {"global_batch_size": 2}, "dpo").batch_size == 1
    assert (
        train_config({"train": {"batch_size": 3}}, None, "sft").batch_size == 3
    )  # off: per process, as before


def test_auto_resume_takes_older_settings_and_another_world_size(tmp_path: Path) -> None:
    """`resume: auto` still continues a checkpoint saved before global_batch_size existed, and one saved under the
    same global batch on another world size (its per-process batch differs; the data source reshards)."""
    from dataclasses import asdict

    from danlu.engine import TrainConfig, resume_wanted

    state = tmp_path / "trainer_state" / "state.json"
    state.parent.mkdir(parents=True)
    old = {k: v for k, v in asdict(TrainConfig()).items() if k != "global_batch_size"}
    state.write_text(json.dumps({"config": old, "stage": "sft"}))
    assert resume_wanted(tmp_path, "auto", TrainConfig(), "sft")
    state.write_text(
        json.dumps({"config": asdict(TrainConfig(batch_size=4, global_batch_size=4)), "stage": "sft"})
    )
    assert resume_wanted(tmp_path, "auto", TrainConfig(batch_size=2, global_batch_size=4), "sft")
    assert not resume_wanted(tmp_path, "auto", TrainConfig(batch_size=2, global_batch_size=8), "sft")


# ───────────────────────── resume on another world size, per source ─────────────────────────


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """A token shard folder (the layout `danlu data tokenize` writes) of 45 distinct rows of 8 tokens."""
    from danlu.data.shards import INDEX

    folder = tmp_path / "shards"
    folder.mkdir()
    np.arange(1, 8 * 45 + 2, dtype=np.uint16).tofile(folder / "train_00000.bin")
    (folder / INDEX).write_text(
        json.dumps({"dtype": "uint16", "splits": {"train": [{"file": "train_00000.bin"}]}})
    )
    return folder


def test_token_rows_reshard(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from danlu.data.shards import TokenRows

    def make(batch: int, rank: int, world: int) -> TokenRows:
        return TokenRows(shards, "train", 8, batch, rank=rank, world_size=world, seed=5)

    _check_reshards(make, lambda bs: _hashes(torch.cat([b["input_ids"] for b in bs])), capsys, steps=12)


def test_distill_rows_reshard(capsys: pytest.CaptureFixture[str]) -> None:
    from danlu.compress.distill import PackedRows

    rows = [{"input_ids": torch.arange(i * 8, i * 8 + 8).view(1, 8) + 1, "targets": torch.zeros(1, 8)}
            for i in range(11)]  # fmt: skip

    def make(batch: int, rank: int, world: int) -> PackedRows:
        return PackedRows(rows, batch, seed=3, rank=rank, world_size=world)

    _check_reshards(make, lambda bs: _hashes(torch.cat([b["input_ids"] for b in bs])), capsys)
    with pytest.raises(DanluError, match="and its distill data position counts global batches of 4"):
        make(1, 0, 2).load_state_dict(make(4, 0, 1).state_dict())


def test_sft_rows_reshard_with_replay(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Packed dialogs of different lengths (the packing is the epoch's, alike on every rank) plus pretraining
    replay (every rank reads all replay rows and keeps its slice)."""
    from danlu.data.shards import TokenRows
    from danlu.stages.sft import Example, SFTRows

    examples = [Example(list(range(100 * i + 1, 100 * i + 2 + i % 5)), list(range(100 * i + 2, 100 * i + 3 + i % 5)))
                for i in range(1, 24)]  # fmt: skip

    def make(batch: int, rank: int, world: int) -> SFTRows:
        replay = TokenRows(shards, "train", 8, 1, seed=1)
        return SFTRows(examples, 8, batch, pad_id=PAD, seed=2, replay=replay, replay_share=0.25, rank=rank,
                       world_size=world)  # fmt: skip

    _check_reshards(make, lambda bs: _hashes(torch.cat([b["input_ids"] for b in bs])), capsys, steps=8)


def test_pair_batches_reshard(capsys: pytest.CaptureFixture[str]) -> None:
    from danlu.data.preference import PairBatches

    def seq(i: int, n: int) -> tuple[list[int], list[int]]:
        return list(range(10 * i + 1, 10 * i + n)), [0, *([1] * (n - 2))]

    encoded = [(seq(i, 3 + i % 4), seq(i + 50, 4 + i % 3), None) for i in range(7)]

    def make(batch: int, rank: int, world: int) -> PairBatches:
        return PairBatches(encoded, batch, PAD, seed=4, rank=rank, world_size=world)

    def rows_of(batches: list[dict[str, Any]]) -> list[str]:
        """Chosen rows of every rank, then rejected rows (a batch holds its B chosen, then its B rejected)."""
        halves = [b["input_ids"].chunk(2) for b in batches]
        return [h for part in (0, 1) for c in halves for h in _hashes(c[part])]

    _check_reshards(make, rows_of, capsys)


@pytest.fixture(scope="module")
def prompts() -> list[Any]:
    from danlu.data.preference import RLPrompt

    return [RLPrompt([{"role": "user", "content": f"{a} + 3 = ?"}], [str(a + 3)]) for a in range(5)]


def _rollouts(prompts: list[Any], per_step: int, rank: int, world: int) -> Any:
    from danlu.stages.rollouts import Rollouts

    class Tok:  # Rollouts renders each prompt once; the draws under test do not depend on the tokens
        def render_chat(
            self, messages: list[Any], add_generation_prompt: bool
        ) -> tuple[list[int], list[int]]:
            return [1, 2], [0, 0]

    return Rollouts(prompts, Tok(), None, None, None, group_size=2, prompts_per_step=per_step, max_new_tokens=4,
                    temperature=1.0, top_p=1.0, seed=0, rank=rank, world_size=world)  # fmt: skip


def test_rollouts_reshard(prompts: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    """A rollout's rows are its draws (indices into the run's prompt sequence), each sampling with the seed of its
    index in the run (`rollout_seed` + draw × group size): equal draws, equal rows."""
    one = _rollouts(prompts, 4, 0, 1)
    one.position = 3
    saved = json.loads(json.dumps(one.state_dict()))
    ranks = [_rollouts(prompts, 2, r, 2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(saved)
    assert capsys.readouterr().out.count("rollout position resharded from 1 to 2 processes") == 1
    for position in range(3, 8):  # 5 prompts, 4 a step: across epochs
        assert ranks[0]._draws(position) + ranks[1]._draws(position) == one._draws(position)
        assert ranks[0]._prompt_indices(position) + ranks[1]._prompt_indices(position) == one._prompt_indices(
            position
        )
    with pytest.raises(DanluError) as e:
        _rollouts(prompts, 1, 0, 2).load_state_dict(saved)
    assert str(e.value) == (
        "--resume: the checkpoint was trained on 1 process, this run has 2, and its rollout position counts global "
        "batches of 4 prompts (4 per process × 1); this run's hold 2 (1 × 2), so it would read other prompts than the "
        "run it continues; resume with prompts_per_step=2 on 2 processes (or start over with resume: false)"
    )


# ───────────────────────── refusals and older checkpoints ─────────────────────────


def test_another_global_batch_is_refused_with_the_setting_that_matches(shards: Path) -> None:
    from danlu.data.shards import TokenRows

    saved = TokenRows(shards, "train", 8, 4, seed=5).state_dict()
    with pytest.raises(DanluError) as e:
        TokenRows(shards, "train", 8, 3, rank=1, world_size=2, seed=5).load_state_dict(saved)
    assert str(e.value) == (
        "--resume: the checkpoint was trained on 1 process, this run has 2, and its data position counts global "
        "batches of 4 rows (4 per process × 1); this run's hold 6 (3 × 2), so it would read other rows than the run "
        "it continues; resume with train.global_batch_size=4 (or start over with resume: false)"
    )
    with pytest.raises(DanluError, match="the checkpoint's data position counts global batches of 4 rows"):
        TokenRows(shards, "train", 8, 2, seed=5).load_state_dict(saved)  # same world size, another batch


def test_older_checkpoints_resume_on_their_world_size(shards: Path, prompts: list[Any]) -> None:
    """States saved before the global batch was: a row source's (no world size at all) continues; a pair or rollout
    source's (world size only) continues on that world size and refuses another, as before."""
    from danlu.data.preference import PairBatches
    from danlu.data.shards import TokenRows

    one = TokenRows(shards, "train", 8, 4, seed=5)
    one.next_batch()
    old = {k: v for k, v in one.state_dict().items() if k not in ("global_batch", "world_size")}
    want = one.next_batch()["input_ids"]
    again = TokenRows(shards, "train", 8, 4, seed=5)
    again.load_state_dict(old)
    assert torch.equal(again.next_batch()["input_ids"], want)

    encoded = [(([1, 2, 3], [0, 1, 1]), ([1, 2, 4], [0, 1, 1]), None)] * 5
    old_pairs = {"position": 3, "pairs": 5, "world_size": 2}
    pairs = PairBatches(encoded, 2, PAD, seed=0, rank=1, world_size=2)
    pairs.load_state_dict(old_pairs)
    assert pairs.position == 3
    with pytest.raises(DanluError, match="trained on 2 processes, this run has 1; .* saved no global batch"):
        PairBatches(encoded, 4, PAD, seed=0).load_state_dict(old_pairs)
    rollouts = _rollouts(prompts, 2, 0, 1)
    rollouts.load_state_dict({"position": 2, "prompts": 5, "world_size": 1})
    assert rollouts.position == 2
