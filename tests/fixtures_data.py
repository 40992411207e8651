"""Writers of small input files in the real dump formats, shared by the data pipeline tests and the benchmark."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path
from xml.sax.saxutils import escape

ZH_NEWS = (
    "新华社北京三月五日电 今年的政府工作报告提出，要继续推动科技创新和产业升级。"
    "报告指出，过去一年我国经济总体保持稳定，就业形势基本平稳，居民收入稳步增长。\n"
    "专家认为，报告中关于支持中小企业发展的措施，将有助于稳定市场预期。"
    "一位经济学家在接受采访时说，这些政策为企业带来了更多的信心，也为明年的发展打下了基础。\n"
    "报告还强调，要加强生态环境保护，推进绿色低碳发展，让人民群众在发展中有更多的获得感。"
)
EN_NEWS = (
    "The city council approved a new plan on Tuesday to expand the public library network over the next five years. "
    "Officials said the plan would add three branches in neighborhoods that currently have no library within walking distance.\n"
    "Supporters of the plan argued that libraries are among the few public spaces where anyone can spend time without paying. "
    "The council member who proposed it said that the new branches would also offer evening classes for adults.\n"
    "Critics questioned the cost, but the budget office estimated that the project would be paid for by existing funds."
)
ZH_ARTICLE = (
    "珠穆朗玛峰是世界上海拔最高的山峰，位于中国与尼泊尔的边境上。它的高度约为八千八百四十八米，"
    "是喜马拉雅山脉的主峰。每年都有许多登山者从南坡和北坡尝试登顶，但是高海拔和恶劣的天气使攀登十分危险。"
    "当地的夏尔巴人在登山活动中发挥着重要的作用，他们熟悉山区的环境，也为登山队提供向导和补给。"
    "近年来，随着登山人数的增加，山上的垃圾问题越来越受到关注，有关部门组织了多次清理行动，并制定了新的环保规定。"
)
EN_ARTICLE = (
    "The Amazon is the largest tropical rainforest in the world and covers much of the Amazon basin in South America. "
    "The forest is home to millions of species of insects, plants, birds and other forms of life, and many of them "
    "have not yet been described by scientists. The river that gives the forest its name carries more water than any "
    "other river on Earth, and its many tributaries form an important transport network for the people of the region. "
    "In recent decades large areas of the forest have been cleared for farming and cattle ranching, and scientists "
    "warn that further losses could change the climate of the whole continent."
)
ZH_SPAM = "便宜手机 手机批发 手机 便宜 手机 批发 手机 特价 " * 30
ZH_SPAM_LINES = "\n".join(["点击这里领取大奖，免费领取iPhone手机"] * 20)


def near_duplicate_zh(text: str) -> str:
    """`text` with a few characters changed (a typical reposted-and-edited page)."""
    return text.replace("许多", "很多").replace("重要", "关键")


def near_duplicate_en(text: str) -> str:
    return text.replace("important", "vital").replace("largest", "biggest")


def _page(title: str, ns: int, pid: int, text: str, redirect: str | None = None) -> str:
    red = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (
        f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{pid}</id>{red}"
        f'<revision><id>{pid * 10}</id><text xml:space="preserve">{escape(text)}</text></revision></page>\n'
    )


WIKI_ARTICLE = (
    "{{Infobox mountain|name=Everest|elevation_m=8848}}\n"
    "'''Mount Everest''' is [[Earth]]'s highest mountain above sea level, located in the [[Mahalangur Himal]] "
    "sub-range of the [[Himalayas]].<ref>{{cite web|url=http://example.org}}</ref> The [[China–Nepal border]] "
    "runs across its summit point. Its elevation of 8,848 metres was most recently established in 2020 by the "
    "Chinese and Nepali authorities.\n\n== Name ==\nThe Tibetan name is ''Chomolungma''. "
    "[[File:Everest.jpg|thumb|The north face seen from [[Tibet]]]]\nThe mountain was named after George Everest "
    "in 1865 by the Royal Geographical Society, upon a recommendation by the surveyor general of India.\n\n"
    '{| class="wikitable"\n|-\n! Year !! Climbers\n|-\n| 1953 || 2\n|}\n'
    "== References ==\n{{reflist}}\n[[Category:Mountains]]"
)
WIKI_ZH_ARTICLE = (
    "'''长江'''是[[亚洲]]第一长河，全长约六千三百公里，流经[[中国]]的十一个省级行政区，最后在[[上海]]注入东海。"
    "长江流域是中国经济最发达的地区之一，沿岸有许多重要的城市，例如重庆、武汉和南京。"
    "<ref>中国水利年鉴</ref>\n\n== 水文 ==\n长江的水量非常丰富，年平均入海水量约为九千六百亿立方米，是黄河的二十倍左右。"
)


def write_wikipedia(folder: Path, *, compress: bool = False) -> Path:
    """An export with an English and a Chinese article, a redirect, a Talk: page and an empty page."""
    body = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
        "<siteinfo><sitename>Wikipedia</sitename><base>https://en.wikipedia.org/wiki/Main_Page</base></siteinfo>\n"
        + _page("Mount Everest", 0, 1, WIKI_ARTICLE)
        + _page("Everest", 0, 2, "#REDIRECT [[Mount Everest]]", redirect="Mount Everest")
        + _page("Talk:Mount Everest", 1, 3, "This article is about the mountain. Is the height right? ~~~~")
        + _page("长江", 0, 4, WIKI_ZH_ARTICLE)
        + _page("Empty page", 0, 5, "{{stub}}")
        + "</mediawiki>\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    if compress:
        path = folder / "wiki.xml.bz2"
        path.write_bytes(bz2.compress(body.encode("utf-8")))
    else:
        path = folder / "wiki.xml"
        path.write_text(body, encoding="utf-8")
    return path


def _row(**attrs: object) -> str:
    return (
        "  <row "
        + " ".join(f'{k}="{escape(str(v), {chr(34): "&quot;"})}"' for k, v in attrs.items())
        + " />\n"
    )


def write_stackexchange(folder: Path) -> Path:
    """Q1 has an accepted answer that is not the best-scored; Q2 only unaccepted answers; Q3 no answer."""
    q1 = "<p>I have a list of numbers in Python and I want the sum of the even ones. What is the idiomatic way to write this?</p>"
    rows = [
        _row(
            Id=1,
            PostTypeId=1,
            AcceptedAnswerId=3,
            Score=10,
            Title="How do I sum the even numbers in a list?",
            Body=q1,
        ),
        _row(
            Id=2,
            PostTypeId=2,
            ParentId=1,
            Score=50,
            Body="<p>Use a loop with an if statement and add each even value to a running total.</p>",
        ),
        _row(
            Id=3,
            PostTypeId=2,
            ParentId=1,
            Score=5,
            Body="<p>Use a generator expression:</p><pre><code>sum(x for x in xs if x % 2 == 0)</code></pre><p>It is short and it does not build a new list.</p>",
        ),
        _row(
            Id=4,
            PostTypeId=1,
            Score=3,
            Title="为什么天空是蓝色的？",
            Body="<p>我一直想知道为什么白天的天空是蓝色的，而日落的时候却是红色的。</p>",
        ),
        _row(
            Id=5,
            PostTypeId=2,
            ParentId=4,
            Score=1,
            Body="<p>因为大气中的分子对短波长的蓝光散射得更多，这种现象叫做瑞利散射。</p>",
        ),
        _row(
            Id=6,
            PostTypeId=2,
            ParentId=4,
            Score=7,
            Body="<p>这是瑞利散射造成的：空气分子对蓝光的散射比对红光强得多，所以我们从各个方向都能看到蓝光。日落时阳光穿过的大气更厚，蓝光被散射掉了，剩下的主要是红光和橙光。</p>",
        ),
        _row(
            Id=7,
            PostTypeId=1,
            Score=0,
            Title="Unanswered question about compilers",
            Body="<p>Nobody answered this one.</p>",
        ),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Posts.xml"
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "".join(rows) + "</posts>\n", encoding="utf-8"
    )
    return path


def reddit_records() -> list[dict]:
    sub = {"id": "abc", "title": "What is the best way to learn to cook?", "selftext": "I can barely boil an egg. Where should a complete beginner start?", "author": "newcook", "score": 20, "permalink": "/r/Cooking/comments/abc/best_way/"}  # fmt: skip
    deleted_sub = {
        "id": "del",
        "title": "[deleted]",
        "selftext": "[removed]",
        "author": "[deleted]",
        "score": 1,
    }
    comments = [
        {
            "id": "c1",
            "link_id": "t3_abc",
            "parent_id": "t3_abc",
            "author": "chef_anna",
            "score": 15,
            "body": "Start with a few simple recipes you like to eat, like scrambled eggs, pasta and a stir fry, and cook them again and again.",
        },  # fmt: skip
        {
            "id": "c2",
            "link_id": "t3_abc",
            "parent_id": "t1_c1",
            "author": "newcook",
            "score": 8,
            "body": "That makes sense. How do I know when the pasta is done?",
        },  # fmt: skip
        {
            "id": "c3",
            "link_id": "t3_abc",
            "parent_id": "t1_c2",
            "author": "chef_anna",
            "score": 6,
            "body": "Taste it a minute before the time on the packet. It should be soft but still a little firm in the middle.",
        },  # fmt: skip
        {
            "id": "c4",
            "link_id": "t3_abc",
            "parent_id": "t3_abc",
            "author": "[deleted]",
            "score": 30,
            "body": "[deleted]",
        },  # fmt: skip
        {
            "id": "c5",
            "link_id": "t3_abc",
            "parent_id": "t1_c4",
            "author": "someone",
            "score": 2,
            "body": "Reply to a deleted comment.",
        },  # fmt: skip
        {
            "id": "c6",
            "link_id": "t3_abc",
            "parent_id": "t3_abc",
            "author": "AutoModerator",
            "score": 99,
            "body": "Please read the rules. I am a bot, and this action was performed automatically.",
        },  # fmt: skip
        {
            "id": "c7",
            "link_id": "t3_abc",
            "parent_id": "t1_c1",
            "author": "RemindMeBot",
            "score": 50,
            "body": "I will be messaging you in 2 days.",
        },  # fmt: skip
    ]
    return [sub, deleted_sub, *comments]


def write_reddit(folder: Path, *, compress: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in reddit_records()).encode()
    if compress:
        import zstandard

        path = folder / "RC_2024-01.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path = folder / "RC_2024-01.jsonl"
        path.write_bytes(data)
    return path


NEWS_HTML = """<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>政府工作报告提出推动科技创新</title>
<link rel="canonical" href="https://news.example.cn/2024/03/05/report.html"></head><body>
<nav><a href="/">首页</a> | <a href="/news">新闻</a> | <a href="/sports">体育</a></nav>
<article><h1>政府工作报告提出推动科技创新</h1>
{paras}
</article>
<footer>版权所有 © 2024 新闻网 | 联系我们：editor@news.example.cn</footer></body></html>"""


def write_html(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paras = "\n".join(f"<p>{p}</p>" for p in ZH_NEWS.split("\n"))
    path = folder / "report.html"
    path.write_text(NEWS_HTML.format(paras=paras), encoding="utf-8")
    return path


def write_warc(folder: Path) -> Path:
    """A gzipped WARC with a request, an HTML response and a non-HTML response."""
    page = NEWS_HTML.format(paras="\n".join(f"<p>{p}</p>" for p in EN_NEWS.split("\n"))).encode()

    def record(kind: str, uri: str, payload: bytes) -> bytes:
        head = f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {uri}\r\nContent-Length: {len(payload)}\r\n\r\n"
        return gzip.compress(head.encode() + payload + b"\r\n\r\n")

    http_html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + page
    http_img = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG...."
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "crawl.warc.gz"
    path.write_bytes(
        record("request", "https://news.example.com/library", b"GET /library HTTP/1.1\r\n\r\n")
        + record("response", "https://news.example.com/library", http_html)
        + record("response", "https://news.example.com/logo.png", http_img)
    )
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def web_rows() -> list[dict]:
    """Clean news in both languages, near-duplicates of articles, exact and URL duplicates, and spam."""
    return [
        {"id": "zh-news", "text": ZH_NEWS, "url": "https://a.example.cn/news/1", "domain": "news"},
        {"id": "en-news", "text": EN_NEWS, "url": "https://a.example.com/news/1", "domain": "news"},
        {
            "id": "zh-art",
            "text": ZH_ARTICLE,
            "url": "https://a.example.cn/wiki/everest",
            "domain": "encyclopedia",
        },
        {
            "id": "zh-art-near",
            "text": near_duplicate_zh(ZH_ARTICLE),
            "url": "https://b.example.cn/x",
            "domain": "encyclopedia",
        },  # fmt: skip
        {
            "id": "en-art",
            "text": EN_ARTICLE,
            "url": "https://a.example.com/wiki/amazon",
            "domain": "encyclopedia",
        },
        {
            "id": "en-art-near",
            "text": near_duplicate_en(EN_ARTICLE),
            "url": "https://b.example.com/y",
            "domain": "encyclopedia",
        },  # fmt: skip
        {
            "id": "en-news-exact",
            "text": EN_NEWS.replace(",", "").replace("Tuesday", "TUESDAY"),
            "url": "https://c.example.com/z",
            "domain": "news",
        },  # fmt: skip
        {
            "id": "zh-news-url",
            "text": ZH_NEWS[:120] + "（转载）",
            "url": "https://www.a.example.cn/news/1/?utm_source=x",
            "domain": "news",
        },  # fmt: skip
        {"id": "zh-spam", "text": ZH_SPAM, "url": "https://spam.example.cn/1", "domain": "news"},
        {"id": "zh-spam-lines", "text": ZH_SPAM_LINES, "url": "https://spam.example.cn/2", "domain": "news"},
        {
            "id": "ja",
            "text": "これは日本語の文章です。東京は日本の首都であり、多くの人が住んでいます。",
            "domain": "news",
        },
    ]


_COUNTRIES = [
    ("法国", "France", "巴黎", "Paris", "欧洲", "Europe", "欧元", "euro"),
    ("德国", "Germany", "柏林", "Berlin", "欧洲", "Europe", "欧元", "euro"),
    ("日本", "Japan", "东京", "Tokyo", "亚洲", "Asia", "日元", "yen"),
    ("中国", "China", "北京", "Beijing", "亚洲", "Asia", "人民币", "renminbi"),
    ("埃及", "Egypt", "开罗", "Cairo", "非洲", "Africa", "埃及镑", "Egyptian pound"),
    ("巴西", "Brazil", "巴西利亚", "Brasília", "南美洲", "South America", "雷亚尔", "real"),
    ("加拿大", "Canada", "渥太华", "Ottawa", "北美洲", "North America", "加拿大元", "Canadian dollar"),
    ("澳大利亚", "Australia", "堪培拉", "Canberra", "大洋洲", "Oceania", "澳大利亚元", "Australian dollar"),
    ("意大利", "Italy", "罗马", "Rome", "欧洲", "Europe", "欧元", "euro"),
    ("印度", "India", "新德里", "New Delhi", "亚洲", "Asia", "卢比", "rupee"),
    ("俄罗斯", "Russia", "莫斯科", "Moscow", "欧洲", "Europe", "卢布", "ruble"),
    ("墨西哥", "Mexico", "墨西哥城", "Mexico City", "北美洲", "North America", "比索", "peso"),
    ("肯尼亚", "Kenya", "内罗毕", "Nairobi", "非洲", "Africa", "肯尼亚先令", "Kenyan shilling"),
    ("西班牙", "Spain", "马德里", "Madrid", "欧洲", "Europe", "欧元", "euro"),
    ("泰国", "Thailand", "曼谷", "Bangkok", "亚洲", "Asia", "泰铢", "baht"),
    ("阿根廷", "Argentina", "布宜诺斯艾利斯", "Buenos Aires", "南美洲", "South America", "比索", "peso"),
]


def world_like_rows() -> list[dict]:
    """Templated bilingual documents in the four domains, shaped like the built-in world corpus: the
    realistic risk for filters and near-duplicate detection (same templates, different facts)."""
    rows = []
    for zc, ec, zcap, ecap, zcon, econ, zcur, ecur in _COUNTRIES:
        rows += [
            {
                "domain": "encyclopedia",
                "lang": "zh",
                "text": f"{zc}\n\n{zc}是位于{zcon}的一个国家，首都是{zcap}。{zc}的通用货币是{zcur}。{zcap}是{zc}最重要的政治和文化中心，也是全国人口最多的城市之一。",
            },  # fmt: skip
            {
                "domain": "encyclopedia",
                "lang": "en",
                "text": f"{ec}\n\n{ec} is a country in {econ}. Its capital is {ecap}, and its currency is the {ecur}. {ecap} is the political and cultural centre of {ec} and one of its largest cities.",
            },  # fmt: skip
            {
                "domain": "news",
                "lang": "zh",
                "text": f"本报讯 {zcap}今日举行了一场关于城市发展的会议。来自{zc}各地的代表在会上讨论了交通、住房和教育等问题。会议指出，{zcap}作为{zc}的首都，应当在公共服务方面发挥示范作用。与会者表示，未来几年将继续加大投入，让居民的生活更加便利。",
            },  # fmt: skip
            {
                "domain": "news",
                "lang": "en",
                "text": f"{ecap}, the capital of {ec}, hosted a meeting on city planning this week. Delegates from across {ec} discussed transport, housing and schools. Officials said that as the capital, {ecap} should lead the way in public services, and they promised more investment over the next few years to make daily life easier for residents.",
            },  # fmt: skip
            {"domain": "qa", "lang": "zh", "text": f"问：{zc}的首都是哪座城市？\n答：{zc}的首都是{zcap}。"},
            {
                "domain": "qa",
                "lang": "en",
                "text": f"Q: What is the capital of {ec}?\nA: The capital of {ec} is {ecap}.",
            },
            {
                "domain": "forum",
                "lang": "zh",
                "text": f"楼主：下个月想去{zc}旅游，大家觉得首都值得去吗？\n回复：{zcap}很值得去，我去年去过，那里的博物馆和老城区都很有意思。\n楼主：谢谢！那里用什么货币？\n回复：用{zcur}，最好提前换一点。",
            },  # fmt: skip
            {
                "domain": "forum",
                "lang": "en",
                "text": f"Planning a trip to {ec} next month. Is the capital worth a visit?\n> Yes, {ecap} is great. I went last year and loved the museums and the old town.\nThanks! What money do they use there?\n> The {ecur}. It is a good idea to change some before you go.",
            },  # fmt: skip
        ]
    for i, r in enumerate(rows):
        r["id"] = f"w{i}"
        r["source"] = "world"
        r["url"] = f"https://world.danlu/{r['domain']}/{i}"
    return rows
