"""Source readers on small files in the real dump formats, including each format's awkward cases."""

from __future__ import annotations

import bz2
import json

import pytest
from fixtures_data import (
    write_html,
    write_jsonl,
    write_reddit,
    write_stackexchange,
    write_warc,
    write_wikipedia,
)

from danlu import DanluError
from danlu.data.sources import READERS
from danlu.data.sources.wikipedia import wikitext_to_text


def read(kind: str, files, **kw):
    cls, _ = READERS[kind]
    reader = cls([str(f) for f in files], **kw)
    return list(reader(None, 0, 1)), reader


@pytest.mark.parametrize("compress", [False, True])
def test_wikipedia_keeps_articles_drops_redirects_talk_and_empty(tmp_path, compress):
    path = write_wikipedia(tmp_path, compress=compress)
    docs, reader = read("wikipedia", [path])
    assert [d.id for d in docs] == ["wikipedia:1", "wikipedia:4"]
    en, zh = docs
    assert en.text.startswith("Mount Everest is Earth's highest mountain")
    for markup in ("{{", "[[", "<ref", "'''", "{|", "Category:", "thumb", "== Name"):
        assert markup not in en.text
    assert "Tibetan name is Chomolungma" in en.text and "References" not in en.text
    assert en.metadata["url"] == "https://en.wikipedia.org/wiki/Mount_Everest"
    assert en.metadata["domain"] == "encyclopedia" and en.metadata["source"] == "wikipedia"
    assert zh.text.startswith("长江是亚洲第一长河") and "中国水利年鉴" not in zh.text
    assert reader.stats["pages_dropped"].total == 3  # redirect, Talk: page, page empty after markup removal


def test_wikitext_links_keep_labels():
    assert (
        wikitext_to_text("See [[Paris|the capital]] and [[Lyon]]. [[Category:X]]")
        == "See the capital and Lyon."
    )


def test_stackexchange_accepted_best_and_missing_answers(tmp_path):
    docs, reader = read(
        "stackexchange", [write_stackexchange(tmp_path)], options={"base_url": "https://so.example"}
    )
    assert [d.id for d in docs] == ["stackexchange:1", "stackexchange:4"]
    q1, q4 = docs
    # the accepted answer wins over a higher-scored one
    assert "generator expression" in q1.metadata["messages"][1]["content"]
    assert "sum(x for x in xs if x % 2 == 0)" in q1.text and "<p>" not in q1.text
    assert q1.metadata["messages"][0]["content"].startswith("How do I sum the even numbers")
    assert q1.metadata["url"] == "https://so.example/questions/1"
    # no accepted answer: the best-scored one
    assert q4.metadata["messages"][1]["content"].startswith("这是瑞利散射造成的")
    assert reader.stats["questions_without_answer"].total == 1


@pytest.mark.parametrize("compress", [False, True])
def test_reddit_threads_drop_deleted_and_bots(tmp_path, compress):
    docs, reader = read("reddit", [write_reddit(tmp_path, compress=compress)])
    assert [d.id for d in docs] == ["reddit:abc"]  # the deleted submission's thread is gone
    doc = docs[0]
    for gone in ("[deleted]", "Reply to a deleted comment", "I am a bot", "messaging you"):
        assert gone not in doc.text
    msgs = doc.metadata["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"].startswith("What is the best way to learn to cook?")
    assert msgs[3]["content"].startswith("Taste it a minute")
    assert doc.metadata["url"] == "https://www.reddit.com/r/Cooking/comments/abc/best_way/"
    assert reader.stats["bot_dropped"].total == 2 and reader.stats["deleted_dropped"].total >= 1


def test_reddit_threads_split_over_ranks(tmp_path):
    path = write_reddit(tmp_path)
    cls, _ = READERS["reddit"]
    got = [d.id for rank in range(3) for d in cls([str(path)])(None, rank, 3)]
    assert got == ["reddit:abc"]  # every rank reads the file, exactly one keeps the thread


def test_html_and_warc_main_text(tmp_path):
    (doc,), _ = read("html", [write_html(tmp_path)])
    assert doc.text.startswith("政府工作报告提出推动科技创新")
    assert "要继续推动科技创新和产业升级" in doc.text
    assert "首页" not in doc.text and "体育" not in doc.text  # navigation is not main text
    assert doc.metadata["domain"] == "news"
    docs, reader = read("warc", [write_warc(tmp_path)])
    assert len(docs) == 1 and "public library network" in docs[0].text
    assert docs[0].metadata["url"] == "https://news.example.com/library"
    assert reader.stats["non_html_records"].total == 1


def test_text_jsonl_parquet_and_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("一篇纯文本文档。", encoding="utf-8")
    rows = [
        {"text": "hello", "id": "r1", "domain": "news", "lang": "en", "url": "u"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
    ]
    write_jsonl(tmp_path / "b.jsonl", rows)
    pq.write_table(pa.Table.from_pylist([{"content": "parquet row", "id": 7}]), tmp_path / "c.parquet")
    (t,), _ = read("text", [tmp_path / "a.txt"])
    assert t.text == "一篇纯文本文档。" and t.id == "text:a.txt"
    docs, _ = read("jsonl", [tmp_path / "b.jsonl"])
    assert docs[0].metadata["domain"] == "news" and docs[0].id == "text:r1"
    assert docs[1].text == "hi\n\nhello!" and docs[1].metadata["messages"][1]["content"] == "hello!"
    (p,), _ = read("parquet", [tmp_path / "c.parquet"], options={"text_field": "content"})
    assert p.text == "parquet row" and p.id == "text:7"


# -- bad input -----------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_fails_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n{"text": "after"}\n', encoding="utf-8")
    with pytest.raises(DanluError, match=r"bad\.jsonl:2: malformed JSON"):
        read("jsonl", [path], on_error="fail")
    docs, reader = read("jsonl", [path], on_error="skip", error_dir=str(tmp_path / "errors"))
    assert [d.text for d in docs] == ["ok", "after"]
    assert reader.stats["read_errors"].total == 1
    (log,) = (tmp_path / "errors").glob("*.jsonl")
    row = json.loads(log.read_text())
    assert row["file"] == str(path) and row["position"] == "2" and row["step"] == "read"


def test_truncated_bz2_dump_is_named(tmp_path):
    path = write_wikipedia(tmp_path, compress=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DanluError, match=r"wiki\.xml\.bz2.*truncated"):
        read("wikipedia", [path], on_error="fail")
    docs, reader = read("wikipedia", [path], on_error="skip")
    assert reader.stats["read_errors"].total == 1


def test_truncated_xml_names_line_and_column(tmp_path):
    path = write_wikipedia(tmp_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.index("<page><title>长江")] + "<page><title>Cut", encoding="utf-8")
    with pytest.raises(DanluError, match=r"wiki\.xml:\d+:\d+: malformed or truncated XML"):
        read("wikipedia", [path], on_error="fail")
    docs, _ = read("wikipedia", [path], on_error="skip")
    assert [d.id for d in docs] == ["wikipedia:1"]  # what came before the damage is kept


def test_wrong_file_type_is_named(tmp_path):
    """A dump that is not what its name says stops with one message naming the file and what it is (issue 19)."""
    path = tmp_path / "Posts.xml"
    path.write_text('{"text": "this is JSON, not XML"}', encoding="utf-8")
    with pytest.raises(
        DanluError, match=r"Posts\.xml: not XML \(it starts with .*\{.*not a Stack Exchange Posts"
    ):
        read("stackexchange", [path], on_error="fail")
    comments = tmp_path / "se" / "Posts.xml"  # another Stack Exchange table saved under the wrong name
    comments.parent.mkdir()
    comments.write_text('<?xml version="1.0"?>\n<comments>\n  <row Id="1" Text="hi" />\n</comments>\n')
    with pytest.raises(DanluError, match=r"root element is <comments>, not <posts>: not a Stack Exchange"):
        read("stackexchange", [comments], on_error="fail")
    wiki = tmp_path / "notwiki.xml"
    wiki.write_text("<html><body>hello</body></html>", encoding="utf-8")
    with pytest.raises(DanluError, match=r"notwiki\.xml: an HTML page, not a MediaWiki XML dump"):
        read("wikipedia", [wiki], on_error="fail")
    page = tmp_path / "page.xml"  # real-world HTML is not even well-formed XML
    page.write_text("<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>x</title>\n<p>hi<br></html>")
    with pytest.raises(DanluError, match=r"page\.xml: an HTML page, not a MediaWiki XML dump"):
        read("wikipedia", [page], on_error="fail")
    _, reader = read("wikipedia", [page], on_error="skip")
    assert reader.stats["read_errors"].total == 1
    fake = tmp_path / "zhwiki.xml.bz2"  # plain XML with a .bz2 name
    fake.write_bytes(bz2.decompress(write_wikipedia(tmp_path / "w", compress=True).read_bytes()))
    with pytest.raises(DanluError, match=r"zhwiki\.xml\.bz2: named \.bz2 but not bzip2-compressed \(it starts with "
                       r"b'<mediawi', which looks like uncompressed text\)"):  # fmt: skip
        read("wikipedia", [fake], on_error="fail")
    gz = tmp_path / "RC.jsonl.gz"
    gz.write_bytes(b"\x00\x01binary")
    with pytest.raises(DanluError, match=r"RC\.jsonl\.gz: named \.gz but not gzip-compressed"):
        read("reddit", [gz], on_error="fail")
    warc = tmp_path / "x.warc"
    warc.write_text("not a warc file\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"x\.warc:byte 0: not a WARC record header"):
        read("warc", [warc], on_error="fail")


def test_corrupt_zst_is_named(tmp_path):
    path = tmp_path / "RC.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 20)
    with pytest.raises(DanluError, match=r"RC\.jsonl\.zst:1: corrupt or truncated"):
        read("reddit", [path], on_error="fail")


def test_bz2_helper_roundtrip(tmp_path):
    assert bz2.decompress(write_wikipedia(tmp_path, compress=True).read_bytes()).startswith(b"<mediawiki")


def test_text_sources_read_gb18030_and_skip_oversized_records(tmp_path, monkeypatch):
    """`data prepare` reads through the one reader of danlu.files: GBK/GB18030 files decode, and a record over the
    size bound is skipped unread and counted, not parsed (issue 16)."""
    import danlu.files

    rows = [
        {"text": "中国最高的山是珠穆朗玛峰。这是一段用 GBK 编码保存的文字。"},
        {"text": "长江是中国最长的河。"},
    ]
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("gb18030"))
    txt = tmp_path / "gbk.txt"
    txt.write_bytes("黄河是中国第二长的河。".encode("gb18030"))
    docs, _ = read("text", [gbk, txt])
    assert [d.text for d in docs] == [rows[0]["text"], rows[1]["text"], "黄河是中国第二长的河。"]

    monkeypatch.setattr(danlu.files, "MAX_RECORD_CHARS", 200)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * 1000}) + "\n" + json.dumps(rows[1], ensure_ascii=False) + "\n")
    docs, reader = read("text", [big], on_error="skip")
    assert [d.text for d in docs] == [rows[1]["text"]] and reader.stats["read_errors"].total == 1
    with pytest.raises(
        DanluError, match=r"big\.jsonl:1: a record of 1,0\d\d characters, longer than the bound"
    ):
        read("text", [big], on_error="fail")
