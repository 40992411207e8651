"""Everything around the facts: people, user names, events, quotes, dates — fictional and claim-free.

A real crawl wraps facts in news events, forum chatter and page furniture. The filler here gives the same shape
while asserting nothing that could be false: events are made up and dated, quotes are generic, names are random.
"""

from __future__ import annotations

import datetime as dt
import random

SURNAMES_ZH = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
)
GIVEN_ZH = [
    "伟",
    "芳",
    "娜",
    "敏",
    "静",
    "丽",
    "强",
    "磊",
    "军",
    "洋",
    "勇",
    "艳",
    "杰",
    "娟",
    "涛",
    "明",
    "超",
    "秀英",
    "华",
    "平",
    "刚",
    "桂英",
    "晨",
    "宇",
    "欣",
    "婷",
    "浩",
    "佳",
    "然",
    "琳",
    "子涵",
    "一鸣",
    "雨桐",
    "思远",
    "海燕",
    "建国",
    "志强",
    "文博",
    "嘉怡",
    "浩然",
]
FIRST_EN = [
    "James",
    "Mary",
    "John",
    "Emma",
    "Liam",
    "Olivia",
    "Noah",
    "Ava",
    "Lucas",
    "Mia",
    "Ethan",
    "Sophia",
    "Daniel",
    "Grace",
    "Samuel",
    "Chloe",
    "Henry",
    "Alice",
    "Oliver",
    "Ruby",
    "Jack",
    "Isla",
    "Leo",
    "Hannah",
    "Adam",
    "Nora",
    "David",
    "Laura",
    "Peter",
    "Anna",
]
LAST_EN = [
    "Smith",
    "Brown",
    "Wilson",
    "Taylor",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Green",
    "Baker",
    "Carter",
    "Turner",
    "Hill",
    "Moore",
    "Wood",
    "Evans",
    "Cooper",
    "Reed",
    "Ward",
    "Price",
    "Bennett",
    "Gray",
    "Hughes",
    "Foster",
    "Ellis",
    "Shaw",
]
USERS_ZH = [
    "旅行的猫",
    "地理小白",
    "爱吃火锅",
    "星空下的我",
    "路过的学生",
    "北方的狼",
    "学霸养成中",
    "小鱼儿",
    "吃瓜群众",
    "老张",
    "数学不好",
    "天文迷",
    "化学课代表",
    "背包客",
    "一只咸鱼",
    "早睡早起",
    "快乐的风",
    "图书馆常客",
    "冰镇西瓜",
    "山野行者",
    "夜猫子",
    "小明同学",
    "云朵",
    "橘子汽水",
    "不会起名",
]
USERS_EN = [
    "curious_owl",
    "mapnerd",
    "geo_fan",
    "stargazer42",
    "chem_student",
    "quiet_reader",
    "travel_bug",
    "math_helper",
    "random_walker",
    "tea_drinker",
    "night_owl",
    "bookworm99",
    "atlas_lover",
    "pebble_kid",
    "north_wind",
    "coffee_first",
    "lazy_sunday",
    "trivia_buff",
    "rocket_dog",
    "snow_fox",
]

# (zh, en): made-up events for news stories.
EVENTS = (
    ("国际美食节", "an international food festival"),
    ("城市马拉松比赛", "a city marathon"),
    ("科技博览会", "a technology fair"),
    ("露天音乐节", "an open-air music festival"),
    ("国际图书展", "an international book fair"),
    ("青年科学论坛", "a youth science forum"),
    ("传统手工艺展览", "an exhibition of traditional crafts"),
    ("国际象棋公开赛", "an open chess tournament"),
    ("电影节", "a film festival"),
    ("植树活动", "a tree-planting day"),
    ("花卉展", "a flower show"),
    ("机器人大赛", "a robotics competition"),
    ("自行车骑行节", "a cycling festival"),
    ("摄影展", "a photography exhibition"),
    ("大学生辩论赛", "a student debate contest"),
    ("环保志愿者活动", "a volunteer clean-up day"),
)
QUOTES = (
    ("这次活动组织得很好，我很喜欢。", "The event was very well organised and I enjoyed it."),
    ("我们希望明年还能再来。", "We hope to come back next year."),
    ("今天见到了很多老朋友。", "I met many old friends today."),
    ("孩子们都玩得很开心。", "The children had a great time."),
    ("这是我第一次参加这样的活动。", "This is my first time at an event like this."),
    ("希望以后能举办更多这样的活动。", "I hope there will be more events like this one."),
    ("每个人都学到了新东西。", "Everyone learned something new."),
    ("天气很好，大家的心情也很好。", "The weather was good and so was everyone's mood."),
)
WEATHER = (
    ("当天天气晴朗，气温适宜。", "The weather was sunny and mild that day."),
    ("当天下着小雨，但参与者热情不减。", "Light rain fell, but the participants stayed cheerful."),
    ("当天多云，微风。", "It was cloudy with a light breeze."),
    ("虽然天气有些冷，现场依然很热闹。", "Although it was a little cold, the venue was lively."),
)
CLOSINGS = (
    ("主办方表示，下一届活动预计于明年举行。", "The organisers said the next edition is expected next year."),
    ("主办方提醒市民提前规划出行路线。", "Organisers advised residents to plan their journeys in advance."),
    ("活动期间，现场还设有志愿者服务点。", "Volunteer help desks were set up throughout the event."),
    ("更多信息可以在主办方网站上查询。", "More information is available on the organisers' website."),
)
ROLES = (("参与者", "participant"), ("志愿者", "volunteer"), ("组织者", "organiser"), ("游客", "visitor"))
MONTHS_EN = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# Chatter that carries no claim, for forum threads.
CHAT_ZH = (
    "学到了。",
    "前排围观。",
    "同问。",
    "收藏了，谢谢。",
    "涨知识了。",
    "楼上说得对。",
    "顶一下。",
    "原来如此。",
)
CHAT_EN = (
    "TIL.",
    "Good question.",
    "Saved, thanks.",
    "Huh, I did not know that.",
    "This.",
    "Came here to say this.",
)
THANKS_ZH = ("谢谢大家！", "明白了，谢谢！", "感谢回答！", "好的，谢谢楼上。")
THANKS_EN = ("Thanks, everyone!", "Got it, thank you!", "Thanks for the answers.", "Makes sense, thanks.")
ASKER_NOTES_ZH = (
    "最近在复习，想确认一下。",
    "突然想到这个问题。",
    "孩子问我，我一时答不上来。",
    "课本上好像提到过，忘了。",
    "",
)
ASKER_NOTES_EN = (
    "Studying for a quiz and want to double-check.",
    "Random thought while reading.",
    "My kid asked me and I blanked.",
    "I think I read it somewhere but forgot.",
    "",
)


def person(rng: random.Random, lang: str) -> str:
    if lang == "zh":
        return rng.choice(SURNAMES_ZH) + rng.choice(GIVEN_ZH)
    return f"{rng.choice(FIRST_EN)} {rng.choice(LAST_EN)}"


def user(rng: random.Random, lang: str) -> str:
    base = rng.choice(USERS_ZH if lang == "zh" else USERS_EN)
    return base if rng.random() < 0.5 else f"{base}{rng.randint(1, 999)}"


def random_date(rng: random.Random, start: int = 2015, end: int = 2025) -> dt.date:
    first = dt.date(start, 1, 1).toordinal()
    last = dt.date(end, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(first, last))


def date_text(day: dt.date, lang: str) -> str:
    if lang == "zh":
        return f"{day.year}年{day.month}月{day.day}日"
    return f"{day.day} {MONTHS_EN[day.month - 1]} {day.year}"


def side(pair: tuple[str, str], lang: str) -> str:
    """The `lang` half of a (zh, en) pair."""
    return pair[0] if lang == "zh" else pair[1]
