"""Real data as users bring it (issue 16): encodings, huge records, odd shapes, long dialogs, code and HTML in
answers, classical verse, empty files, multiple-choice letter bias. Fixtures are written by the tests; the last
tests use ../shared/data when it is there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_checkpoint
from datatrove.data import Document

from danlu import DanluError
from danlu.data.clean import CleanConfig, TextCleaner
from danlu.data.filters import ChineseConfig, ChineseQualityFilter, EnglishConfig, english_filters
from danlu.data.formats import Conversation, ReadStats, parse_columns, read_conversations
from danlu.data.report import stats_markdown
from danlu.files import SkippedRecords, detect_encoding, located_records, read_records, record_text
from danlu.model import IGNORE_INDEX
from danlu.stages.sft import EncodeStats, encode_conversations, no_replay_warning

ZH_ROWS = [
    {"instruction": "中国最高的山是什么？", "output": "珠穆朗玛峰。"},
    {"instruction": "日本的首都？", "output": "东京。"},
]


def write_jsonl(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


# ───────────────────────── encodings ─────────────────────────


def test_gbk_utf16_and_bom_files_read_through_one_reader(tmp_path: Path) -> None:
    gbk = write_jsonl(tmp_path / "gbk.jsonl", ZH_ROWS, "gbk")
    assert detect_encoding(gbk) == "gb18030"
    convs = read_conversations([gbk])
    assert convs[0].messages[1]["content"] == "珠穆朗玛峰。" and len(convs) == 2
    utf16 = tmp_path / "u16.json"
    utf16.write_bytes(json.dumps(ZH_ROWS, ensure_ascii=False).encode("utf-16"))  # with a BOM
    assert [r["output"] for r in read_records(utf16)] == ["珠穆朗玛峰。", "东京。"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "你好"}, ensure_ascii=False).encode() + b"\n")
    assert list(read_records(bom)) == [{"text": "你好"}]
    assert list(read_records(bom, encoding="utf-8")) == [
        {"text": "你好"}
    ]  # an explicit utf-8 still drops the BOM
    # --encoding: a Big5 file is read when named, and a wrong name is one clear error
    big5 = write_jsonl(tmp_path / "big5.jsonl", [{"text": "臺灣"}], "big5")
    assert list(read_records(big5, encoding="big5")) == [{"text": "臺灣"}]
    with pytest.raises(DanluError, match="unknown text encoding 'nope'"):
        list(read_records(big5, encoding="nope"))


def test_undecodable_file_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe\xff"}\n')
    with pytest.raises(DanluError, match=r"bad\.jsonl:2: cannot decode .*--encoding"):
        list(read_records(bad))
    late = tmp_path / "late.jsonl"  # valid UTF-8 for the first 64 KiB, then a GBK line
    late.write_bytes(
        b'{"text": "a"}\n' * 6000 + json.dumps({"text": "中文"}, ensure_ascii=False).encode("gbk") + b"\n"
    )
    with pytest.raises(DanluError, match=r"late\.jsonl:6001: cannot decode the text as utf-8"):
        list(read_records(late))


# ───────────────────────── a huge record ─────────────────────────


def test_a_50_mb_line_is_skipped_unread_in_bounded_memory(tmp_path: Path) -> None:
    data = tmp_path / "huge.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
            + "\n"
        )
        f.write('{"messages": [{"role": "user", "content": "' + "x" * 50_000_000 + '"}]}\n')
        f.write(json.dumps({"instruction": "2+2?", "output": "4"}) + "\n")
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space in all
        from danlu.data.formats import ReadStats, read_conversations
        stats = ReadStats()
        convs = read_conversations([{str(data)!r}], stats=stats)
        print(len(convs), dict(stats.skipped), stats.first_skipped["too_large"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("2 {'too_large': 1}") and "huge.jsonl:2: a record of 50,000,0" in out.stdout
    skipped = SkippedRecords()
    assert len(list(read_records(data, skipped=skipped, max_chars=1000))) == 2
    assert skipped.count == 1 and "huge.jsonl:2" in skipped.where[0]


# ───────────────────────── shapes and field mappings ─────────────────────────


def test_kdconv_turns_without_roles_alternate(tmp_path: Path) -> None:
    kd = [{"name": "film", "messages": [{"message": "知道这部电影吗？"}, {"message": "知道呀。", "attrs": [{"attrname": "导演"}]},
                                        {"message": "谁导演的？"}, {"message": "尼克。", "attrs": []}]}]  # fmt: skip
    path = tmp_path / "kd.json"
    path.write_text(json.dumps(kd, ensure_ascii=False), encoding="utf-8")
    (conv,) = read_conversations([path])
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[3]["content"] == "尼克。" and conv.where.endswith("kd.json:1")


def test_columns_map_nested_fields_csv_and_dataset_info(tmp_path: Path) -> None:
    rows = [{"data": {"q": "2+2?", "a": "4"}, "id": 1}, {"data": {"q": "3+3?", "a": "6"}, "id": 2}]
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    convs = read_conversations([path], columns="prompt=data.q,response=data.a")
    assert convs[1].messages == [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    with pytest.raises(
        DanluError,
        match=r"nested\.jsonl:1: not a conversation: the record has fields 'data', 'id'.*--columns",
    ):
        read_conversations([path])
    with pytest.raises(
        DanluError, match=r"field 'data.answer' .* is missing; the record has fields 'data', 'id'.*--skip-bad"
    ):
        read_conversations([path], columns="prompt=data.q,response=data.answer")
    with pytest.raises(DanluError, match="unknown key 'answer'"):
        parse_columns("answer=a")
    tsv = tmp_path / "qa.tsv"
    tsv.write_text("question\tanswer\n长江有多长？\t约6300公里。\n", encoding="gbk")
    (conv,) = read_conversations([tsv], columns={"prompt": "question", "response": "answer"})
    assert conv.messages[1]["content"] == "约6300公里。" and conv.where.endswith("qa.tsv:2")
    # LLaMA-Factory's dataset_info beside the data, in sharegpt form with its own tags
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"dialog": [{"speaker": "U", "text": "hi"}, {"speaker": "B", "text": "hello"}]}],
    )
    info = {"mine": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                     "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "U", "assistant_tag": "B"}}}  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (conv,) = read_conversations([chat])
    assert conv.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_bad_records_and_empty_files_say_what_to_do(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [*ZH_ROWS, {"instruction": "空", "output": ""}])
    with pytest.raises(DanluError, match=r"a\.jsonl:3: messages\[1\]: empty assistant turn \(--skip-bad"):
        read_conversations([path])
    stats = ReadStats()
    assert (
        len(read_conversations([path], on_error="skip", stats=stats)) == 2
        and stats.skipped["empty_turn"] == 1
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"empty\.jsonl:1: empty file"):
        read_conversations([empty])
    poem = {
        "title": "静夜思",
        "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"],
        "meta": {"author": "李白"},
    }
    assert record_text(poem, "paragraphs", "p:1") == "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert record_text(poem, "meta.author", "p:1") == "李白"
    with pytest.raises(
        DanluError, match=r"p:1: field 'text' is missing; the record has fields 'title', 'paragraphs', 'meta'"
    ):
        record_text(poem, "text", "p:1")


# ───────────────────────── long dialogs ─────────────────────────


def _long_dialog(turns: int) -> Conversation:
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"问题{i}：中国最高的山是什么？"},
            {"role": "assistant", "content": f"答{i}：珠穆朗玛峰。"},
        ]
    return Conversation(msgs, None, "long.jsonl:1")


def test_long_dialog_policies_split_truncate_and_report(tiny_tokenizer) -> None:
    conv = _long_dialog(8)
    full = len(tiny_tokenizer.render_chat(conv.messages)[0])
    seq_len = full // 3
    stats = EncodeStats()
    rows = encode_conversations([conv], tiny_tokenizer, seq_len, "split", stats)
    assert stats.split == 1 and stats.split_rows == len(rows) >= 3 and all(len(r) <= seq_len for r in rows)
    trained = "".join(tiny_tokenizer.decode([t for t in r.targets if t != IGNORE_INDEX]) for r in rows)
    assert all(f"答{i}：" in trained for i in range(8)) and trained.count("答3：") == 1  # every answer once
    assert all(tiny_tokenizer.decode(r.input_ids).startswith("<|im_start|>system\nBe brief.") for r in rows)
    assert "问题2" in tiny_tokenizer.decode(rows[1].input_ids)  # later rows carry earlier turns as history
    assert stats.kept_share > 0.95 and stats.metrics()["dialogs_split_rows"] == len(rows)
    stats = EncodeStats()
    (row,) = encode_conversations([conv], tiny_tokenizer, seq_len, "truncate", stats)
    text = tiny_tokenizer.decode(row.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and "答7：" in text and "问题0" not in text
    assert stats.truncated == 1 and stats.kept_share < 0.6
    line = stats.summary(seq_len, "truncate")
    assert (
        "1 truncated" in line
        and "WARNING" in line
        and "long.jsonl:1" in line
        and "long_dialogs=split" in line
    )
    assert "--tokens DIR" in no_replay_warning(None, 0.1) and "forget" in no_replay_warning(None, 0.1)


# ───────────────────────── cleaning and filters ─────────────────────────


def test_cleaning_keeps_code_and_turns_html_into_text() -> None:
    cleaner = TextCleaner(CleanConfig())
    fenced = "Here:\n\n```python\ndef f(x):\n    if x:\n        return  <div>1</div>\n```\nDone  now."
    text, counts = cleaner.clean(fenced)
    assert "def f(x):\n    if x:\n        return  <div>1</div>" in text and text.endswith("Done now.")
    assert counts["edit_code_blocks_kept"] == 1 and counts["edit_whitespace"] == 1
    bare = "Use this:\ndef add(a, b):\n    total = a + b\n    return total"
    assert cleaner.clean(bare)[0] == bare  # indented code outside fences keeps its indentation
    page = "<!DOCTYPE html><html><head><title>My page</title><style>p{}</style></head><body><h1>Welcome</h1><p>This is <b>my</b> page.</p></body></html>"
    text, counts = cleaner.clean(page)
    assert text == "My page\nWelcome\nThis is my page." and counts["edit_markup"] == 1
    assert cleaner.clean(page, markup=False)[0].startswith("<!DOCTYPE html>")  # an HTML answer in a chat turn
    stats = {"documents_in": 1, "documents_out": 1, "chars_in": 9, "chars_out": 9, "tokens_in": 3, "tokens_out": 3,
             "token_counter": "x", "dialogs": 0, "read_errors": 0, "languages": {}, "domains": {},
             "largest_duplicate_clusters": [], "steps": [{"step": "clean", "docs_in": 1, "docs_out": 1, "chars_in": 9,
             "chars_out": 9, "tokens_in": 3, "tokens_out": 3, "removed": {}, "changes": {"edit_markup": 4}}]}  # fmt: skip
    assert "| clean | documents with markup turned into text | 4 |" in stats_markdown(stats)


def _doc(text: str, lang: str, **meta) -> Document:
    return Document(text=text, id="t", metadata={"lang": lang, **meta})


def test_chinese_rules_know_verse_and_classical_text_and_english_rules_short_answers() -> None:
    zh = ChineseQualityFilter(ChineseConfig())
    ci = "气和玉烛，睿化著鸿明。\n缇管一阳生。\n郊禋盛礼燔柴毕，旋轸凤凰城。\n森罗仪卫振华缨。\n载路溢欢声。"
    assert zh.filter(_doc(ci, "zh")) is True  # short lines ending in punctuation: verse
    lunyu = "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？"
    assert zh.filter(_doc(lunyu, "zh")) is True
    assert (
        zh.filter(_doc("代开发票 博彩 赌场 六合彩\n时时彩 私服 外挂", "zh"))[0] is False
    )  # spam is still spam
    answer = "What is the capital of France?\n\nParis."  # a dialog's text: its turns joined
    gopher = next(
        f for f in english_filters(EnglishConfig(), lambda name: None) if f.name == "filter:gopher_quality"
    )
    assert gopher.filter(_doc(answer, "en"))[0] is False  # a web page this short is rejected…
    assert (
        gopher.filter(_doc(answer, "en", messages=[{"role": "assistant", "content": answer}])) is True
    )  # …an answer not


# ───────────────────────── evaluation ─────────────────────────


def test_multiple_choice_reports_letters_and_refuses_bad_files(tmp_path: Path, tiny_tokenizer) -> None:
    from danlu.eval.multiple_choice import evaluate_multiple_choice, read_csv
    from danlu.eval.tasks import _checked_rows, letter_lines
    from danlu.io import load_checkpoint

    mc = tmp_path / "geo_dev.csv"
    rows = ["id,question,A,B,C,D,answer"] + [f"{i},问题{i}?,甲,乙,丙,丁,{'ABCD'[i % 4]}" for i in range(8)]
    mc.write_text("\n".join(rows) + "\n", encoding="gbk")
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "m", tiny_tokenizer))
    res = evaluate_multiple_choice(ckpt.model, ckpt.tokenizer, mc, keep_examples=5)
    assert sum(res["predicted_letters"].values()) == res["n"] == 8 and len(res["examples"]) == 5
    assert res["answer_letters"] == {"A": 2, "B": 2, "C": 2, "D": 2} and res["majority_letter"] == 0.25
    (line,) = letter_lines({"ceval": res})
    assert line.startswith("ceval: predicted letters") and "chance 0.2500 (uniform)" in line
    gap = tmp_path / "gap.csv"
    gap.write_text("question,A,B,D,answer\nq,1,2,3,A\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"gap\.csv:1: choice columns A, B, D have a gap"):
        read_csv(gap)
    hole = tmp_path / "hole.csv"
    hole.write_text("question,A,B,C,D,answer\nq,1,2,3,,A\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"hole\.csv:2: choice D is empty"):
        read_csv(hole)
    three = tmp_path / "three.csv"
    three.write_text("question,A,B,C,answer\nq,1,2,3,A\n", encoding="utf-8")
    assert len(read_csv(three)[0].choices) == 3  # allowed, with a warning on stderr
    empty = tmp_path / "gsm8k.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DanluError, match=r"gsm8k\.jsonl: empty file"):
        _checked_rows(empty, ("question", "answer"))


# ───────────────────────── ../shared/data ─────────────────────────


def test_shared_kdconv_alpaca_and_gsm8k_shapes(shared_data: Path, tiny_tokenizer) -> None:
    kd = read_conversations(sorted((shared_data / "kdconv").glob("*/dev.json")))
    assert len(kd) == 450 and all(c.messages[0]["role"] == "user" for c in kd)
    stats = ReadStats()
    zh = read_conversations(
        sorted((shared_data / "alpaca_zh_hikariming").glob("*.json")), on_error="skip", stats=stats
    )
    assert (
        len(zh) >= 9200
        and stats.first_skipped["empty_turn"].endswith(
            "(--skip-bad, or sft.on_error=skip, skips such conversations and counts them)"
        )
        is False
    )
    gsm = read_conversations(
        [shared_data / "gsm8k" / "train.jsonl"], columns="prompt=question,response=answer"
    )
    assert len(gsm) == 7473 and gsm[0].messages[1]["content"].endswith("#### 72")
    est = EncodeStats()
    encode_conversations(kd[:30], tiny_tokenizer, 256, "split", est)
    assert (
        est.kept_share > 0.9
    )  # KdConv at 256 tokens: split keeps nearly every answer (truncate: about a third)
    poems = [w for w, _ in located_records(shared_data / "chinese_poetry" / "宋词" / "ci.song.0.json")]
    assert len(poems) >= 20 and poems[0].endswith(":2")
