"""Wikipedia (MediaWiki XML export) dumps, `.xml` or `.xml.bz2`: articles as plain text.

The dump is streamed (`iter_xml_elements`): memory stays that of one page whatever the file's size.
Redirects, non-article namespaces (Talk:, User:, File:, …) and pages left empty after markup removal are
dropped. The wikitext converter is deliberately small — templates, tables, references and file links are removed;
links keep their label; headings, lists and emphasis become plain text — good enough for pretraining text
without the weight of a full parser.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

from danlu.data.sources.base import SourceError, SourceReader, iter_xml_elements

_DROP_LINK_PREFIXES = (
    "file", "image", "category", "media", "文件", "檔案", "图像", "圖像", "分类", "分類", "wikipedia", "wp",
    "template", "help", "portal",
)  # fmt: skip
_TAIL_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "sources", "bibliography",
    "参考文献", "參考文獻", "参考资料", "參考資料", "外部链接", "外部連結", "参见", "參見", "注释", "註釋",
}  # fmt: skip
REDIRECT_RE = re.compile(r"^\s*#\s*(redirect|重定向)", re.IGNORECASE)

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_DROP_TAG_CONTENT = re.compile(
    r"<(math|gallery|syntaxhighlight|source|timeline|score)[^>]*>.*?</\1>", re.DOTALL
)
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)


def _link(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _DROP_LINK_PREFIXES:
        return ""
    return (label or target).strip()


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str, limit: int = 50) -> str:
    for _ in range(limit):  # nested constructs: remove innermost first
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of an article's wikitext (see the module docstring for what is kept)."""
    t = _COMMENT.sub("", wikitext)
    t = _DROP_TAG_CONTENT.sub("", t)
    t = _REF.sub("", t)
    t = _sub_until_stable(_TEMPLATE, "", t)
    t = _sub_until_stable(_TABLE, "", t)
    t = _sub_until_stable(_LINK, _link, t)
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    t = _EMPHASIS.sub("", t)
    t = _TAG.sub("", t)
    t = _MAGIC.sub("", t)
    t = html.unescape(t)
    # headings become their own lines; tail sections (references, external links) are cut
    out: list[str] = []
    for line in t.split("\n"):
        m = _HEADING.match(line)
        if m:
            title = m.group(2).strip()
            if title.lower() in _TAIL_SECTIONS:
                break
            out.extend(["", "\x00" + title])
            continue
        line = _LIST_MARK.sub("", line).strip()
        if line.startswith(("{|", "|}", "|", "!")):  # table debris from unbalanced markup
            continue
        out.append(line)
    # a heading stays only if some text follows it before the next heading
    lines: list[str] = []
    for i, line in enumerate(out):
        if line.startswith("\x00"):
            nxt = next((x for x in out[i + 1 :] if x.strip()), "\x00")
            if nxt.startswith("\x00"):
                continue
            line = line[1:]
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class WikipediaReader(SourceReader):
    """MediaWiki XML dumps → one document per article (namespace 0, not a redirect, not empty)."""

    source_name = "wikipedia"
    default_domain = "encyclopedia"

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        base_url = self.options.get("base_url") or ""
        pages = 0
        try:
            for tag, elem in iter_xml_elements(path, "mediawiki", "a MediaWiki XML dump"):
                if tag == "base" and not base_url and elem.text:
                    base_url = elem.text.rsplit("/", 1)[0] + "/"
                if tag != "page":
                    continue
                pages += 1
                rec = self._page(elem, base_url)
                if rec is None:
                    self.stat_update("pages_dropped")
                    continue
                yield rec
        except ET.ParseError as e:
            line, col = e.position
            what = "not a MediaWiki XML dump" if pages == 0 and line <= 1 else "malformed or truncated XML"
            raise SourceError(path, f"{line}:{col}", f"{what} ({e})") from None
        except EOFError as e:
            raise SourceError(path, f"page {pages + 1}", f"truncated compressed file ({e})") from None
        except OSError as e:
            raise SourceError(path, f"page {pages + 1}", f"corrupt compressed file ({e})") from None

    def _page(self, page: ET.Element, base_url: str) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        redirect = False
        for child in page.iter():
            tag = _local(child.tag)
            if tag == "redirect":
                redirect = True
            elif tag in ("title", "ns", "id") and tag not in fields:
                fields[tag] = (child.text or "").strip()
            elif tag == "text":
                fields["wikitext"] = child.text or ""
        ns = fields.get("ns", "0")
        wikitext = fields.get("wikitext", "")
        if ns != "0" or redirect or REDIRECT_RE.match(wikitext):
            return None
        text = wikitext_to_text(wikitext)
        if not text.strip():
            return None
        title = fields.get("title", "")
        if title and not text.startswith(title):
            text = f"{title}\n\n{text}"
        url = f"{base_url}{title.replace(' ', '_')}" if base_url and title else ""
        return {"text": text, "id": fields.get("id") or title, "url": url, "title": title}
