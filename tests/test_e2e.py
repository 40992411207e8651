"""End to end: `danlu run smoke` through every stage, as a user runs it, then the commands on its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def danlu(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "danlu", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_smoke_recipe_runs_every_stage_and_its_outputs_work(tmp_path: Path) -> None:
    run = tmp_path / "smoke"
    result = danlu("run", "smoke", "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())["stages"]
    for stage in (
        "world",
        "data",
        "tokenizer",
        "tokens",
        "pretrain",
        "sft",
        "reward",
        "dpo",
        "ppo",
        "grpo",
        "eval",
        "export",
    ):
        assert stage in summary, stage
        assert (run / stage / "stage.json").exists()
    pre = summary["pretrain"]
    assert pre["val_bpb_end"] < 0.8 * pre["val_bpb_start"]  # pretraining learned the world text
    assert summary["sft"]["pretrain_val_bpb_before"] > 0
    full = json.loads((run / "summary.json").read_text())
    dev = full["evaluation"]["dev"]  # one figure per quantity per checkpoint, from the one evaluator
    assert dev["sft"]["facts_chat"]["n"] > 0 and dev["grpo"]["tools_answer"]["n"] > 0
    assert {"pretrain", "sft", "dpo", "grpo"} <= set(dev) and "ci95" in dev["dpo"]["preference_chat"]
    dpo = summary["dpo"]  # pairs judged from the SFT model's own samples, with the world's held-out prompts
    assert (
        dpo["judged_prompts"] == 16
        and "heldout_answer_accuracy" in dpo
        and "heldout_pref_accuracy" not in dpo
    )
    assert "train_prompt_accuracy" in summary["grpo"] and "heldout" not in summary["grpo"]
    best = full["best_checkpoint"]["checkpoint"]  # the dev-split choice is what the run hands the user
    assert f"danlu chat {run / best}" in result.stdout or best == "pretrain"
    gguf = Path(
        summary["export"]["gguf"]
    )  # the chat model for llama.cpp / Ollama, and the commands to run it
    assert (
        summary["export"]["model"] == best
        and gguf.is_file()
        and Path(summary["export"]["modelfile"]).is_file()
    )
    assert f"llama-cli -m {gguf}" in result.stdout and "ollama create" in result.stdout
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
    if Llama is not None:  # llama.cpp loads it and answers in the chat template
        llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False)
        reply = llm.create_chat_completion([{"role": "user", "content": "你好"}], max_tokens=8, temperature=0)
        assert reply["choices"][0]["message"]["content"] is not None
    assert (run / "report.html").exists() and (run / "report.md").exists()

    for stage in ("pretrain", "sft", "dpo", "grpo"):
        config = json.loads((run / stage / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"], stage
    gen = danlu("generate", str(run / "pretrain"), "中国最高的山是", "--max-tokens", "8", "--seed", "1")
    assert gen.returncode == 0 and gen.stdout.startswith("中国最高的山是"), gen.stderr
    chat = danlu("generate", str(run / "sft"), "你好", "--chat", "--temperature", "0", "--max-tokens", "8")
    assert chat.returncode == 0, chat.stderr

    again = danlu("run", "smoke", "--out", str(run))  # nothing changed: every stage is skipped
    assert again.returncode == 0 and again.stdout.count("skipped") >= 11, again.stdout[-2000:]


def test_bad_recipe_input_is_one_clear_error(tmp_path: Path) -> None:
    bad = danlu("run", "smoke", "--out", str(tmp_path / "r"), "pretrain.train.stpes=3")
    assert bad.returncode == 2
    assert "pretrain.train: unknown key 'stpes'" in bad.stderr and "valid keys" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = danlu("generate", str(tmp_path / "nope"), "hi")
    assert missing.returncode == 2 and "no such checkpoint folder" in missing.stderr
