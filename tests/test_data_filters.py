"""Cleaning, language identification and the language-routed quality filters."""

from __future__ import annotations

from datatrove.data import Document
from fixtures_data import EN_ARTICLE, EN_NEWS, ZH_ARTICLE, ZH_NEWS, ZH_SPAM, ZH_SPAM_LINES

from danlu.data.clean import CleanConfig, TextCleaner
from danlu.data.filters import ChineseConfig, ChineseQualityFilter, EnglishConfig, english_filters
from danlu.data.langid import MixedWordTokenizer, detect_language, estimate_tokens


def test_clean_normalizes_masks_and_drops_boilerplate():
    raw = (
        "<p>中國的首都是北京。</p>\u200b 聯繫 me@example.com 或 138-1234-5678，身份证 110101199003071234。&amp;\r\n"
        "Ｈｅｌｌｏ，世界！   多余   空格\n\n\n\n版权所有 © 2024 新华网\nCall (555) 123-4567. Everest is 8848 m; population 1411778724."
    )
    text, counts = TextCleaner(CleanConfig(traditional_to_simplified=True)).clean(raw, "zh")
    assert text.startswith("中国的首都是北京。\n联系 [EMAIL] 或 [PHONE]，身份证 [ID]。&")  # </p> ends a line
    assert "Hello，世界！ 多余 空格" in text  # full-width Latin → ASCII, Chinese punctuation kept
    assert "版权所有" not in text and "\n\n\n" not in text and "\u200b" not in text and "<p>" not in text
    assert "Call [PHONE]." in text and "8848 m" in text and "1411778724" in text  # plain numbers are not PII
    masks = ("masked_email", "masked_id", "masked_phone", "boilerplate_lines")
    assert {k: counts[k] for k in masks} == {
        "masked_email": 1,
        "masked_id": 1,
        "masked_phone": 2,
        "boilerplate_lines": 1,
    }
    assert counts["edit_unicode"] == counts["edit_markup"] == counts["edit_traditional_to_simplified"] == 1


def test_clean_can_be_switched_off():
    cfg = CleanConfig(mask_emails=False, remove_boilerplate=False, traditional_to_simplified=False)
    text, _ = TextCleaner(cfg).clean("中國 a@b.com\n版权所有 2024", "zh")
    assert text == "中國 a@b.com\n版权所有 2024"


def test_language_identification_offline():
    assert detect_language(ZH_NEWS)[0] == "zh" and detect_language(EN_NEWS)[0] == "en"
    assert detect_language("これは日本語の文章です。東京は首都です。")[0] == "ja"
    assert detect_language("Привет, как дела? Это русский текст.")[0] == "other"
    assert detect_language("12345 !!!") == ("unknown", 0.0)
    lang, conf = detect_language("Python 是一种编程语言，它简单易学。")
    assert lang == "zh" and 0.5 < conf < 1.0
    assert 0 < estimate_tokens("中国最高的山") < estimate_tokens("中国最高的山是珠穆朗玛峰 Mount Everest")


def test_chinese_words_are_characters():
    assert MixedWordTokenizer().word_tokenize("长江很长, it is long.") == [
        "长",
        "江",
        "很",
        "长",
        "it",
        "is",
        "long",
    ]


def doc(text: str, lang: str, domain: str = "news") -> Document:
    return Document(text=text, id="x", metadata={"lang": lang, "domain": domain})


def zh_filter() -> ChineseQualityFilter:
    return ChineseQualityFilter(ChineseConfig())


def test_clean_chinese_news_passes_spam_fails_with_reason():
    f = zh_filter()
    assert f.filter(doc(ZH_NEWS, "zh")) is True
    assert f.filter(doc(ZH_ARTICLE, "zh")) is True
    assert f.filter(doc(ZH_SPAM, "zh")) == (False, "zh_top_2gram")  # keyword stuffing
    assert f.filter(doc(ZH_SPAM_LINES, "zh")) == (False, "zh_dup_lines")
    assert f.filter(doc("代开发票，博彩，六合彩，赌场，办证，都在这里，的确是的。", "zh")) == (
        False,
        "zh_spam_words",
    )
    assert f.filter(doc("北京 上海 广州 深圳 天津 重庆 成都 武汉 南京 杭州 西安", "zh")) == (
        False,
        "zh_few_stop_words",
    )
    assert f.filter(doc("This is mostly English with 一点中文 mixed in.", "zh")) == (
        False,
        "zh_low_han_ratio",
    )


def run_filters(filters, docs):
    out = docs
    for f in filters:
        out = list(f(out, 0, 1))
    return out


def test_english_rules_never_run_on_chinese():
    filters = english_filters(EnglishConfig(), lambda name: None)
    assert [f.name for f in filters] == [
        "filter:gopher_repetition",
        "filter:gopher_quality",
        "filter:fineweb",
    ]
    zh = [doc(ZH_NEWS, "zh"), doc(ZH_ARTICLE, "zh"), doc(ZH_SPAM, "zh")]
    assert len(run_filters(filters, zh)) == 3  # Chinese goes untouched (whitespace word counts would drop it)
    en = [doc(EN_NEWS, "en"), doc(EN_ARTICLE, "en"), doc("Buy now! " * 100, "en"), doc("Too short.", "en")]
    kept = run_filters(filters, en)
    assert [d.text for d in kept] == [EN_NEWS, EN_ARTICLE]
    assert filters[0].stats["removed:dup_line_frac"].total + filters[0].stats["removed:top_2_gram"].total >= 0
    removed = {k for f in filters for k in f.stats.stats if k.startswith("removed:")}
    assert "removed:gopher_short_doc" in removed


def test_short_domains_keep_short_answers():
    filters = english_filters(EnglishConfig(), lambda name: None)
    qa = doc("Q: What is the capital of France?\nA: The capital of France is Paris.", "en", "qa")
    news = doc("Q: What is the capital of France?\nA: The capital of France is Paris.", "en", "news")
    assert len(run_filters(filters, [qa])) == 1
    assert run_filters(filters, [news]) == []  # the same text as a web page is too short


def en_kept(text: str, domain: str) -> tuple[bool, str]:
    """(kept, reason) after the default English rules."""
    filters = english_filters(EnglishConfig(), lambda name: None)
    kept = run_filters(filters, [doc(text, "en", domain)])
    removed = [k.split(":", 1)[1] for f in filters for k in f.stats.stats if k.startswith("removed:")]
    return bool(kept), ",".join(removed)


HEADLINE_ECHO = (
    "Open chemistry lesson on calcium\n\nOn 28 November 2015, a secondary school in Tokyo held an open chemistry "
    "lesson on calcium, attended by about 20 students.\n\nThe chemical symbol of calcium is Ca. In the periodic "
    "table, calcium has the atomic number 20.\n\nThe teacher said: “This is my first time at an event like this.”"
)
STUFFED = (
    "Looking for the best pizza in New York? The best pizza in New York is at Tony's. Our best pizza in New York "
    "is made fresh. Order the best pizza in New York today and taste the best pizza in New York. Best pizza in "
    "New York, best pizza delivery in New York, cheap pizza in New York."
)
KEYWORDS = (
    "Buy cheap watches online. Cheap watches, luxury watches, replica watches, watches sale, discount watches "
    "for men, gold watches, sport watches, diving watches, pocket watches, smart watches, best watch deals now."
)
ARITHMETIC_QA = "Q: 2 × 7 = ?\nA: 2 × 7 = 14.\n\nQ: What is 0 divided by 11?\nA: It is 0.\n\nQ: How much is 9 × 12?\nA: It is 108."  # fmt: skip
STUB = "Yard\n\nThe yard is a unit of measurement. One yard is 3 feet.\n\nKey facts\n\n| Field | Value |\n| Conversion | 1 yard = 3 feet |"  # fmt: skip


def test_short_templated_text_is_kept_and_short_spam_is_not():
    assert en_kept(HEADLINE_ECHO, "news") == (True, "")  # a headline said again in the lead is not repetition
    assert en_kept(STUFFED, "news") == (False, "top_3_gram")
    assert en_kept(STUFFED, "forum") == (False, "top_3_gram")  # short domains still catch stuffing
    assert en_kept(KEYWORDS, "news") == (False, "gopher_enough_stop_words")
    # numbers are words; "Q", "A" and "is" are short words by nature in a Q&A
    assert en_kept(ARITHMETIC_QA, "qa") == (True, "")
    # "The" is the stop word "the"; an infobox is made of short lines
    assert en_kept(STUB, "encyclopedia") == (True, "")
    assert en_kept(STUB, "news")[0] is False  # the same text as a web page is too short


def test_repetition_rules_match_datatrove():
    """Vectorized n-gram rules: datatrove's verdicts (echoes off), on clean text, stuffing and repeated lines."""
    from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

    from danlu.data.filters import RepetitionFilter

    words = MixedWordTokenizer()
    texts = [EN_NEWS, EN_ARTICLE, STUFFED, "Buy now! " * 100, "a b c a b c a b c d e f", "x",
             HEADLINE_ECHO * 3, "Call now to book.\n" * 5 + EN_NEWS, " ".join(EN_ARTICLE.split()[:40]) * 2]  # fmt: skip
    ours, theirs = RepetitionFilter(language=words), GopherRepetitionFilter(language=words)
    verdicts = [ours.filter(doc(t, "en")) for t in texts]
    assert verdicts == [theirs.filter(doc(t, "en")) for t in texts]
    assert verdicts[:2] == [True, True] and len({str(v) for v in verdicts}) >= 4


def test_chinese_ngram_statistics_and_short_text():
    from danlu.data.filters import CharNgrams, ngram_verdict

    def reference(chars: str, n: int) -> tuple[float, float]:
        grams = [chars[i : i + n] for i in range(len(chars) - n + 1)]
        counts = {g: grams.count(g) for g in set(grams)}
        top = max(counts.values())
        covered = {i + k for i, g in enumerate(grams) if counts[g] > 1 for k in range(n)}
        return (min(top * n / len(chars), 1.0) if top > 1 else 0.0), len(covered) / len(chars)

    for text in (ZH_NEWS, ZH_SPAM.replace(" ", ""), "春眠不觉晓处处闻啼鸟" * 3 + ZH_ARTICLE):
        grams = CharNgrams(text)
        for n in (2, 3, 4, 10, 15, 20):
            assert (grams.top_share(n), grams.dup_share(n)) == reference(text, n)
    cfg = ChineseConfig()
    assert ngram_verdict(ZH_NEWS, cfg.top_ngrams, cfg.dup_ngrams) is None
    assert ngram_verdict(ZH_SPAM.replace(" ", ""), cfg.top_ngrams, cfg.dup_ngrams) == "zh_top_2gram"
    f = zh_filter()
    short_qa = "问：23减3是多少？\n答：23 - 3 = 20。"
    assert f.filter(doc(short_qa, "zh", "qa")) is True  # one stop word is enough in a short text
    sheet = "口算练习（第29套）答案\n\n1. 85-78=7\n2. 6 × 5 = 30\n3. 十二加九十五等于一百零七\n4. 四十四加五等于四十九的和"
    assert f.filter(doc(sheet, "zh", "qa")) is True  # digits and symbols belong to no language: still Chinese


def test_minhash_words_and_signatures_match_datatrove(tmp_path):
    """The fast normalization gives datatrove's words, and the in-place signature datatrove's numbers."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.text import simplify_text

    from danlu.data.dedup import (
        MinhashSettings,
        datatrove_minhash_config,
        minhash_signature_step,
        simplify_for_words,
        text_hash,
    )

    cfg = datatrove_minhash_config(MinhashSettings())
    words = MixedWordTokenizer()
    for text in (ZH_NEWS, EN_NEWS, "Café naïve foo_bar １２ Ω\u2126 한국 e\u0301 ≠ — ﬁ", "__ _ 3,5"):
        want = words.word_tokenize(simplify_text(text, cfg.norm_config))
        assert words.word_tokenize(simplify_for_words(text, cfg.norm_config)) == want
    ours = minhash_signature_step(str(tmp_path / "a"), cfg)
    stock = MinhashDedupSignature(str(tmp_path / "b"), config=cfg, language=words)
    shingles = ours.get_shingles(ZH_ARTICLE + EN_ARTICLE)
    assert len(shingles) > 100 and ours.get_signature(shingles) == stock.get_signature(shingles)
    assert text_hash(EN_NEWS) == text_hash(EN_NEWS.upper().replace(",", " ,")) != text_hash(EN_ARTICLE)
