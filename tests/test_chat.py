"""The terminal chat: commands, streaming, the calculator tool executed and fed back, history trimmed with a notice."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from danlu.chat import ChatSession, repl

NOW = dt.datetime(2026, 11, 21, 14, 5)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    """A 1-layer model fine-tuned (danlu's SFT) on three dialogs, one of which calls the calculator."""
    from conftest import make_checkpoint
    from test_sft import fine_tune, write_dialogs

    from danlu.serve.routing import load_served_model

    tmp = tmp_path_factory.mktemp("chat")
    parent = make_checkpoint(tmp / "base", tiny_tokenizer, chat=False, context=256)
    fine_tune(parent, write_dialogs(tmp / "d.jsonl"), tmp / "chat")
    model = load_served_model("m", str(tmp / "chat"))
    yield model
    model.worker.close()


@pytest.mark.slow
def test_tool_call_is_executed_and_fed_back(tool_model) -> None:
    session = ChatSession(tool_model, temperature=0.0, date=False, now=lambda: NOW)
    deltas, notices = [], []
    answer = session.reply("1234*5678 等于多少？", on_delta=deltas.append, notice=notices.append)
    assert answer == "1234*5678 = 7006652。" and "".join(deltas) == answer
    assert notices == ["[tool calculator(expression='1234*5678') → 7006652]"]
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[2]["content"] == "7006652"  # the executed result, kept for follow-ups


@pytest.mark.slow
def test_history_is_trimmed_from_the_oldest_turn_with_a_notice(tool_model) -> None:
    session = ChatSession(tool_model, temperature=0.0, max_tokens=16, date=False)
    notices: list[str] = []
    for _ in range(15):
        session.reply("中国最高的山是什么？", notice=notices.append)
    assert any("dropped the oldest" in n for n in notices)
    assert session.prompt_tokens() + session.reserve() <= tool_model.context_length + 16
    assert session.history[0]["role"] == "user" and session.history[-1]["role"] == "assistant"
    assert len(session.history) < 30  # older turns are gone
    assert session.reply("x" * 2000, notice=notices.append) == "" and "too long" in notices[-1]


def test_commands_and_date_in_the_system_prompt(tiny_checkpoint: Path) -> None:
    from danlu.serve.routing import load_served_model

    model = load_served_model("m", str(tiny_checkpoint))
    try:
        session = ChatSession(model, now=lambda: NOW, max_tokens=4)
        first = session.prompt_messages([{"role": "user", "content": "hi"}])[0]
        assert first["role"] == "system" and "2026-11-21" in first["content"]
        assert session.command("/temp 0") == "[temperature 0]" and session.temperature == 0.0
        assert "needs a number" in session.command("/temp hot")
        assert session.command("/system Be brief.") == "[system prompt: Be brief.]"
        assert session.prompt_messages([])[0]["content"].endswith("Be brief.")
        lines = iter(["hello", "/reset", "/nope", "/quit"])
        shown: list[str] = []
        assert repl(session, read=lambda _: next(lines), write=shown.append) == 0
        text = "".join(shown)
        assert "[conversation reset]" in text and "[unknown command /nope]" in text and session.history == []
        assert repl(session, read=lambda _: (_ for _ in ()).throw(EOFError), write=shown.append) == 0
    finally:
        model.worker.close()
