"""Language and quality filters, thresholds from the recipe (`data.filters:`).

Routing by language is the point of this module: English rules (datatrove's Gopher repetition and quality
rules, FineWeb line rules, optionally C4) count whitespace words and would reject every Chinese document, so
they only see documents identified as English; Chinese documents get Chinese rules (share of Han characters,
average line length, repeated character n-grams, Chinese stop words, spam words). Every removed document is
written to `rejected/<step>/` with its reason, and the reason is counted in the stats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.pipeline.writers.jsonl import JsonlWriter

from danlu.data.clean import count_in, count_out
from danlu.data.langid import MixedWordTokenizer, detect_language, han_ratio

# Frequent Chinese function words; running text uses many of them, keyword lists and spam use few.
ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "有", "我", "不", "这", "也", "就", "而", "及", "与", "着", "一个", "为", "以", "他", "她", "它", "们", "对", "从", "到", "被", "把"]  # fmt: skip
ZH_SPAM_WORDS = ["代开发票", "博彩", "赌场", "六合彩", "时时彩", "私服", "外挂", "裸聊", "代孕", "办证", "成人视频", "百家乐", "网赚", "刷单"]  # fmt: skip

PUBLIC_META = ("source", "domain", "lang", "url", "title")


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=lambda: ["zh", "en"])  # empty: keep every language
    min_confidence: float = 0.5
    trust_source_lang: bool = False  # keep an input's declared lang instead of the detected one


@dataclass
class LengthConfig:
    min_chars: int = 20
    max_chars: int = 1_000_000


@dataclass
class EnglishConfig:
    """datatrove's English rules; null disables a rule (or a whole filter with `enabled: false`)."""

    short_domains: list[str] = field(default_factory=lambda: ["qa", "forum"])  # short by nature: see below
    gopher_repetition: bool = True
    repetition_min_words: int = 50  # n-gram repetition shares mean nothing on a two-line answer
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    gopher_quality: bool = True
    min_doc_words: int | None = 25
    min_doc_words_short: int | None = 5  # for short_domains (a Q&A pair, a forum reply)
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    fineweb: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    char_duplicates_ratio: float = 0.1
    new_line_ratio: float = 0.3
    c4: bool = False  # C4's rules are strict (≥5 sentences, every line ending in punctuation): opt in


@dataclass
class ChineseConfig:
    enabled: bool = True
    min_han_ratio: float = 0.3
    min_avg_line_chars: float = 6.0
    max_dup_line_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    # (n characters, max share of characters covered by the most frequent n-gram)
    top_ngrams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    # (n characters, max share of characters in n-grams that occur more than once)
    dup_ngrams: list[list[float]] = field(default_factory=lambda: [[10, 0.3], [15, 0.25], [20, 0.2]])
    ngram_min_chars: int = 200  # the n-gram rules only judge documents at least this long
    min_stop_words: int = 2
    spam_words: list[str] = field(default_factory=lambda: list(ZH_SPAM_WORDS))
    max_spam_hits: int = 2


@dataclass
class FilterConfig:
    """Recipe `data.filters:`."""

    language: LanguageConfig = field(default_factory=LanguageConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    english: EnglishConfig = field(default_factory=EnglishConfig)
    chinese: ChineseConfig = field(default_factory=ChineseConfig)


def rejected_adapter(writer: Any, doc: Document) -> dict[str, Any]:
    meta = doc.metadata
    row = {"id": doc.id, "step": meta.get("rejected_by", ""), "reason": meta.get("filter_reason", "")}
    row.update({k: meta[k] for k in PUBLIC_META if meta.get(k)})
    row["text"] = doc.text
    return row


def rejected_writer(folder: str) -> DiskWriter:
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None, adapter=rejected_adapter)


class DanluFilter(BaseFilter):
    """A datatrove filter that counts docs/chars/tokens in and out and labels rejected rows with its step."""

    type = "🔻 - FILTER"

    def __init__(self, name: str, exclusion_writer: DiskWriter | None = None) -> None:
        self.name = name
        super().__init__(exclusion_writer)

    def applies(self, doc: Document) -> bool:
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.exclusion_writer or _Null() as writer:
            for doc in data:
                count_in(self, doc)
                with self.track_time():
                    result = self.filter(doc) if self.applies(doc) else True
                ok, reason = (result, None) if not isinstance(result, tuple) else result
                if ok:
                    count_out(self, doc)
                    yield doc
                    continue
                reason = reason or "rejected"
                self.stat_update(f"removed:{reason}")
                self.stat_update(f"removed_chars:{reason}", value=len(doc.text))
                if self.exclusion_writer is not None:
                    doc.metadata["filter_reason"] = reason
                    doc.metadata["rejected_by"] = self.name
                    writer.write(doc, rank)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class LanguageFilter(DanluFilter):
    """Sets `lang` from the text (unless the input declares one and `trust_source_lang`) and keeps `languages`."""

    def __init__(self, cfg: LanguageConfig, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__("filter:language", exclusion_writer)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        declared = doc.metadata.get("lang") or "auto"
        lang, conf = detect_language(doc.text)
        if self.cfg.trust_source_lang and declared != "auto":
            lang, conf = declared, 1.0
        doc.metadata["lang"] = lang
        doc.metadata["lang_score"] = round(conf, 3)
        if self.cfg.languages and lang not in self.cfg.languages:
            return False, f"language_{lang}"
        if conf < self.cfg.min_confidence:
            return False, "language_mixed"
        self.stat_update(f"lang:{lang}")
        return True


class LengthFilter(DanluFilter):
    def __init__(self, cfg: LengthConfig, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__("filter:length", exclusion_writer)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.strip())
        if n == 0:
            return False, "empty"
        if n < self.cfg.min_chars:
            return False, "too_short"
        if n > self.cfg.max_chars:
            return False, "too_long"
        return True


class LanguageRouted(DanluFilter):
    """Runs a datatrove filter only on documents of one language (and at least `min_words` words); the others
    pass untouched. Documents of `short_domains` go to `short_inner` (the same rules, short-text thresholds)."""

    def __init__(
        self,
        name: str,
        inner: BaseFilter,
        lang: str,
        exclusion_writer: DiskWriter | None = None,
        *,
        min_words: int = 0,
        short_inner: BaseFilter | None = None,
        short_domains: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, exclusion_writer)
        self.inner, self.short_inner = inner, short_inner
        self.lang, self.min_words, self.short_domains = lang, min_words, tuple(short_domains)

    def applies(self, doc: Document) -> bool:
        if doc.metadata.get("lang") != self.lang:
            return False
        return self.min_words <= 0 or len(doc.text.split()) >= self.min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.short_inner is not None and doc.metadata.get("domain") in self.short_domains:
            return self.short_inner.filter(doc)
        return self.inner.filter(doc)


def english_filters(cfg: EnglishConfig, writer_for: Any) -> list[DanluFilter]:
    """datatrove's English rules, each routed to `lang == "en"`; `writer_for(name)` gives its rejected writer."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    words = MixedWordTokenizer()  # no NLTK/spaCy download; identical to whitespace-ish splitting for English
    out: list[DanluFilter] = []
    if cfg.gopher_repetition:
        inner = GopherRepetitionFilter(
            dup_line_frac=cfg.dup_line_frac,
            dup_para_frac=cfg.dup_para_frac,
            dup_line_char_frac=cfg.dup_line_char_frac,
            dup_para_char_frac=cfg.dup_para_char_frac,
            language=words,
        )
        out.append(
            LanguageRouted(
                "filter:gopher_repetition",
                inner,
                "en",
                writer_for("gopher_repetition"),
                min_words=cfg.repetition_min_words,
            )
        )
    if cfg.gopher_quality:

        def gopher(min_words: int | None) -> BaseFilter:
            return GopherQualityFilter(
                min_doc_words=min_words,
                max_doc_words=cfg.max_doc_words,
                min_avg_word_length=cfg.min_avg_word_length,
                max_avg_word_length=cfg.max_avg_word_length,
                max_symbol_word_ratio=cfg.max_symbol_word_ratio,
                max_non_alpha_words_ratio=cfg.max_non_alpha_words_ratio,
                min_stop_words=cfg.min_stop_words,
                language=words,
            )

        out.append(
            LanguageRouted(
                "filter:gopher_quality",
                gopher(cfg.min_doc_words),
                "en",
                writer_for("gopher_quality"),
                short_inner=gopher(cfg.min_doc_words_short),
                short_domains=cfg.short_domains,
            )  # fmt: skip
        )
    if cfg.fineweb:

        def fineweb(short_line_thr: float) -> BaseFilter:
            return FineWebQualityFilter(
                line_punct_thr=cfg.line_punct_thr,
                short_line_thr=short_line_thr,
                char_duplicates_ratio=cfg.char_duplicates_ratio,
                new_line_ratio=cfg.new_line_ratio,
                language=words,
            )

        out.append(
            LanguageRouted(
                "filter:fineweb",
                fineweb(cfg.short_line_thr),
                "en",
                writer_for("fineweb"),
                short_inner=fineweb(1.01),
                short_domains=cfg.short_domains,
            )  # fmt: skip
        )
    if cfg.c4:
        inner = C4QualityFilter(language=words)
        out.append(LanguageRouted("filter:c4", inner, "en", writer_for("c4")))
    return out


def _ngram_stats(chars: str, n: int) -> tuple[float, float]:
    """(share of chars in the most frequent n-gram's occurrences, share of chars in repeated n-grams)."""
    if len(chars) < n + 1:
        return 0.0, 0.0
    counts: dict[str, int] = {}
    grams = [chars[i : i + n] for i in range(len(chars) - n + 1)]
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    top = max(counts.values())
    top_share = top * n / len(chars) if top > 1 else 0.0
    covered = bytearray(len(chars))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return min(top_share, 1.0), sum(covered) / len(chars)


_NON_CONTENT = re.compile(r"[\s\W_]+")


class ChineseQualityFilter(DanluFilter):
    """Rules for Chinese text (character based; see the module docstring). Reasons are prefixed `zh_`."""

    def __init__(self, cfg: ChineseConfig, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__("filter:chinese", exclusion_writer)
        self.cfg = cfg

    def applies(self, doc: Document) -> bool:
        return doc.metadata.get("lang") == "zh"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        c = self.cfg
        text = doc.text
        if han_ratio(text) < c.min_han_ratio:
            return False, "zh_low_han_ratio"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return False, "empty"
        if sum(map(len, lines)) / len(lines) < c.min_avg_line_chars:
            return False, "zh_short_lines"
        if len(lines) > 2:
            seen: dict[str, int] = {}
            for ln in lines:
                seen[ln] = seen.get(ln, 0) + 1
            dup_lines = sum(v for v in seen.values() if v > 1)
            dup_chars = sum(len(k) * v for k, v in seen.items() if v > 1)
            if dup_lines / len(lines) > c.max_dup_line_frac:
                return False, "zh_dup_lines"
            if dup_chars / max(1, sum(map(len, lines))) > c.max_dup_line_char_frac:
                return False, "zh_dup_line_chars"
        chars = _NON_CONTENT.sub("", text)
        if len(chars) < c.ngram_min_chars:
            return self._words_rules(text)
        for n, limit in c.top_ngrams:
            top, _ = _ngram_stats(chars, int(n))
            if top > limit:
                return False, f"zh_top_{int(n)}gram"
        for n, limit in c.dup_ngrams:
            _, dup = _ngram_stats(chars, int(n))
            if dup > limit:
                return False, f"zh_dup_{int(n)}gram"
        return self._words_rules(text)

    def _words_rules(self, text: str) -> bool | tuple[bool, str]:
        c = self.cfg
        if c.min_stop_words and sum(text.count(w) for w in ZH_STOP_WORDS) < c.min_stop_words:
            return False, "zh_few_stop_words"
        if c.spam_words and sum(text.count(w) for w in c.spam_words) > c.max_spam_hits:
            return False, "zh_spam_words"
        return True
