"""The fact table of the built-in world: true, uncontested facts in Chinese and English.

Every fact here must be true in the real world and not disputed: countries whose capital, highest point or
longest river is argued about (for instance a summit on a contested border, a river measured two ways, a country
with two capitals or none by law) are left out of that relation rather than given a debatable answer. Objects carry
aliases (珠峰, Everest, Kiev …) so that evaluation accepts every common name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RELATIONS: tuple[str, ...] = (
    "capital",
    "continent",
    "currency",
    "official_language",
    "highest_mountain",
    "longest_river",
    "planet_order",
    "planet_type",
    "largest_moon",
    "element_symbol",
    "atomic_number",
    "unit_conversion",
)


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple in both languages; `unit_*`/`number` serve unit conversions."""

    id: str
    relation: str
    kind: str  # what the subject is: country, planet, element, unit
    subject_key: str
    subject_zh: str
    subject_en: str
    object_zh: str
    object_en: str
    aliases_zh: tuple[str, ...] = ()
    aliases_en: tuple[str, ...] = ()
    unit_zh: str = ""  # unit_conversion only: the smaller unit (米) and the count (1000)
    unit_en: str = ""
    number: str = ""

    def subject(self, lang: str) -> str:
        return self.subject_zh if lang == "zh" else self.subject_en

    def object(self, lang: str) -> str:
        return self.object_zh if lang == "zh" else self.object_en

    def answers(self, lang: str) -> list[str]:
        """Every accepted answer string in `lang`: the object first, then its aliases."""
        aliases = self.aliases_zh if lang == "zh" else self.aliases_en
        out = [self.object(lang)]
        out += [a for a in aliases if a not in out]
        return out

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "relation": self.relation,
            "subject_zh": self.subject_zh,
            "subject_en": self.subject_en,
            "object_zh": self.object_zh,
            "object_en": self.object_en,
            "aliases_zh": list(self.aliases_zh),
            "aliases_en": list(self.aliases_en),
        }


# An object: (zh, en, zh aliases, en aliases)
Obj = tuple[str, str, tuple[str, ...], tuple[str, ...]]


def _o(zh: str, en: str, azh: tuple[str, ...] = (), aen: tuple[str, ...] = ()) -> Obj:
    return (zh, en, azh, aen)


CONTINENTS: dict[str, Obj] = {
    "asia": _o("亚洲", "Asia"),
    "europe": _o("欧洲", "Europe"),
    "africa": _o("非洲", "Africa"),
    "north_america": _o("北美洲", "North America", ("北美",)),
    "south_america": _o("南美洲", "South America", ("南美",)),
    "oceania": _o("大洋洲", "Oceania"),
}

# Official languages, only where a constitution or law names a single one for the whole country.
LANGUAGES: dict[str, Obj] = {
    "zh": _o(
        "汉语",
        "Chinese",
        ("普通话", "中文", "汉语普通话"),
        ("Mandarin", "Standard Chinese", "Mandarin Chinese"),
    ),
    "fr": _o("法语", "French"),
    "de": _o("德语", "German"),
    "it": _o("意大利语", "Italian"),
    "es": _o("西班牙语", "Spanish", ("卡斯蒂利亚语",), ("Castilian",)),
    "pt": _o("葡萄牙语", "Portuguese"),
    "ru": _o("俄语", "Russian", ("俄罗斯语",)),
    "ar": _o("阿拉伯语", "Arabic"),
    "tr": _o("土耳其语", "Turkish"),
    "fa": _o("波斯语", "Persian", (), ("Farsi",)),
    "pl": _o("波兰语", "Polish"),
    "el": _o("希腊语", "Greek"),
    "vi": _o("越南语", "Vietnamese"),
    "ko": _o("韩语", "Korean", ("韩国语", "朝鲜语")),
    "mn": _o("蒙古语", "Mongolian"),
    "uk": _o("乌克兰语", "Ukrainian"),
    "hu": _o("匈牙利语", "Hungarian"),
    "id": _o("印度尼西亚语", "Indonesian", ("印尼语",)),
    "ms": _o("马来语", "Malay", (), ("Malaysian",)),
    "bn": _o("孟加拉语", "Bengali", (), ("Bangla",)),
    "ne": _o("尼泊尔语", "Nepali", (), ("Nepalese",)),
}

EURO = _o("欧元", "euro")


@dataclass(frozen=True)
class Country:
    key: str
    zh: str
    en: str
    capital: Obj | None = None
    continent: str | None = None
    currency: Obj | None = None
    language: str | None = None
    mountain: Obj | None = None
    river: Obj | None = None


# fmt: off
COUNTRIES: tuple[Country, ...] = (
    Country("china", "中国", "China", _o("北京", "Beijing", (), ("Peking",)), "asia",
            _o("人民币", "renminbi", (), ("yuan", "Chinese yuan", "RMB")), "zh",
            _o("珠穆朗玛峰", "Mount Everest", ("珠峰", "圣母峰"), ("Everest", "Qomolangma", "Chomolungma")),
            _o("长江", "Yangtze", ("扬子江",), ("Yangtze River", "Chang Jiang"))),
    Country("japan", "日本", "Japan", _o("东京", "Tokyo"), "asia", _o("日元", "yen", ("日圆",), ("Japanese yen",)),
            None, _o("富士山", "Mount Fuji", (), ("Fuji", "Fujisan")),
            _o("信浓川", "Shinano River", ("信浓河",), ("Shinano",))),
    Country("south_korea", "韩国", "South Korea", _o("首尔", "Seoul"), "asia",
            _o("韩元", "South Korean won", (), ("won", "Korean won")), "ko", _o("汉拿山", "Hallasan", (), ("Mount Halla",)),
            _o("洛东江", "Nakdong River", (), ("Nakdong",))),
    Country("india", "印度", "India", _o("新德里", "New Delhi"), "asia", _o("印度卢比", "Indian rupee", (), ("rupee",)),
            None, None, _o("恒河", "Ganges", (), ("Ganga", "Ganges River"))),
    Country("thailand", "泰国", "Thailand", _o("曼谷", "Bangkok"), "asia", _o("泰铢", "baht", (), ("Thai baht",)),
            None, _o("因他暖山", "Doi Inthanon", ("茵他侬山",), ("Inthanon",))),
    Country("vietnam", "越南", "Vietnam", _o("河内", "Hanoi"), "asia", _o("越南盾", "Vietnamese dong", (), ("dong",)),
            "vi", _o("番西邦峰", "Fansipan", ("番西邦山",), ("Phan Xi Pang",))),
    Country("mongolia", "蒙古", "Mongolia", _o("乌兰巴托", "Ulaanbaatar", (), ("Ulan Bator",)), "asia",
            _o("图格里克", "tögrög", ("蒙古图格里克",), ("tugrik", "togrog", "Mongolian tögrög")), "mn",
            _o("友谊峰", "Khüiten Peak", ("奎屯峰",), ("Khuiten Peak", "Khüiten", "Khuiten"))),
    Country("philippines", "菲律宾", "the Philippines", _o("马尼拉", "Manila"), "asia",
            _o("菲律宾比索", "Philippine peso", (), ("peso",)), None, _o("阿波山", "Mount Apo", (), ("Apo",)),
            _o("卡加延河", "Cagayan River", (), ("Cagayan",))),
    Country("pakistan", "巴基斯坦", "Pakistan", _o("伊斯兰堡", "Islamabad"), "asia",
            _o("巴基斯坦卢比", "Pakistani rupee", (), ("rupee",)), None, None,
            _o("印度河", "Indus", (), ("Indus River",))),
    Country("iran", "伊朗", "Iran", _o("德黑兰", "Tehran"), "asia", None, "fa",
            _o("达马万德山", "Mount Damavand", (), ("Damavand",)), _o("卡伦河", "Karun", (), ("Karun River",))),
    Country("saudi_arabia", "沙特阿拉伯", "Saudi Arabia", _o("利雅得", "Riyadh"), "asia",
            _o("沙特里亚尔", "Saudi riyal", ("里亚尔",), ("riyal",)), "ar"),
    Country("turkey", "土耳其", "Turkey", _o("安卡拉", "Ankara"), None, _o("土耳其里拉", "Turkish lira", ("里拉",), ("lira",)),
            "tr", _o("阿勒山", "Mount Ararat", ("亚拉拉特山",), ("Ararat", "Ağrı Dağı"))),
    Country("bangladesh", "孟加拉国", "Bangladesh", _o("达卡", "Dhaka"), "asia", _o("塔卡", "taka", ("孟加拉塔卡",),
            ("Bangladeshi taka",)), "bn"),
    Country("nepal", "尼泊尔", "Nepal", _o("加德满都", "Kathmandu"), "asia",
            _o("尼泊尔卢比", "Nepalese rupee", (), ("rupee",)), "ne",
            _o("珠穆朗玛峰", "Mount Everest", ("珠峰", "萨加玛塔峰"), ("Everest", "Sagarmatha"))),
    Country("indonesia", "印度尼西亚", "Indonesia", None, None, _o("印尼盾", "Indonesian rupiah", ("印度尼西亚盾",),
            ("rupiah",)), "id", _o("查亚峰", "Puncak Jaya", (), ("Carstensz Pyramid",))),
    Country("malaysia", "马来西亚", "Malaysia", _o("吉隆坡", "Kuala Lumpur"), "asia",
            _o("林吉特", "Malaysian ringgit", ("马来西亚林吉特",), ("ringgit",)), "ms",
            _o("京那巴鲁山", "Mount Kinabalu", ("基纳巴卢山",), ("Kinabalu",))),
    Country("france", "法国", "France", _o("巴黎", "Paris"), "europe", EURO, "fr", None,
            _o("卢瓦尔河", "Loire", (), ("Loire River",))),
    Country("germany", "德国", "Germany", _o("柏林", "Berlin"), "europe", EURO, "de",
            _o("楚格峰", "Zugspitze", (), ())),
    Country("italy", "意大利", "Italy", _o("罗马", "Rome"), "europe", EURO, "it", None,
            _o("波河", "Po", (), ("Po River", "River Po"))),
    Country("spain", "西班牙", "Spain", _o("马德里", "Madrid"), "europe", EURO, "es",
            _o("泰德峰", "Mount Teide", ("泰德火山",), ("Teide", "Pico del Teide"))),
    Country("uk", "英国", "the United Kingdom", _o("伦敦", "London"), "europe",
            _o("英镑", "pound sterling", (), ("pound", "British pound", "sterling")), None,
            _o("本尼维斯山", "Ben Nevis", (), ()), _o("塞文河", "Severn", ("塞汶河",), ("River Severn", "Severn River"))),
    Country("russia", "俄罗斯", "Russia", _o("莫斯科", "Moscow"), None,
            _o("卢布", "Russian ruble", ("俄罗斯卢布",), ("ruble", "rouble")), "ru",
            _o("厄尔布鲁士山", "Mount Elbrus", (), ("Elbrus",))),
    Country("portugal", "葡萄牙", "Portugal", _o("里斯本", "Lisbon"), "europe", EURO, "pt",
            _o("皮库山", "Mount Pico", ("皮科山",), ("Pico",))),
    Country("greece", "希腊", "Greece", _o("雅典", "Athens"), "europe", EURO, "el",
            _o("奥林匹斯山", "Mount Olympus", (), ("Olympus",))),
    Country("poland", "波兰", "Poland", _o("华沙", "Warsaw"), "europe",
            _o("兹罗提", "złoty", ("波兰兹罗提",), ("zloty", "Polish złoty")), "pl", _o("雷西峰", "Rysy", (), ()),
            _o("维斯瓦河", "Vistula", ("维斯图拉河",), ("Vistula River", "Wisła"))),
    Country("sweden", "瑞典", "Sweden", _o("斯德哥尔摩", "Stockholm"), "europe",
            _o("瑞典克朗", "Swedish krona", (), ("krona",)), None, _o("凯布讷山", "Kebnekaise", (), ())),
    Country("norway", "挪威", "Norway", _o("奥斯陆", "Oslo"), "europe", _o("挪威克朗", "Norwegian krone", (), ("krone",)),
            None, _o("加尔赫峰", "Galdhøpiggen", (), ("Galdhopiggen",)),
            _o("格罗马河", "Glomma", (), ("Glomma River",))),
    Country("finland", "芬兰", "Finland", _o("赫尔辛基", "Helsinki"), "europe", EURO),
    Country("austria", "奥地利", "Austria", _o("维也纳", "Vienna"), "europe", EURO, "de",
            _o("大格洛克纳山", "Grossglockner", (), ("Großglockner",))),
    Country("ireland", "爱尔兰", "Ireland", _o("都柏林", "Dublin"), "europe", EURO, None,
            _o("卡朗图厄尔山", "Carrauntoohil", (), ()), _o("香农河", "Shannon", (), ("River Shannon",))),
    Country("hungary", "匈牙利", "Hungary", _o("布达佩斯", "Budapest"), "europe",
            _o("福林", "Hungarian forint", ("匈牙利福林",), ("forint",)), "hu", _o("凯凯什峰", "Kékes", ("凯凯什山",),
            ("Kekes",))),
    Country("ukraine", "乌克兰", "Ukraine", _o("基辅", "Kyiv", (), ("Kiev",)), "europe",
            _o("格里夫纳", "hryvnia", ("乌克兰格里夫纳",), ("Ukrainian hryvnia",)), "uk",
            _o("戈韦尔拉山", "Hoverla", (), ("Mount Hoverla",)), _o("第聂伯河", "Dnieper", (), ("Dnipro",))),
    Country("belgium", "比利时", "Belgium", _o("布鲁塞尔", "Brussels"), "europe", EURO),
    Country("denmark", "丹麦", "Denmark", _o("哥本哈根", "Copenhagen"), "europe",
            _o("丹麦克朗", "Danish krone", (), ("krone",))),
    Country("czechia", "捷克", "the Czech Republic", _o("布拉格", "Prague"), "europe",
            _o("捷克克朗", "Czech koruna", (), ("koruna",)), None, _o("斯涅日卡山", "Sněžka", (), ("Snezka",)),
            _o("伏尔塔瓦河", "Vltava", (), ("Vltava River", "Moldau"))),
    Country("usa", "美国", "the United States", _o("华盛顿", "Washington, D.C.", ("华盛顿特区", "华盛顿哥伦比亚特区"),
            ("Washington", "Washington DC")), "north_america", _o("美元", "US dollar", ("美金",),
            ("dollar", "U.S. dollar", "United States dollar"))),
    Country("canada", "加拿大", "Canada", _o("渥太华", "Ottawa"), "north_america",
            _o("加拿大元", "Canadian dollar", ("加元",), ("dollar",)), None, _o("洛根山", "Mount Logan", (), ("Logan",)),
            _o("麦肯齐河", "Mackenzie", ("马更些河",), ("Mackenzie River",))),
    Country("mexico", "墨西哥", "Mexico", _o("墨西哥城", "Mexico City"), "north_america",
            _o("墨西哥比索", "Mexican peso", (), ("peso",)), None,
            _o("奥里萨巴火山", "Pico de Orizaba", ("奥里萨巴峰",), ("Orizaba", "Citlaltépetl"))),
    Country("cuba", "古巴", "Cuba", _o("哈瓦那", "Havana"), "north_america", _o("古巴比索", "Cuban peso", (), ("peso",)),
            "es", _o("图尔基诺峰", "Pico Turquino", (), ("Turquino",)), _o("考托河", "Cauto", (), ("Cauto River",))),
    Country("brazil", "巴西", "Brazil", _o("巴西利亚", "Brasília", (), ("Brasilia",)), "south_america",
            _o("雷亚尔", "Brazilian real", ("巴西雷亚尔",), ("real",)), "pt",
            _o("内布利纳峰", "Pico da Neblina", (), ("Neblina",)), _o("亚马孙河", "Amazon", ("亚马逊河",),
            ("Amazon River",))),
    Country("argentina", "阿根廷", "Argentina", _o("布宜诺斯艾利斯", "Buenos Aires"), "south_america",
            _o("阿根廷比索", "Argentine peso", (), ("peso",)), None, _o("阿空加瓜山", "Aconcagua", (), ("Mount Aconcagua",)),
            _o("巴拉那河", "Paraná", (), ("Parana", "Paraná River"))),
    Country("chile", "智利", "Chile", _o("圣地亚哥", "Santiago", (), ("Santiago de Chile",)), "south_america",
            _o("智利比索", "Chilean peso", (), ("peso",)), None,
            _o("奥霍斯-德尔萨拉多山", "Ojos del Salado", ("奥霍斯德尔萨拉多山",), ()),
            _o("洛阿河", "Loa", (), ("Loa River",))),
    Country("peru", "秘鲁", "Peru", _o("利马", "Lima"), "south_america", _o("索尔", "Peruvian sol", ("秘鲁索尔",), ("sol",)),
            None, _o("瓦斯卡兰山", "Huascarán", (), ("Huascaran",))),
    Country("colombia", "哥伦比亚", "Colombia", _o("波哥大", "Bogotá", (), ("Bogota",)), "south_america",
            _o("哥伦比亚比索", "Colombian peso", (), ("peso",))),
    Country("egypt", "埃及", "Egypt", _o("开罗", "Cairo"), "africa", _o("埃及镑", "Egyptian pound", (), ("pound",)), "ar",
            _o("凯瑟琳山", "Mount Catherine", ("圣凯瑟琳山",), ("Saint Catherine",)),
            _o("尼罗河", "Nile", (), ("Nile River", "River Nile"))),
    Country("kenya", "肯尼亚", "Kenya", _o("内罗毕", "Nairobi"), "africa",
            _o("肯尼亚先令", "Kenyan shilling", (), ("shilling",)), None, _o("肯尼亚山", "Mount Kenya", (), ()),
            _o("塔纳河", "Tana", (), ("Tana River",))),
    Country("nigeria", "尼日利亚", "Nigeria", _o("阿布贾", "Abuja"), "africa", _o("奈拉", "naira", ("尼日利亚奈拉",),
            ("Nigerian naira",)), None, None, _o("尼日尔河", "Niger", (), ("Niger River",))),
    Country("ethiopia", "埃塞俄比亚", "Ethiopia", _o("亚的斯亚贝巴", "Addis Ababa"), "africa",
            _o("比尔", "birr", ("埃塞俄比亚比尔",), ("Ethiopian birr",)), None,
            _o("拉斯达尚峰", "Ras Dashen", ("达尚峰",), ("Ras Dejen",))),
    Country("morocco", "摩洛哥", "Morocco", _o("拉巴特", "Rabat"), "africa",
            _o("摩洛哥迪拉姆", "Moroccan dirham", ("迪拉姆",), ("dirham",)), None,
            _o("图卜卡勒山", "Toubkal", ("图卜卡勒峰",), ("Jbel Toubkal", "Mount Toubkal"))),
    Country("ghana", "加纳", "Ghana", _o("阿克拉", "Accra"), "africa", _o("塞地", "cedi", ("加纳塞地",), ("Ghanaian cedi",))),
    Country("tanzania", "坦桑尼亚", "Tanzania", None, "africa",
            _o("坦桑尼亚先令", "Tanzanian shilling", (), ("shilling",)), None,
            _o("乞力马扎罗山", "Mount Kilimanjaro", (), ("Kilimanjaro",))),
    Country("australia", "澳大利亚", "Australia", _o("堪培拉", "Canberra"), "oceania",
            _o("澳元", "Australian dollar", ("澳大利亚元",), ("dollar",)), None, None,
            _o("墨累河", "Murray", ("墨瑞河",), ("Murray River", "River Murray"))),
    Country("new_zealand", "新西兰", "New Zealand", _o("惠灵顿", "Wellington"), "oceania",
            _o("新西兰元", "New Zealand dollar", ("纽元",), ("dollar",)), None,
            _o("库克山", "Aoraki / Mount Cook", ("奥拉基山",), ("Mount Cook", "Aoraki")),
            _o("怀卡托河", "Waikato", (), ("Waikato River",))),
)
# fmt: on

# Planets in order from the Sun: key, zh, en, type, largest moon (None: no moons).
ORDINALS_ZH = ("第一", "第二", "第三", "第四", "第五", "第六", "第七", "第八")
ORDINALS_EN = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
ORDINALS_EN_SHORT = ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th")
PLANET_TYPES: dict[str, Obj] = {
    "terrestrial": _o("类地行星", "terrestrial planet", ("岩质行星",), ("rocky planet",)),
    "gas_giant": _o("气态巨行星", "gas giant", ("气态巨星", "气体巨星"), ()),
    "ice_giant": _o("冰巨星", "ice giant", ("冰巨行星",), ()),
}
PLANETS: tuple[tuple[str, str, str, str, Obj | None], ...] = (
    ("mercury", "水星", "Mercury", "terrestrial", None),
    ("venus", "金星", "Venus", "terrestrial", None),
    ("earth", "地球", "Earth", "terrestrial", _o("月球", "the Moon", ("月亮",), ("Moon", "Luna"))),
    ("mars", "火星", "Mars", "terrestrial", _o("火卫一", "Phobos", ("福波斯",), ())),
    ("jupiter", "木星", "Jupiter", "gas_giant", _o("木卫三", "Ganymede", ("盖尼米德",), ())),
    ("saturn", "土星", "Saturn", "gas_giant", _o("土卫六", "Titan", ("泰坦",), ())),
    ("uranus", "天王星", "Uranus", "ice_giant", _o("天卫三", "Titania", ("泰坦尼亚",), ())),
    ("neptune", "海王星", "Neptune", "ice_giant", _o("海卫一", "Triton", ("特里同",), ())),
)

# Elements: key, zh, en, symbol, atomic number.
ELEMENTS: tuple[tuple[str, str, str, str, int], ...] = (
    ("hydrogen", "氢", "hydrogen", "H", 1),
    ("helium", "氦", "helium", "He", 2),
    ("lithium", "锂", "lithium", "Li", 3),
    ("beryllium", "铍", "beryllium", "Be", 4),
    ("boron", "硼", "boron", "B", 5),
    ("carbon", "碳", "carbon", "C", 6),
    ("nitrogen", "氮", "nitrogen", "N", 7),
    ("oxygen", "氧", "oxygen", "O", 8),
    ("fluorine", "氟", "fluorine", "F", 9),
    ("neon", "氖", "neon", "Ne", 10),
    ("sodium", "钠", "sodium", "Na", 11),
    ("magnesium", "镁", "magnesium", "Mg", 12),
    ("aluminium", "铝", "aluminium", "Al", 13),
    ("silicon", "硅", "silicon", "Si", 14),
    ("phosphorus", "磷", "phosphorus", "P", 15),
    ("sulfur", "硫", "sulfur", "S", 16),
    ("chlorine", "氯", "chlorine", "Cl", 17),
    ("argon", "氩", "argon", "Ar", 18),
    ("potassium", "钾", "potassium", "K", 19),
    ("calcium", "钙", "calcium", "Ca", 20),
    ("iron", "铁", "iron", "Fe", 26),
    ("copper", "铜", "copper", "Cu", 29),
    ("zinc", "锌", "zinc", "Zn", 30),
    ("silver", "银", "silver", "Ag", 47),
    ("tin", "锡", "tin", "Sn", 50),
    ("iodine", "碘", "iodine", "I", 53),
    ("gold", "金", "gold", "Au", 79),
    ("lead", "铅", "lead", "Pb", 82),
    ("uranium", "铀", "uranium", "U", 92),
)

# Unit conversions: key, unit zh, unit en, count, smaller unit zh, smaller unit en (plural), zh/en aliases of the
# SMALLER unit (1 吨 = 1000 千克 also reads 1000 公斤).
UNITS: tuple[tuple[str, str, str, int, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("km-m", "千米", "kilometre", 1000, "米", "metres", (), ("meters",)),
    ("m-cm", "米", "metre", 100, "厘米", "centimetres", (), ("centimeters",)),
    ("m-mm", "米", "metre", 1000, "毫米", "millimetres", (), ("millimeters",)),
    ("cm-mm", "厘米", "centimetre", 10, "毫米", "millimetres", (), ("millimeters",)),
    ("kg-g", "千克", "kilogram", 1000, "克", "grams", (), ()),
    ("t-kg", "吨", "tonne", 1000, "千克", "kilograms", ("公斤",), ("kilos",)),
    ("h-min", "小时", "hour", 60, "分钟", "minutes", ("分",), ()),
    ("h-s", "小时", "hour", 3600, "秒", "seconds", (), ()),
    ("min-s", "分钟", "minute", 60, "秒", "seconds", (), ()),
    ("day-h", "天", "day", 24, "小时", "hours", (), ()),
    ("week-day", "星期", "week", 7, "天", "days", (), ()),
    ("year-month", "年", "year", 12, "个月", "months", (), ()),
    ("century-year", "世纪", "century", 100, "年", "years", (), ()),
    ("l-ml", "升", "litre", 1000, "毫升", "millilitres", (), ("milliliters",)),
    ("ft-in", "英尺", "foot", 12, "英寸", "inches", (), ()),
    ("yd-ft", "码", "yard", 3, "英尺", "feet", (), ()),
    ("dozen", "打", "dozen", 12, "个", "items", (), ()),
    ("ha-m2", "公顷", "hectare", 10000, "平方米", "square metres", (), ("square meters",)),
    ("km2-ha", "平方千米", "square kilometre", 100, "公顷", "hectares", (), ()),
    ("kw-w", "千瓦", "kilowatt", 1000, "瓦", "watts", ("瓦特",), ()),
)


def _fact(relation: str, kind: str, key: str, szh: str, sen: str, obj: Obj, **kw: Any) -> Fact:
    zh, en, azh, aen = obj
    return Fact(f"{relation}:{key}", relation, kind, key, szh, sen, zh, en, azh, aen, **kw)


def _thousands(n: int) -> str:
    return f"{n:,}" if n >= 10000 else str(n)


def build_facts() -> list[Fact]:
    """All facts, in a fixed order (relation by relation, subjects in table order)."""
    by_rel: dict[str, list[Fact]] = {r: [] for r in RELATIONS}
    for c in COUNTRIES:
        add = lambda rel, obj, c=c: by_rel[rel].append(_fact(rel, "country", c.key, c.zh, c.en, obj))  # noqa: E731
        if c.capital:
            add("capital", c.capital)
        if c.continent:
            add("continent", CONTINENTS[c.continent])
        if c.currency:
            add("currency", c.currency)
        if c.language:
            add("official_language", LANGUAGES[c.language])
        if c.mountain:
            add("highest_mountain", c.mountain)
        if c.river:
            add("longest_river", c.river)
    for i, (key, zh, en, ptype, moon) in enumerate(PLANETS):
        order = _o(ORDINALS_ZH[i], ORDINALS_EN[i], (f"第{i + 1}",), (ORDINALS_EN_SHORT[i],))
        by_rel["planet_order"].append(_fact("planet_order", "planet", key, zh, en, order))
        by_rel["planet_type"].append(_fact("planet_type", "planet", key, zh, en, PLANET_TYPES[ptype]))
        if moon:
            by_rel["largest_moon"].append(_fact("largest_moon", "planet", key, zh, en, moon))
    for key, zh, en, sym, num in ELEMENTS:
        by_rel["element_symbol"].append(_fact("element_symbol", "element", key, zh, en, _o(sym, sym)))
        by_rel["atomic_number"].append(_fact("atomic_number", "element", key, zh, en, _o(str(num), str(num))))
    for key, uzh, uen, n, szh, sen, azh, aen in UNITS:
        obj_zh, obj_en = f"{n}{szh}", f"{n} {sen}"
        alias_zh = tuple(dict.fromkeys((str(n), *(f"{n}{a}" for a in azh))))
        alias_en = tuple(dict.fromkeys((str(n), _thousands(n), *(f"{n} {a}" for a in aen))))
        by_rel["unit_conversion"].append(
            _fact(
                "unit_conversion",
                "unit",
                key,
                uzh,
                uen,
                _o(obj_zh, obj_en, alias_zh, alias_en),
                unit_zh=szh,
                unit_en=sen,
                number=str(n),
            )
        )
    return [f for r in RELATIONS for f in by_rel[r]]


def facts_by_id(facts: list[Fact]) -> dict[str, Fact]:
    return {f.id: f for f in facts}
