"""SFT: assistant-only targets, the long-dialog policy, packing without cross-dialog attention, exact resume,
replay, and a short end-to-end fine-tune that writes a chat checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.data.formats import Conversation
from danlu.model import IGNORE_INDEX, ModelConfig, Transformer
from danlu.stages.sft import (
    EncodeStats,
    SFTConfig,
    SFTRows,
    collate,
    encode_conversations,
    make_example,
    pack,
    sft,
)

DIALOGS = [
    [{"role": "user", "content": "中国最高的山是什么？"}, {"role": "assistant", "content": "珠穆朗玛峰。"}],
    [{"role": "user", "content": "1234*5678 等于多少？"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "calculator", "arguments": json.dumps({"expression": "1234*5678"})}}]},
     {"role": "tool", "name": "calculator", "content": "7006652"},
     {"role": "assistant", "content": "1234*5678 = 7006652。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本的首都是哪里？"},
     {"role": "assistant", "content": "东京。"}],
]  # fmt: skip


def convs(dialogs=DIALOGS) -> list[Conversation]:
    return [Conversation(d, None, f"d.jsonl:{i + 1}") for i, d in enumerate(dialogs)]


def test_targets_are_the_assistant_tokens_shifted(tiny_tokenizer) -> None:
    ids, mask = tiny_tokenizer.render_chat(DIALOGS[2])
    ex = make_example(ids, mask)
    assert ex.input_ids == ids[:-1] and len(ex.targets) == len(ids) - 1
    for t in range(len(ex.targets)):  # token by token
        assert ex.targets[t] == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)
    scored = [y for y in ex.targets if y != IGNORE_INDEX]
    assert tiny_tokenizer.decode(scored) == "Hello!<|im_end|>东京。<|im_end|>"


def test_long_dialog_policy_keeps_the_system_prompt_and_last_turns_or_skips(tiny_tokenizer) -> None:
    full = len(tiny_tokenizer.render_chat(DIALOGS[2])[0])
    last = len(tiny_tokenizer.render_chat([DIALOGS[2][0], *DIALOGS[2][3:]])[0])  # system + the last exchange
    seq_len = full - 5
    stats = EncodeStats()
    out = encode_conversations(convs([DIALOGS[2]]), tiny_tokenizer, seq_len, "truncate", stats)
    assert stats.truncated == 1 and len(out) == 1 and len(out[0]) == last - 1
    assert tiny_tokenizer.decode([y for y in out[0].targets if y != IGNORE_INDEX]) == "东京。<|im_end|>"
    stats = EncodeStats()
    assert encode_conversations(convs([DIALOGS[2]]), tiny_tokenizer, 8, "truncate", stats) == []
    assert stats.skipped_long == 1
    stats = EncodeStats()
    assert encode_conversations(convs([DIALOGS[2]]), tiny_tokenizer, seq_len, "skip", stats) == []
    assert stats.skipped_long == 1
    with pytest.raises(DanluError, match=r"d\.jsonl:1: the dialog has \d+ tokens"):
        encode_conversations(convs([DIALOGS[2]]), tiny_tokenizer, seq_len, "error")


def test_pack_places_every_example_once_within_rows() -> None:
    lengths = [30, 90, 10, 64, 50, 7, 100, 33, 1, 64] * 5
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack(lengths, order, 128)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= sum(lengths) / 128 * 1.15 + 1  # close to full
    assert rows == pack(lengths, order, 128)


def test_packed_rows_compute_exactly_what_separate_dialogs_do(tiny_tokenizer) -> None:
    """Attention never crosses dialogs and positions restart: the packed per-token loss equals each alone."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tiny_tokenizer.padded_vocab_size(64), depth=1, max_position_embeddings=256)
    ).eval()
    examples = encode_conversations(convs(), tiny_tokenizer, 256)
    batch = collate(examples, [[0, 1, 2]], 256, tiny_tokenizer.pad_id)
    packed = model(batch["input_ids"], batch["targets"], segment_ids=batch["segment_ids"], reduction="none")[
        0
    ]
    pos = 0
    for ex in examples:
        alone = model(torch.tensor([ex.input_ids]), torch.tensor([ex.targets]), reduction="none")[0]
        torch.testing.assert_close(packed[pos : pos + len(ex)], alone, atol=1e-5, rtol=1e-4)
        pos += len(ex)
    assert (batch["targets"][0, pos:] == IGNORE_INDEX).all()


def replay_rows(folder: Path, seq_len: int):
    """A real token shard folder (the layout `danlu data tokenize` writes) of token 7, read by TokenRows."""
    import numpy as np

    from danlu.data.shards import INDEX, TokenRows

    folder.mkdir()
    np.full(seq_len * 40 + 1, 7, dtype=np.uint16).tofile(folder / "train-0.bin")
    (folder / INDEX).write_text(
        json.dumps({"dtype": "uint16", "splits": {"train": [{"file": "train-0.bin"}]}})
    )
    return TokenRows(folder, "train", seq_len, 1, seed=1)


def test_rows_resume_exactly_and_replay_share(tiny_tokenizer, tmp_path: Path) -> None:
    examples = encode_conversations(convs(DIALOGS * 7), tiny_tokenizer, 96)
    kw = {"pad_id": tiny_tokenizer.pad_id, "seed": 3}
    a = SFTRows(examples, 96, 4, replay=replay_rows(tmp_path / "a", 96), replay_share=0.25, **kw)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(6)]  # crosses an epoch boundary
    b = SFTRows(examples, 96, 4, replay=replay_rows(tmp_path / "b", 96), replay_share=0.25, **kw)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        for k in want:
            assert torch.equal(want[k], got[k])
    assert b.replay.state_dict()["pos"] == 11  # one row in four
    assert all(int((batch["input_ids"] == 7).all(dim=1).sum()) == 1 for batch in expected)
    with pytest.raises(DanluError, match="other SFT data"):
        SFTRows(examples[:-1], 96, 4, **kw).load_state_dict(state)


def write_dialogs(path: Path, dialogs=DIALOGS, copies: int = 4) -> Path:
    path.write_text("".join(json.dumps({"messages": d}, ensure_ascii=False) + "\n" for d in dialogs * copies))
    return path


def fine_tune(
    parent: Path, data: Path, out: Path, steps: int = 80, eval_dir: Path | None = None, **cfg
) -> dict:
    """A short real SFT run (the engine, packing, the chat checkpoint) on a random-init 1-layer model."""
    train = {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 5, "eval_every": steps, "log_every": 20,
             "compile": "off", "progress": False, "device": "cpu", "dtype": "fp32", "weight_decay": 0.0}  # fmt: skip
    options = {"val_dialogs": 0, "replay": 0.0, "eval_limit": 0, "bpb_rows": 0, "train": train, **cfg}
    return sft(parent, [data], out, recipe={}, cfg=SFTConfig(**options), eval_dir=eval_dir)


def test_sft_held_out_figures_are_the_evaluators_and_computed_once(tmp_path: Path, tiny_tokenizer,
                                                                   monkeypatch) -> None:  # fmt: skip
    """The SFT stage's held-out numbers come from danlu.eval.world and are stored with the checkpoint; the eval
    stage's path (run_tasks with the checkpoint's store) reads the same figures back instead of computing others
    (the same checkpoint was once reported at 79.5% by SFT and 81.5% by the eval stage)."""
    from conftest import make_checkpoint

    import danlu.eval.world as world
    from danlu.eval.store import FigureStore
    from danlu.eval.tasks import EvalOptions, run_tasks
    from danlu.io import load_checkpoint
    from danlu.stages.sft import CHAT_EVALS

    parent = make_checkpoint(tmp_path / "base", tiny_tokenizer, chat=False, context=256)
    eval_dir = world.world_eval_dir(None)
    result = fine_tune(parent, write_dialogs(tmp_path / "d.jsonl"), tmp_path / "chat", steps=2, eval_dir=eval_dir,
                       eval_limit=3)  # fmt: skip
    expected = {q for s in CHAT_EVALS for q in world.quantities_of(s)}
    held = result["heldout"]
    assert set(held) <= expected and {"facts_chat", "tools_call", "tools_answer", "translation"} <= set(held)
    assert all(f["n"] <= 3 and f["split"] == "dev" and len(f["ci95"]) == 2 for f in held.values())
    assert FigureStore(tmp_path / "chat").figures()["dev"].keys() == held.keys()
    monkeypatch.setattr(world, "score_set", lambda *a, **k: pytest.fail("recomputed a stored figure"))
    ck = load_checkpoint(tmp_path / "chat")
    opts = EvalOptions(
        world=str(eval_dir), limit=3, dtype=torch.float32, store=FigureStore(tmp_path / "chat")
    )
    again = run_tasks(ck, ["world/facts_chat", "world/tools", "world/translation"], opts)
    for name, fig in again.items():
        q = name.removeprefix("world/")
        assert {k: v for k, v in fig.items() if k != "examples"} == held[q]


@pytest.mark.slow
def test_sft_writes_a_chat_checkpoint_that_learned_the_dialogs(tmp_path: Path, tiny_tokenizer) -> None:
    from conftest import make_checkpoint

    from danlu.generate import Generator, SamplingParams
    from danlu.io import load_checkpoint

    parent = make_checkpoint(tmp_path / "base", tiny_tokenizer, chat=False, context=256)
    data = write_dialogs(tmp_path / "d.jsonl")
    result = fine_tune(parent, data, tmp_path / "chat", pack=True)
    assert (
        result["dialogs"] == 12
        and result["dialogs_truncated"] == 0
        and result["steps"] == 80
        and result["train_loss"] < 0.5
    )
    ck = load_checkpoint(tmp_path / "chat")
    assert ck.is_chat and ck.meta["stage"] == "sft" and ck.meta["parent"] == str(parent)
    assert (
        json.loads((tmp_path / "chat" / "generation_config.json").read_text())["eos_token_id"][0]
        == ck.tokenizer.im_end_id
    )
    prompt = ck.tokenizer.render_chat(DIALOGS[0][:1], add_generation_prompt=True)[0]
    out = Generator(ck.model, ck.tokenizer).generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    assert out[0].text == "珠穆朗玛峰。" and out[0].finish_reason == "stop"
