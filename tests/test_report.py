"""Overfitting made visible and avoidable (early stopping), and the run report built from a real training log."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.cli import main
from danlu.data.shards import TokenRows, tokenize_corpus
from danlu.engine import Hooks, TrainConfig, Trainer
from danlu.eval.bpb import bits_per_byte, token_bytes
from danlu.files import write_json_atomic, write_jsonl_atomic
from danlu.io import save_model_dir
from danlu.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Trainer]:
    """A 'run folder' whose pretrain stage memorizes four sentences and is judged on unrelated text."""
    base = tmp_path_factory.mktemp("overfit")
    tiny_tokenizer.save(base / "tok")
    write_jsonl_atomic(
        base / "train.jsonl",
        [{"text": f"日本的首都是东京。{i} + 34 = {i + 34}. Hello!"} for i in range(4)],
    )
    write_jsonl_atomic(
        base / "val.jsonl",
        [{"text": f"The highest mountain in China is Mount Everest {i}."} for i in range(6)],
    )
    tokenize_corpus({"train": [base / "train.jsonl"], "val": [base / "val.jsonl"]}, base / "tok", base / "shards",
                    workers=1, progress=False)  # fmt: skip
    torch.manual_seed(0)
    cfg = TrainConfig(steps=300, batch_size=2, lr=1e-2, warmup_steps=0, schedule="constant", dtype="fp32",
                      device="cpu", log_every=5, eval_every=5, early_stopping_patience=2, progress=False)  # fmt: skip
    mcfg = ModelConfig(vocab_size=tiny_tokenizer.padded_vocab_size(64), depth=1, max_position_embeddings=16)
    train = TokenRows(base / "shards", "train", 16, cfg.batch_size, seed=0)
    val = TokenRows(base / "shards", "val", 16, 4, shuffle=False)
    tbytes = token_bytes(tiny_tokenizer, mcfg.vocab_size)
    hooks = Hooks(
        save_model=lambda state, folder, meta: save_model_dir(folder, state, mcfg, tiny_tokenizer, meta),
        evaluate=lambda m: bits_per_byte(m, val.sequential(8, batch_size=4), tbytes),
        sample=lambda m: ["日本的首都是 → 东京"],
    )
    run = base / "run"
    trainer = Trainer(cfg, Transformer(mcfg), train, lambda m, b: (m(b["input_ids"], b["targets"]), {}),
                      run / "pretrain", hooks, flops_per_token=mcfg.flops_per_token(16), stage="pretrain")  # fmt: skip
    trainer.fit()
    from danlu.eval.best import choose_best
    from danlu.eval.stats import proportion

    def acc(k: int, n: int, what: str, **extra: object) -> dict:
        return proportion(k, n, what, split="dev", **extra)

    evaluation = {"dev": {
        "pretrain": {"facts_base": acc(1, 10, "facts"), "bpb": {"metric": "bpb", "value": 3.2, "n": 100,
                                                                  "ci95": [3.0, 3.4], "counts": "bits per byte"}},
        "sft": {"facts_base": acc(3, 10, "facts"), "preference_chat": acc(6, 10, "pairs", random=0.5),
                "facts_chat": acc(5, 10, "chat facts"), "arithmetic_chat_unseen": acc(2, 10, "sums"),
                "tools_answer": acc(4, 10, "tools")},
    }}  # fmt: skip
    best = choose_best(evaluation, ["pretrain", "sft"])
    write_json_atomic(run / "summary.json", {"stages": {"pretrain": {"steps": trainer.step, "seconds": 1.0}},
                                             "evaluation": evaluation, "best_checkpoint": best})  # fmt: skip
    write_json_atomic(run / "world" / "stats.json", {"facts": {"total": 342}, "pretrain": {"docs": 2}})
    example = {"prompt": "智利的首都名叫", "completion": "圣地亚哥", "answer": "圣地亚哥", "correct": True}
    results = {"split": "dev", "checkpoints": {"pretrain": {"facts_base": {**acc(1, 10, "facts"),
                                                                          "examples": [example]}}}}  # fmt: skip
    write_json_atomic(run / "eval" / "results.json", results)
    return run, trainer


def test_early_stopping_stops_an_overfitting_run(overfit_run) -> None:
    _, trainer = overfit_run
    evals = [h for h in trainer.history if h.get("event") == "eval"]
    train = [h["loss"] for h in trainer.history if h.get("event") == "train"]
    assert trainer.step < 300  # stopped before the step budget
    assert any(h.get("event") == "early_stop" for h in trainer.history)
    best = min(e["val_loss"] for e in evals)
    assert evals[-1]["val_loss"] > best  # validation got worse while …
    assert train[-1] < evals[-1]["val_loss"] - 0.5  # … training loss kept falling: a visible gap


def test_report_is_self_contained_and_shows_every_part(overfit_run) -> None:
    run, _ = overfit_run
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8")
    for title in ("Loss curves: train vs validation", "Evaluation before/after each stage (dev)", "Best checkpoint",
                  "Throughput and MFU", "Data statistics", "Sample conversations"):  # fmt: skip
        assert title in page and f"## {title}" in md
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: one file to send or archive
    assert "overfitting" in page and "stopped early" in page
    # stage rows, one column per quantity with its row count; cells: value (95% interval)
    assert "| checkpoint | facts_base (n 10 rows) | bpb (n 100 tokens) | preference_chat (n 10 rows, chance 0.5000) |" in md
    assert "| pretrain | 0.100 (0.018–0.404) | 3.200 (3.000–3.400) |  |" in md
    assert "| sft | 0.300 (0.108–0.603) |  | 0.600 (0.313–0.832) |" in md
    assert "**sft** — chosen by the highest mean dev-split accuracy" in md and "no chat checkpoint" not in md
    assert "圣地亚哥" in page and "facts.total" in md
    assert (run / "report_files" / "loss.png").stat().st_size > 1000


def test_report_of_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(DanluError, match="not a run folder"):
        from danlu.eval.report import write_report

        write_report(tmp_path)


def test_long_dialog_section_shows_counts_and_warns_below_90_percent() -> None:
    from danlu.eval.report import long_dialog_section

    base = {"dialogs_read": 10, "dialogs": 9, "dialogs_truncated": 3, "dialogs_split": 1, "dialogs_split_rows": 3,
            "dialogs_skipped_too_long": 1}  # fmt: skip
    ok = long_dialog_section({"sft": {**base, "assistant_tokens_kept_share": 0.95}, "dpo": {"loss": 1.0}})
    assert ok.table is not None and [r[0] for r in ok.table[1]] == ["sft"] and "≥ 90%" in ok.text
    low = long_dialog_section({"sft": {**base, "assistant_tokens_kept_share": 0.35}})
    assert "35.0% of the answer tokens" in low.text and low.table[1][0][-1] == "0.35"


def test_best_checkpoint_follows_its_criterion_on_a_made_up_summary(tmp_path: Path, capsys) -> None:
    from danlu.commands.serve import resolve_run_folders
    from danlu.eval.best import QUANTITIES, best_checkpoint, choose_best
    from danlu.eval.stats import proportion

    def stage(facts: int, sums: int, tools: int, n: int = 200) -> dict:
        return {q: proportion(k, n, q, split="dev") for q, k in zip(QUANTITIES, (facts, sums, tools))}

    # grpo gains sums but loses more facts and tool use: dpo has the highest mean of the three (0.5 vs 0.45)
    dev = {"sft": stage(100, 40, 90), "dpo": stage(110, 60, 130), "grpo": stage(70, 120, 80),
           "pretrain": {"facts_base": proportion(180, 200, "facts", split="dev")}}  # fmt: skip
    evaluation = {"dev": dev, "test": {"grpo": stage(200, 200, 200)}}  # test figures never choose
    best = choose_best(evaluation, ["pretrain", "sft", "reward", "dpo", "grpo"])
    assert (
        best["checkpoint"] == "dpo"
        and best["split"] == "dev"
        and set(best["scores"]) == {"sft", "dpo", "grpo"}
    )
    assert best["score"] == pytest.approx((110 + 60 + 130) / 600, abs=1e-4)
    assert best["scores"]["grpo"]["score"] == pytest.approx((70 + 120 + 80) / 600, abs=1e-4)
    assert "runner-up grpo" in best["reason"] and "overlap" in best["reason"]  # 0.50 vs 0.45 on 200 rows each
    wide = choose_best({"dev": {**dev, "grpo": stage(20, 20, 20)}}, ["sft", "dpo", "grpo"])
    assert "runner-up sft" in wide["reason"] and "a clear lead" in wide["reason"]
    tie = choose_best({"dev": {"sft": stage(50, 50, 50), "dpo": stage(50, 50, 50)}}, ["sft", "dpo"])
    assert tie["checkpoint"] == "dpo" and "a tie, which goes to the later stage" in tie["reason"]
    zero = choose_best({"dev": {"sft": stage(0, 0, 0, n=24)}}, ["sft"])
    assert zero["ci95"][0] == 0.0 and zero["ci95"][1] > 0.03  # 0 of 24 rows is not certainty of 0%
    partial = choose_best({"dev": {"sft": stage(50, 50, 50), "dpo": {"facts_chat": dev["dpo"]["facts_chat"]}}},
                          ["sft", "dpo"])  # fmt: skip
    assert partial["checkpoint"] == "sft"  # dpo lacks figures of the criterion: not ranked
    none = choose_best({}, ["sft", "dpo"])
    assert none["checkpoint"] == "dpo" and "no chat checkpoint has dev figures" in none["reason"]
    assert choose_best({}, ["pretrain"])["checkpoint"] == "pretrain" and choose_best({}, []) is None

    run = tmp_path / "run"
    (run / "dpo").mkdir(parents=True)
    write_json_atomic(run / "summary.json", {"stages": {"sft": {}, "dpo": {}, "grpo": {}}, "evaluation": evaluation,
                                             "best_checkpoint": best})  # fmt: skip
    folder, choice = best_checkpoint(run)
    assert folder == run / "dpo" and choice == best
    assert resolve_run_folders([str(run), "other/ckpt"], default=True) == [str(run / "dpo"), "other/ckpt"]
    assert "serving its best checkpoint" in capsys.readouterr().out
