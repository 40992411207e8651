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
    assert text.startswith("中国的首都是北京。 联系 [EMAIL] 或 [PHONE]，身份证 [ID]。&")
    assert "Hello，世界！ 多余 空格" in text  # full-width Latin → ASCII, Chinese punctuation kept
    assert "版权所有" not in text and "\n\n\n" not in text and "\u200b" not in text and "<p>" not in text
    assert "Call [PHONE]." in text and "8848 m" in text and "1411778724" in text  # plain numbers are not PII
    assert counts == {"masked_email": 1, "masked_id": 1, "masked_phone": 2, "boilerplate_lines": 1}


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
