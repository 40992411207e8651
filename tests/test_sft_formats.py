"""Conversation readers: OpenAI messages, ShareGPT (with tool calls), Alpaca → one form; bad input by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.data.formats import ReadStats, read_conversations, to_conversation, turns_to_messages

CALL = {"name": "calculator", "arguments": {"expression": "1234*5678"}}
SHAREGPT_TOOL = {
    "conversations": [
        {"from": "human", "value": "1234*5678 等于多少？"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "7006652"},
        {"from": "gpt", "value": "1234*5678 = 7006652。"},
    ],
    "system": "Use tools.",
    "tools": json.dumps([{"name": "calculator", "description": "math", "parameters": {"type": "object"}}]),
}
ALPACA = {"instruction": "Translate into English:", "input": "你好", "output": "Hello", "system": "Be brief.",
          "history": [["Hi", "Hello! How can I help?"]]}  # fmt: skip
OPENAI = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sharegpt_tool_calls_become_openai_messages() -> None:
    conv = to_conversation(SHAREGPT_TOOL, "f:1")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = conv.messages[2]["tool_calls"][0]["function"]
    assert call["name"] == "calculator" and json.loads(call["arguments"]) == CALL["arguments"]
    assert conv.messages[3] == {"role": "tool", "content": "7006652", "name": "calculator"}
    assert conv.tools == [{"type": "function", "function": {"name": "calculator", "description": "math",
                                                            "parameters": {"type": "object"}}}]  # fmt: skip
    assert conv.format == "sharegpt"


def test_alpaca_with_system_and_history() -> None:
    conv = to_conversation(ALPACA, "f:1")
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate into English:\n你好"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_json_list_records_know_their_line(tmp_path: Path) -> None:
    bad = {"messages": [{"role": "assistant", "content": "first"}]}
    (tmp_path / "d.json").write_text(json.dumps([OPENAI, ALPACA, bad], indent=2), encoding="utf-8")
    text = (tmp_path / "d.json").read_text()
    line = text[: text.index('"first"')].count("\n") - 3  # the line of the object's opening brace
    with pytest.raises(DanluError, match=rf"d\.json:{line}: messages\[0\].*assistant"):
        read_conversations([tmp_path / "d.json"])
    stats = ReadStats()
    convs = read_conversations([tmp_path / "d.json"], on_error="skip", stats=stats)
    assert [c.format for c in convs] == ["openai", "alpaca"] and convs[1].where.endswith("d.json:" + str(
        text[: text.index('"instruction"')].count("\n")))  # fmt: skip
    assert stats.skipped == {"role_order": 1}


BAD = [
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "role_order", "two user turns"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "unknown_role", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": json.dumps(CALL)},
                        {"from": "gpt", "value": "a"}]}, "tool_call_without_result", "tool call without a result"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "1"},
                        {"from": "gpt", "value": "a"}]}, "role_order", "tool result without"),
    ({"text": "plain"}, "unknown_format", "not a conversation"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "reason", "message"), BAD)
def test_bad_conversations_rejected_with_file_line_or_skipped(
    tmp_path: Path, record, reason, message
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, record, OPENAI])
    with pytest.raises(DanluError, match=rf"d\.jsonl:2: .*{message}"):
        read_conversations([path])
    stats = ReadStats()
    assert len(read_conversations([path], on_error="skip", stats=stats)) == 2
    assert stats.skipped == {reason: 1} and stats.kept == 2 and stats.records == 3


def test_empty_file_and_malformed_json(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = write_jsonl(tmp_path / "good.jsonl", [OPENAI])
    with pytest.raises(DanluError, match=r"empty\.jsonl:1: empty file"):
        read_conversations([good, empty])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(OPENAI) + "\n{oops\n")
    with pytest.raises(DanluError, match=r"broken\.jsonl:2: malformed JSON"):
        read_conversations([broken])
    stats = ReadStats()
    assert len(read_conversations([good, empty, broken], on_error="skip", stats=stats)) == 2
    assert stats.skipped == {"empty_file": 1, "malformed_json": 1}
    with pytest.raises(DanluError, match="no usable conversations"):
        read_conversations([empty], on_error="skip")


def test_rendering_matches_transformers_and_mask_covers_assistant_tokens_only(
    tiny_tokenizer, tmp_path
) -> None:
    transformers = pytest.importorskip("transformers")
    tiny_tokenizer.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    multi = turns_to_messages(["你好", "你好！", "日本的首都是哪里？", "东京。"], system="You are 丹炉.")
    for conv in (
        to_conversation(SHAREGPT_TOOL, "x"),
        to_conversation(ALPACA, "x"),
        to_conversation({"messages": multi}, "x"),
    ):
        ids, mask = tiny_tokenizer.render_chat(conv.messages, tools=conv.tools)
        hf_out = hf.apply_chat_template(conv.messages, tools=conv.tools, tokenize=True)
        hf_ids = list(hf_out["input_ids"] if isinstance(hf_out, dict) or hasattr(hf_out, "keys") else hf_out)
        assert ids == hf_ids
        # token by token: the masked tokens are exactly each assistant turn's text and its <|im_end|>
        pieces, run = [], []
        for t, m in [*zip(ids, mask), (None, 0)]:
            if m:
                run.append(t)
            elif run:
                pieces.append(tiny_tokenizer.decode(run))
                run = []
        wanted = []
        for m in conv.messages:
            if m["role"] == "assistant":
                body = m["content"]
                for c in m.get("tool_calls") or []:
                    body += (
                        ("\n" if body else "")
                        + '<tool_call>\n{"name": "calculator", "arguments": '
                        + json.dumps(json.loads(c["function"]["arguments"]), ensure_ascii=False)
                        + "}\n</tool_call>"
                    )
                wanted.append(body + "<|im_end|>")
        assert pieces == wanted


@pytest.mark.slow
def test_real_datasets_read_and_fine_tune_a_few_steps(
    shared_data: Path, tmp_path: Path, tiny_tokenizer
) -> None:
    """LLaMA-Factory demos (Alpaca, ShareGPT tool calls), Alpaca Chinese, KdConv and chatterbot → a few SFT steps."""
    import yaml
    from conftest import make_checkpoint
    from test_sft import fine_tune

    lf = shared_data / "llamafactory_demo"
    stats = ReadStats()
    convs = read_conversations(
        [lf / "alpaca_zh_demo.json", lf / "alpaca_en_demo.json", lf / "glaive_toolcall_zh_demo.json"],
        on_error="skip",
        stats=stats,
    )
    assert stats.formats["alpaca"] >= 1990 and stats.formats["sharegpt"] >= 290
    assert sum(stats.skipped.values()) <= 5  # e.g. glaive rows whose call is plain text, not a function_call
    assert sum(1 for c in convs if c.tools) >= 150
    zh = sorted((shared_data / "alpaca_zh_hikariming").glob("*.json"))[0]
    assert len(read_conversations([zh], on_error="skip")) > 3000
    kd = json.loads((shared_data / "kdconv" / "film" / "dev.json").read_text(encoding="utf-8"))
    chatterbot = yaml.safe_load((shared_data / "chatterbot_zh" / "greetings.yml").read_text(encoding="utf-8"))
    rows = [{"messages": turns_to_messages([t["message"] for t in d["messages"]][: len(d["messages"]) // 2 * 2])}
            for d in kd[:20]]  # fmt: skip
    rows += [
        {"messages": turns_to_messages(c[: len(c) // 2 * 2])}
        for c in chatterbot["conversations"]
        if len(c) >= 2
    ]
    rows += [{"messages": c.messages, "tools": c.tools} for c in convs[:: len(convs) // 40]]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    parent = make_checkpoint(tmp_path / "base", tiny_tokenizer, chat=False, context=256)
    result = fine_tune(parent, data, tmp_path / "out", steps=4)
    assert result["steps"] == 4 and result["dialogs"] + result["dialogs_skipped_too_long"] == len(rows)
    assert result["dialogs_truncated"] > 0  # KdConv dialogs are longer than the 256-token context
