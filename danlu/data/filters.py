"""Language and quality filters, thresholds from the recipe (`data.filters:`).

Routing by language is the point of this module: English rules (datatrove's Gopher repetition and quality
rules, FineWeb line rules, optionally C4) count whitespace words and would reject every Chinese document, so
they only see documents identified as English; Chinese documents get Chinese rules (share of Han characters,
average line length, repeated character n-grams, Chinese stop words, spam words). Every removed document is
written to `rejected/<step>/` with its reason, and the reason is counted in the stats.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.text import PUNCTUATION_SET, split_into_words

from danlu.data.clean import count_in, count_out, flush_tally, tally
from danlu.data.langid import WORD_HASHES, MixedWordTokenizer, WordMemo, detect_language, han_ratio

# Frequent Chinese function words; running text uses many of them, keyword lists and spam use few.
ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "有", "我", "不", "这", "也", "就", "而", "及", "与", "着", "一个", "为", "以", "他", "她", "它", "们", "对", "从", "到", "被", "把"]  # fmt: skip
ZH_SPAM_WORDS = ["代开发票", "博彩", "赌场", "六合彩", "时时彩", "私服", "外挂", "裸聊", "代孕", "办证", "成人视频", "百家乐", "网赚", "刷单"]  # fmt: skip

# function words of classical Chinese (文言): 之乎者也 and their kin, which modern stop-word lists lack
ZH_CLASSICAL_WORDS = ["之", "乎", "者", "也", "矣", "焉", "哉", "兮", "曰", "其", "于", "於", "则", "乃", "亦", "所", "何", "若", "无", "無"]  # fmt: skip
_VERSE_END = tuple("，。！？；、：」』”")

EN_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with", "is", "are", "was", "a", "an", "in", "it", "for", "on", "as", "by", "at", "this", "from"]  # fmt: skip

PUBLIC_META = ("source", "domain", "lang", "url", "title")


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=lambda: ["zh", "en"])  # empty: keep every language
    min_confidence: float = 0.5
    trust_source_lang: bool = False  # keep an input's declared lang instead of the detected one


@dataclass
class LengthConfig:
    # a floor against empty and near-empty documents; "问：9×11=？答：等于99。" is a whole Q&A pair in 15
    # characters, and the language rules (Gopher's word count, Chinese stop words) judge short texts better
    min_chars: int = 10
    max_chars: int = 1_000_000


@dataclass
class EnglishConfig:
    """datatrove's English rules; null disables a rule, `gopher_repetition/gopher_quality/fineweb: false` a filter.

    `short_domains` are sources whose documents are legitimately short and made of short lines (a stub article
    with an infobox table, a Q&A thread, a forum reply): there the `*_short` thresholds apply (fewer words,
    one stop word, shorter words, more echoes of one phrase, more duplicated answer lines) and FineWeb's
    line-shape rules (line-end punctuation, short lines, list ratio) are off. News and web pages get the web
    thresholds.
    """

    short_domains: list[str] = field(
        default_factory=lambda: ["encyclopedia", "qa", "forum", "instruction", "dialog"]
    )
    gopher_repetition: bool = True
    repetition_min_words: int = 20  # below this the repetition rules do not judge at all
    # In a document of fewer than `echo_max_words` words, an n-gram said at most `echo_count` times is an echo
    # (a headline repeated in the lead), not repetition; in short domains at most `echo_count_short` times
    # (the answers in a thread each restate the same fact). Keyword stuffing repeats its phrase far more.
    echo_max_words: int = 200
    echo_count: int = 2
    echo_count_short: int = 5
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    gopher_quality: bool = True
    min_doc_words: int | None = 25
    min_doc_words_short: int | None = 5
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    min_avg_word_length_short: int | None = 2  # "Q: What is 7 + 5? A: It is 12." is short words by nature
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    min_stop_words_short: int | None = 1
    # Gopher's eight words, and the next most frequent English function words: the rule asks "is this running
    # text?", and "is", "a", "in" answer it as well as "the" does (keyword lists and spam have none of them)
    stop_words: list[str] = field(default_factory=lambda: list(EN_STOP_WORDS))
    numbers_are_words: bool = True  # see EnglishQualityFilter
    fineweb: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    char_duplicates_ratio: float = 0.1
    char_duplicates_ratio_short: float = 0.2  # two people giving the same one-line answer
    new_line_ratio: float = 0.3
    c4: bool = False  # C4's rules are strict (≥5 sentences, every line ending in punctuation): opt in


@dataclass
class ChineseConfig:
    enabled: bool = True
    min_han_ratio: float = 0.3  # Han characters among letters; digits and symbols count for no language
    min_avg_line_chars: float = 6.0
    # repeated lines, counted as Gopher counts them: the copies after a line's first occurrence
    max_dup_line_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    # (n characters, max share of characters covered by the most frequent n-gram)
    top_ngrams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    # (n characters, max share of characters in n-grams that occur more than once)
    dup_ngrams: list[list[float]] = field(default_factory=lambda: [[10, 0.3], [15, 0.25], [20, 0.2]])
    ngram_min_chars: int = 200  # the n-gram rules only judge documents at least this long
    min_stop_words: int = 2
    # a text shorter than this (content characters) needs only one stop word: "问：23减3是多少？答：等于20。"
    # has one, a keyword list of any length has none
    stop_words_short_chars: int = 60
    spam_words: list[str] = field(default_factory=lambda: list(ZH_SPAM_WORDS))
    max_spam_hits: int = 2
    # classical Chinese and verse: function words of 文言 count as stop words, and verse (most lines short and
    # ending in punctuation, as poems and ci are written) is exempt from the short-lines rule; sources of these
    # domains skip the line and stop-word rules altogether
    classical_stop_words: list[str] = field(default_factory=lambda: list(ZH_CLASSICAL_WORDS))
    verse_line_share: float = 0.7
    classical_domains: list[str] = field(default_factory=lambda: ["poetry", "classical", "verse"])


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
            try:
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
                    tally(self, f"removed:{reason}")
                    tally(self, f"removed_chars:{reason}", len(doc.text))
                    if self.exclusion_writer is not None:
                        doc.metadata["filter_reason"] = reason
                        doc.metadata["rejected_by"] = self.name
                        writer.write(doc, rank)
            finally:
                flush_tally(self)


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
        mixed = (
            lang in ("zh", "en") and "zh" in (self.cfg.languages or ["zh"]) and han_ratio(doc.text) >= 0.25
        )
        if (
            mixed
        ):  # Chinese with English terms and numbers ("Python 3.12 的 asyncio 模块…"): the English rules count
            lang, conf = "zh", max(conf, self.cfg.min_confidence)  # whitespace words and would reject it
        doc.metadata["lang"] = lang
        doc.metadata["lang_score"] = round(conf, 3)
        if self.cfg.languages and lang not in self.cfg.languages:
            return False, f"language_{lang}"
        if conf < self.cfg.min_confidence:
            return False, "language_mixed"
        tally(self, f"lang:{lang}")
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
    """Runs a datatrove filter (anything with `filter(doc)`) only on documents of one language (and at least
    `min_words` words); the others pass untouched. Documents of `short_domains` go to `short_inner` (the same rules, short-text thresholds)."""

    def __init__(
        self,
        name: str,
        inner: Any,
        lang: str,
        exclusion_writer: DiskWriter | None = None,
        *,
        min_words: int = 0,
        short_inner: Any = None,
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
        if self.short_inner is not None and is_short_kind(doc, self.short_domains):
            return self.short_inner.filter(doc)
        return self.inner.filter(doc)


def is_short_kind(doc: Document, short_domains: tuple[str, ...] | list[str]) -> bool:
    """Documents that are short by nature: a short domain, or a conversation (an instruction answer such as
    "Paris." is complete; web-page length rules would reject half of an instruction dataset)."""
    return doc.metadata.get("domain") in short_domains or bool(doc.metadata.get("messages"))


CONTENT, ALPHA, NUMBER = 1, 2, 4


class _WordKinds(WordMemo):
    """Word → bit flags (CONTENT: not only punctuation, ALPHA: has a letter, NUMBER: all digits)."""

    def compute(self, word: str) -> int:
        kind = CONTENT if any(ch not in PUNCTUATION_SET for ch in word) else 0
        kind |= ALPHA if any(ch.isalpha() for ch in word) else 0
        return kind | (NUMBER if word.isdigit() else 0)


_KINDS = _WordKinds()


class EnglishQualityFilter(GopherQualityFilter):
    """datatrove's Gopher quality rules, with the same thresholds and reasons, corrected for two cases where
    they judge clean text by its form rather than its quality:

    - stop words are counted case-insensitively ("The" is the stop word "the"; Gopher's list is lower case,
      and a sentence-initial "The" is the commonest way it occurs in a short text);
    - with `numbers_are_words`, numbers ("42", "1865") are words, not non-alphabetic junk: they are left out of
      the mean word length (a digit string's length says nothing about prose) and count as words in the
      alphabetic-word share, so arithmetic, dates and tables of figures are judged by their other words.
    """

    def __init__(self, *, numbers_are_words: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.numbers_are_words = numbers_are_words
        self.stop_words = {w.lower() for w in self.stop_words}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        if n_words == 0:
            return False, "gopher_short_doc"
        kinds = np.fromiter(map(_KINDS.__getitem__, words), dtype=np.uint8, count=n_words)
        content = (kinds & CONTENT) > 0
        n_content = int(content.sum())
        if self.min_doc_words and n_content < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_content > self.max_doc_words:
            return False, "gopher_long_doc"
        numeric = (
            content & ((kinds & NUMBER) > 0) if self.numbers_are_words else np.zeros(n_words, dtype=bool)
        )
        measured = content & ~numeric
        if measured.any():
            lengths = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
            avg = float(lengths[measured].mean())
            if self.min_avg_word_length and avg < self.min_avg_word_length:
                return False, "gopher_below_avg_threshold"
            if self.max_avg_word_length and avg > self.max_avg_word_length:
                return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:  # fmt: skip
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        if self.max_bullet_lines_ratio and sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio:  # fmt: skip
            return False, "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio and sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio:  # fmt: skip
            return False, "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio:
            alpha = int(((kinds & ALPHA) > 0).sum() + numeric.sum())
            if alpha / n_words < self.max_non_alpha_words_ratio:
                return False, "gopher_below_alpha_threshold"
        if self.min_stop_words:
            found = {w.lower() for w in set(words)} & self.stop_words
            if len(found) < self.min_stop_words:
                return False, "gopher_enough_stop_words"
        return True


_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mod 2**64 loses nothing
_FRESH = np.uint64(1 << 63)  # keys that stand for "never a repeat" in the duplicated-n-gram walk


class RepetitionFilter:
    """Gopher's repetition rules (datatrove's thresholds and reasons), with the n-gram rules vectorized.

    Paragraph and line rules are datatrove's own. The n-gram rules measure the same shares as datatrove's
    `find_top_duplicate` / `find_all_duplicate`, on word hashes rolled into 64-bit n-gram keys and counted
    with numpy instead of joining a string per n-gram; the sequential duplicated-n-gram walk only runs when a
    vectorized upper bound (all repeated occurrences) is over the threshold, which clean text rarely is.

    One difference, for short texts: in a document of fewer than `echo_max_words` words, n-grams that occur at
    most `echo_count` times are echoes (a headline repeated in the lead, answers restating one fact), not
    repetition, and count for neither n-gram rule; keyword stuffing repeats its phrase far more often.
    """

    def __init__(
        self,
        *,
        dup_line_frac: float | None = 0.3,
        dup_para_frac: float | None = 0.3,
        dup_line_char_frac: float | None = 0.2,
        dup_para_char_frac: float | None = 0.2,
        top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_n_grams: tuple[tuple[int, float], ...] = (
            (5, 0.15),
            (6, 0.14),
            (7, 0.13),
            (8, 0.12),
            (9, 0.11),
            (10, 0.1),
        ),
        echo_max_words: int = 0,
        echo_count: int = 2,
        language: Any = None,
    ) -> None:
        self.lines = GopherRepetitionFilter(
            dup_line_frac=dup_line_frac, dup_para_frac=dup_para_frac, dup_line_char_frac=dup_line_char_frac,
            dup_para_char_frac=dup_para_char_frac, top_n_grams=(), dup_n_grams=(), language=language,
        )  # fmt: skip
        self.top_n_grams, self.dup_n_grams = tuple(top_n_grams), tuple(dup_n_grams)
        self.echo_max_words, self.echo_count, self.language = echo_max_words, echo_count, language

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        verdict = self.lines.filter(doc)
        if verdict is not True:
            return verdict
        words = split_into_words(doc.text, self.language)
        return self._ngram_rules(words, len(doc.text)) if words else True

    def _ngram_rules(self, words: list[str], n_chars: int) -> bool | tuple[bool, str]:
        ids = np.fromiter(map(WORD_HASHES.__getitem__, words), dtype=np.uint64, count=len(words))
        ends = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)), out=ends[1:])
        echo = self.echo_count if len(words) < self.echo_max_words else 1
        top = dict(self.top_n_grams)
        dup = dict(self.dup_n_grams)
        h = ids
        for n in range(1, max([*top, *dup, 1]) + 1):
            if n > 1:
                h = h[:-1] * _ROLL + ids[n - 1 :]
            if len(h) == 0:
                break
            if n not in top and n not in dup:
                continue
            _, first, inverse, counts = np.unique(
                h, return_index=True, return_inverse=True, return_counts=True
            )
            gram_chars = ends[n:] - ends[:-n]  # characters of each n-gram's words, without separators
            if n in top:
                most = int(counts.max())
                if most > echo or echo == 1:
                    # the n-gram (with its spaces) that reaches the top count first, as Counter.most_common does
                    pos = int(first[counts == most].min())
                    if (gram_chars[pos] + n - 1) * most / n_chars > top[n]:
                        return False, f"top_{n}_gram"
            if n in dup:
                later = first[inverse] != np.arange(len(h))
                if echo > 1:
                    later &= counts[inverse] > echo
                limit = dup[n] * n_chars
                if later.any() and int(gram_chars[later].sum()) > limit:
                    keys = np.where(counts[inverse] > echo, h, np.arange(len(h), dtype=np.uint64) + _FRESH)
                    if _walk_duplicates(keys.tolist(), gram_chars.tolist(), n) > limit:
                        return False, f"duplicated_{n}_n_grams"
        return True


def _walk_duplicates(keys: list[int], chars: list[int], n: int) -> int:
    """Gopher's duplicated-n-gram count: walk the n-grams; a repeat adds its characters and jumps past itself."""
    seen: set[int] = set()
    repeated = i = 0
    while i < len(keys):
        if keys[i] in seen:
            repeated += chars[i]
            i += n
        else:
            seen.add(keys[i])
            i += 1
    return repeated


def english_filters(cfg: EnglishConfig, writer_for: Any) -> list[DanluFilter]:
    """datatrove's English rules, each routed to `lang == "en"`; `writer_for(name)` gives its rejected writer."""
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter

    words = MixedWordTokenizer()  # no NLTK/spaCy download; identical to whitespace-ish splitting for English
    short = cfg.short_domains
    out: list[DanluFilter] = []
    if cfg.gopher_repetition:

        def repetition(echo_count: int) -> RepetitionFilter:
            return RepetitionFilter(
                dup_line_frac=cfg.dup_line_frac,
                dup_para_frac=cfg.dup_para_frac,
                dup_line_char_frac=cfg.dup_line_char_frac,
                dup_para_char_frac=cfg.dup_para_char_frac,
                echo_max_words=cfg.echo_max_words,
                echo_count=echo_count,
                language=words,
            )

        out.append(
            LanguageRouted(
                "filter:gopher_repetition",
                repetition(cfg.echo_count),
                "en",
                writer_for("gopher_repetition"),
                min_words=cfg.repetition_min_words,
                short_inner=repetition(cfg.echo_count_short),
                short_domains=short,
            )
        )
    if cfg.gopher_quality:

        def gopher(min_words: int | None, min_stop_words: int | None, min_avg: int | None) -> BaseFilter:
            return EnglishQualityFilter(
                min_doc_words=min_words,
                max_doc_words=cfg.max_doc_words,
                min_avg_word_length=min_avg,
                max_avg_word_length=cfg.max_avg_word_length,
                max_symbol_word_ratio=cfg.max_symbol_word_ratio,
                max_non_alpha_words_ratio=cfg.max_non_alpha_words_ratio,
                min_stop_words=min_stop_words,
                stop_words=cfg.stop_words,
                numbers_are_words=cfg.numbers_are_words,
                language=words,
            )

        out.append(
            LanguageRouted(
                "filter:gopher_quality",
                gopher(cfg.min_doc_words, cfg.min_stop_words, cfg.min_avg_word_length),
                "en",
                writer_for("gopher_quality"),
                short_domains=short,
                short_inner=gopher(
                    cfg.min_doc_words_short, cfg.min_stop_words_short, cfg.min_avg_word_length_short
                ),
            )
        )
    if cfg.fineweb:

        def fineweb(line_rules: bool, char_duplicates_ratio: float) -> BaseFilter:
            return FineWebQualityFilter(
                line_punct_thr=cfg.line_punct_thr if line_rules else -1.0,
                short_line_thr=cfg.short_line_thr if line_rules else math.inf,
                char_duplicates_ratio=char_duplicates_ratio,
                new_line_ratio=cfg.new_line_ratio if line_rules else math.inf,
                language=words,
            )

        out.append(
            LanguageRouted(
                "filter:fineweb",
                fineweb(True, cfg.char_duplicates_ratio),
                "en",
                writer_for("fineweb"),
                short_inner=fineweb(False, cfg.char_duplicates_ratio_short),
                short_domains=short,
            )
        )
    if cfg.c4:
        inner = C4QualityFilter(language=words)
        out.append(LanguageRouted("filter:c4", inner, "en", writer_for("c4")))
    return out


class CharNgrams:
    """Character n-gram statistics of one text, computed on demand.

    N-grams are rolling 64-bit polynomial hashes of the code points, built up one character at a time
    ((n-1)-gram × R + next character) and counted with one numpy sort per n, instead of a Python dict of
    substrings. `top_share` and `dup_share` are the two statistics of the Chinese n-gram rules.
    """

    def __init__(self, chars: str) -> None:
        self.size = len(chars)
        self.codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(
            np.uint64
        )
        self.n, self.hashes = 1, self.codes
        self._counted: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _count(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(per n-gram position: how often its n-gram occurs, per distinct n-gram: count)."""
        if n not in self._counted:
            if n < self.n:
                self.n, self.hashes = 1, self.codes
            while self.n < n:
                self.hashes = self.hashes[:-1] * _ROLL + self.codes[self.n :]
                self.n += 1
            _, inverse, counts = np.unique(self.hashes, return_inverse=True, return_counts=True)
            self._counted[n] = (counts[inverse], counts)
        return self._counted[n]

    def top_count(self, n: int) -> int:
        return int(self._count(n)[1].max()) if 0 < n < self.size else 0

    def top_share(self, n: int) -> float:
        """Share of characters in the occurrences of the most frequent n-gram, if it occurs more than once."""
        top = self.top_count(n)
        return min(top * n / self.size, 1.0) if top > 1 else 0.0

    def dup_share(self, n: int) -> float:
        """Share of characters covered by n-grams that occur more than once."""
        if not 0 < n < self.size:
            return 0.0
        starts = np.flatnonzero(self._count(n)[0] > 1)
        edges = np.zeros(self.size + 1, dtype=np.int32)
        edges[starts] += 1
        edges[starts + n] -= 1
        return int(np.count_nonzero(np.cumsum(edges[: self.size]))) / self.size


def ngram_verdict(chars: str, top_ngrams: list[list[float]], dup_ngrams: list[list[float]]) -> str | None:
    """The first n-gram rule `chars` breaks (`zh_top_<n>gram`, `zh_dup_<n>gram`), or None.

    Clean text is far from the limits, so most statistics need not be computed: an n-gram occurs at most as
    often as any shorter one inside it (top count for n ≤ top count for any m < n), and characters covered by
    repeated n-grams are covered by repeated m-grams (dup share for n ≤ dup share for m < n). A rule whose
    bound from a shorter n is already within its limit is passed without counting.
    """
    grams = CharNgrams(chars)
    tops: dict[int, int] = {}
    for n, limit in ((int(n), lim) for n, lim in top_ngrams):
        known = [c for m, c in tops.items() if m < n]
        if known and (min(known) <= 1 or min(known) * n / grams.size <= limit):
            continue
        tops[n] = grams.top_count(n)
        if grams.top_share(n) > limit:
            return f"zh_top_{n}gram"
    dups: dict[int, float] = {}
    for n, limit in ((int(n), lim) for n, lim in dup_ngrams):
        known = [d for m, d in dups.items() if m < n]
        if known and min(known) <= limit:
            continue
        dups[n] = grams.dup_share(n)
        if dups[n] > limit:
            return f"zh_dup_{n}gram"
    return None


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
        classical = doc.metadata.get("domain") in c.classical_domains
        verse = classical or sum(ln.endswith(_VERSE_END) for ln in lines) >= c.verse_line_share * len(lines)
        classical = classical or (
            verse and len(lines) >= 2
        )  # poems use no function words: the stop-word rule is off
        if not verse and sum(map(len, lines)) / len(lines) < c.min_avg_line_chars:
            return False, "zh_short_lines"
        if len(lines) > 2:
            seen: dict[str, int] = {}
            for ln in lines:
                seen[ln] = seen.get(ln, 0) + 1
            # as Gopher counts them: the copies after a line's first occurrence
            dup_lines = sum(v - 1 for v in seen.values())
            dup_chars = sum(len(k) * (v - 1) for k, v in seen.items())
            if dup_lines / len(lines) > c.max_dup_line_frac:
                return False, "zh_dup_lines"
            if dup_chars / max(1, sum(map(len, lines))) > c.max_dup_line_char_frac:
                return False, "zh_dup_line_chars"
        chars = _NON_CONTENT.sub("", text)
        short = bool(doc.metadata.get("messages"))  # a dialog: one stop word is enough, as for a short text
        if len(chars) < c.ngram_min_chars:
            return self._words_rules(text, len(chars), classical, short)
        broken = ngram_verdict(chars, c.top_ngrams, c.dup_ngrams)
        return (False, broken) if broken else self._words_rules(text, len(chars), classical, short)

    def _words_rules(
        self, text: str, n_chars: int, classical: bool = False, short: bool = False
    ) -> bool | tuple[bool, str]:
        c = self.cfg
        need = 1 if short or n_chars < c.stop_words_short_chars else c.min_stop_words
        if c.min_stop_words and not classical:
            found = sum(text.count(w) for w in ZH_STOP_WORDS)
            if found < min(need, c.min_stop_words):
                found += sum(text.count(w) for w in c.classical_stop_words)  # 文言: 之乎者也
                if found < min(need, c.min_stop_words):
                    return False, "zh_few_stop_words"
        if c.spam_words and sum(text.count(w) for w in c.spam_words) > c.max_spam_hits:
            return False, "zh_spam_words"
        return True
