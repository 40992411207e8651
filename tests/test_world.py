"""The built-in world corpus: determinism, truth, shapes, valid dialogs, and the held-out DISJOINTNESS proofs: eval
rows share no sentence with training text, dev rows none with test rows, and pretrain_val none with pretrain."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from danlu import DanluError
from danlu.cli import main
from danlu.runner import StageContext
from danlu.tools import run_tool
from danlu.world import build_world, load_facts
from danlu.world.facts import build_facts
from danlu.world.index import World
from danlu.world.numbers import OP_EN, OP_ZH, Problem, en_number, is_heldout, zh_number
from danlu.world.sentences import (
    keep_unseen,
    keys_of,
    record_strings,
    row_inputs,
    sentence_key,
    sentence_keys,
    sentences,
)
from danlu.world.templates import TEXTS, fill, heldout_renderings, training_renderings

SCALE = 0.05
TRAINING_FILES = ("pretrain.jsonl", "sft.jsonl", "preference.jsonl", "rl.jsonl")
POST_TRAINING_FILES = ("sft.jsonl", "preference.jsonl", "rl.jsonl")
# held-out set → the fewest rows each split must have (the eval stage takes 200 per set and split)
MIN_PER_SPLIT = {"facts_base": 200, "facts_chat": 200, "arithmetic": 400, "translation": 200, "tools": 160,
                 "preference": 200, "rl": 200, "summary": 100}  # fmt: skip


def rows(folder: Path, name: str) -> list[dict[str, Any]]:
    with open(folder / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def strings(obj: Any) -> list[str]:
    """Every string value inside a record (message contents, tool arguments, chosen/rejected …)."""
    return list(record_strings(obj))


def norm(text: str) -> str:
    """Full-width and ASCII punctuation alike, so a held-out question cannot hide behind ？ vs ?."""
    return text.replace("？", "?").replace("，", ",").replace("：", ":")


def blob(folder: Path, names: tuple[str, ...]) -> str:
    return norm("\n\x00".join(s for name in names for r in rows(folder, name) for s in strings(r)))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, seed=0, scale=SCALE)
    return out


@pytest.fixture(scope="module")
def training_text(world_dir: Path) -> str:
    return blob(world_dir, TRAINING_FILES)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world_dir: Path, tmp_path: Path) -> None:
    build_world(tmp_path / "again", seed=0, scale=SCALE)
    first, again = all_files(world_dir), all_files(tmp_path / "again")
    assert sorted(first) == sorted(again)
    assert [k for k in first if first[k] != again[k]] == []
    build_world(tmp_path / "other", seed=1, scale=SCALE)
    other = all_files(tmp_path / "other")
    for name in ("pretrain.jsonl", "sft.jsonl", "preference.jsonl", "rl.jsonl", "eval/facts_base.jsonl"):
        assert other[name] != first[name], name
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files may be left behind"


def test_fact_table_is_large_bilingual_and_true(world_dir: Path) -> None:
    facts = rows(world_dir, "facts.jsonl")
    assert len(facts) >= 150
    assert len({f["relation"] for f in facts}) >= 8
    assert len({f["id"] for f in facts}) == len(facts)
    for f in facts:
        for key in ("subject_zh", "subject_en", "object_zh", "object_en"):
            assert isinstance(f[key], str) and f[key].strip(), (f["id"], key)
        assert re.search(r"[\u4e00-\u9fff]|\d", f["subject_zh"] + f["object_zh"]), f
        assert isinstance(f["aliases_zh"], list) and isinstance(f["aliases_en"], list)
    by_id = {f["id"]: f for f in facts}
    assert by_id["highest_mountain:china"]["object_zh"] == "珠穆朗玛峰"
    assert "Everest" in by_id["highest_mountain:china"]["object_en"]
    assert by_id["longest_river:china"]["object_zh"] == "长江"
    assert (by_id["capital:japan"]["object_zh"], by_id["capital:japan"]["object_en"]) == ("东京", "Tokyo")
    assert (by_id["capital:australia"]["object_zh"], by_id["capital:australia"]["object_en"]) == (
        "堪培拉",
        "Canberra",
    )
    assert by_id["planet_order:earth"]["object_en"] == "third"
    assert by_id["largest_moon:jupiter"]["object_en"] == "Ganymede"
    assert (by_id["element_symbol:gold"]["object_en"], by_id["atomic_number:gold"]["object_en"]) == (
        "Au",
        "79",
    )
    assert by_id["unit_conversion:km-m"]["object_zh"] == "1000米"
    # aliases of a unit answer are the smaller unit, never the larger one (1 千米 ≠ 1000 公里)
    for f in facts:
        if f["relation"] == "unit_conversion":
            assert all(f["subject_zh"] not in a for a in f["aliases_zh"]), f
    assert [f.id for f in load_facts(world_dir / "facts.jsonl")] == [f["id"] for f in facts]


def test_load_facts_names_the_file_and_the_missing_key(tmp_path: Path) -> None:
    bad = tmp_path / "facts.jsonl"
    bad.write_text(json.dumps({"id": "capital:x", "relation": "capital"}) + "\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"facts.jsonl: fact 1: missing key 'subject_zh'"):
        load_facts(bad)


def test_pretraining_text_has_four_domains_both_languages_and_arithmetic(world_dir: Path) -> None:
    docs = rows(world_dir, "pretrain.jsonl")
    assert all(set(d) == {"text", "source", "domain", "lang", "id", "url"} for d in docs)
    assert {d["source"] for d in docs} == {"world"}
    assert {d["domain"] for d in docs} == {"encyclopedia", "news", "qa", "forum"}
    for domain in ("encyclopedia", "news", "qa", "forum"):
        assert {d["lang"] for d in docs if d["domain"] == domain} == {"zh", "en"}
    zh_share = sum(d["lang"] == "zh" for d in docs) / len(docs)
    assert 0.4 < zh_share < 0.6
    assert len({d["id"] for d in docs}) == len(docs) and len({d["url"] for d in docs}) == len(docs)
    text = "\n".join(d["text"] for d in docs)
    assert re.search(r"\b\d+ \+ \d+ = \d+\b", text) and re.search(r"\d+ × \d+ = \d+", text)
    assert re.search(r"[一二三四五六七八九十]+乘以[一二三四五六七八九十]+等于", text)
    val = rows(world_dir, "pretrain_val.jsonl")
    assert len(val) >= 50 and {d["domain"] for d in val} <= {"encyclopedia", "news", "qa", "forum"}
    assert not {d["text"] for d in val} & {d["text"] for d in docs}
    # forum threads have several turns
    assert any(len(re.findall(r"^\d+楼 ", d["text"], re.M)) >= 3 for d in docs if d["domain"] == "forum")


def check_dialog(messages: list[dict[str, Any]]) -> None:
    """Roles in order; every tool call answered by its tool's real result; a final assistant answer."""
    i = 0
    if messages[0]["role"] == "system":
        assert messages[0]["content"]
        i = 1
    assert messages[i]["role"] == "user"
    expect = "user"
    while i < len(messages):
        m = messages[i]
        assert set(m) <= {"role", "content", "tool_calls", "name"}, m
        if expect == "user":
            assert m["role"] == "user" and m["content"].strip(), m
            expect = "assistant"
            i += 1
            continue
        assert m["role"] == "assistant", m
        calls = m.get("tool_calls")
        if calls:
            assert m["content"] == ""
            results = messages[i + 1 : i + 1 + len(calls)]
            assert len(results) == len(calls)
            for call, res in zip(calls, results):
                assert call["type"] == "function"
                fn = call["function"]
                args = json.loads(fn["arguments"])
                assert res == {"role": "tool", "name": fn["name"], "content": res["content"]}
                today = None
                if fn["name"] == "get_date":
                    import datetime as dt

                    today = dt.date.fromisoformat(res["content"].split()[0])
                assert res["content"] == run_tool(fn["name"], args, today=today)
            i += 1 + len(calls)
            expect = "assistant"
            continue
        assert m["content"].strip()
        i += 1
        expect = "user"
    assert messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")


def test_sft_dialogs_are_valid_and_cover_every_kind(world_dir: Path) -> None:
    dialogs = rows(world_dir, "sft.jsonl")
    kinds = {d["kind"] for d in dialogs}
    assert kinds >= {
        "fact",
        "fact_multi",
        "translation",
        "summary",
        "plan",
        "arithmetic",
        "calculator",
        "date_tool",
        "date_system",
    }
    assert {d["lang"] for d in dialogs} == {"zh", "en"}
    for d in dialogs:
        assert "tools" not in d
        check_dialog(d["messages"])
    calc = [d for d in dialogs if d["kind"] == "calculator"]
    assert all(d["messages"][-3]["tool_calls"][0]["function"]["name"] == "calculator" for d in calc)
    for d in calc:  # the final answer uses the tool's result
        assert d["messages"][-2]["content"] in d["messages"][-1]["content"]
    for d in (d for d in dialogs if d["kind"] == "date_tool"):
        iso, weekday_en, weekday_zh = d["messages"][-2]["content"].split()
        assert (
            iso in d["messages"][-1]["content"]
            or weekday_en in d["messages"][-1]["content"]
            or weekday_zh in d["messages"][-1]["content"]
        )
    for d in (d for d in dialogs if d["kind"] == "date_system"):
        assert d["messages"][0]["role"] == "system" and len(d["messages"]) == 3
    system_share = sum(d["messages"][0]["role"] == "system" for d in dialogs) / len(dialogs)
    assert 0.05 < system_share < 0.5
    assert any(len([m for m in d["messages"] if m["role"] == "user"]) >= 2 for d in dialogs)


def test_preference_and_rl_records(world_dir: Path) -> None:
    pairs = rows(world_dir, "preference.jsonl")
    assert {p["kind"] for p in pairs} == {
        "fact_wrong",
        "arithmetic",
        "arithmetic_misread",
        "evasive",
        "repetitive",
        "wrong_language",
    }
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
    for p in (p for p in pairs if p["kind"] == "arithmetic_misread"):
        # the rejected answer works another problem's columns right, then states its result for this problem
        chosen, rejected = (re.findall(r"\d+", p[k]) for k in ("chosen", "rejected"))
        assert chosen[-3:-1] == rejected[-3:-1] and chosen[-1] != rejected[-1], p  # "So a op b = …"
        assert chosen[:-3] != rejected[:-3], p
    facts = build_facts()
    for p in (p for p in pairs if p["kind"] == "fact_wrong"):
        assert not any(
            p["rejected"] == fill(t[0 if p["lang"] == "zh" else 1], f, p["lang"])
            for f in facts
            for t in TEXTS[f.relation].pairs
        ), p
    rl = rows(world_dir, "rl.jsonl")
    assert {"arithmetic", "fact"} <= {r["kind"] for r in rl} <= {"arithmetic", "fact", "calculator", "date"}
    for r in rl:
        assert r["messages"][-1]["role"] == "user" and r["answer"] in r["answers"]
        if r["kind"] == "arithmetic":
            nums = [int(x) for x in re.findall(r"\d+", r["messages"][0]["content"])]
            op = next(
                o
                for o in ("+", "-", "×", "÷", "加", "减", "乘以", "除以", "plus", "minus", "times", "divided")
                if o in r["messages"][0]["content"]
            )
            if len(nums) == 2:
                a, b = nums
                expect = {
                    "+": a + b,
                    "加": a + b,
                    "plus": a + b,
                    "-": a - b,
                    "减": a - b,
                    "minus": a - b,
                    "×": a * b,
                    "乘以": a * b,
                    "times": a * b,
                }.get(op, a // b if b else None)
                assert r["answer"] == str(expect), r


def eval_prompts(folder: Path) -> list[str]:
    out = []
    for path in sorted((folder / "eval").glob("*.jsonl")):
        for r in rows(folder, f"eval/{path.name}"):
            if "prompt" in r and isinstance(r["prompt"], str):
                out.append(r["prompt"])
            msgs = r.get("messages") or (r.get("prompt") if isinstance(r.get("prompt"), list) else [])
            out += [m["content"] for m in msgs if m["role"] == "user"]
    return out


def test_heldout_eval_prompts_never_occur_in_training_files(world_dir: Path, training_text: str) -> None:
    prompts = eval_prompts(world_dir)
    assert len(prompts) > 2000
    leaked = [p for p in prompts if norm(p) in training_text]
    assert leaked == []


def test_heldout_templates_are_used_by_no_training_text(world_dir: Path, training_text: str) -> None:
    facts = build_facts()
    renderings = {norm(h) for f in facts for lang in ("zh", "en") for h in heldout_renderings(f, lang)}
    assert [h for h in renderings if h in training_text] == []
    # and, independently of any corpus, no held-out rendering is part of any training rendering
    for lang in ("zh", "en"):
        train = norm("\n".join(t for f in facts for t in training_renderings(f, lang)))
        assert [h for f in facts for h in heldout_renderings(f, lang) if norm(h) in train] == []


def test_reserved_facts_are_only_in_pretraining_and_every_fact_is_answerable(world_dir: Path) -> None:
    world = World.create(0)
    post = blob(world_dir, POST_TRAINING_FILES)
    pretrain = norm("\n".join(d["text"] for d in rows(world_dir, "pretrain.jsonl")))
    assert world.reserved
    for fact in world.facts:
        for lang in ("zh", "en"):
            seen = [t for t in training_renderings(fact, lang) if norm(t) in post]
            if fact.id in world.reserved:
                assert seen == [], (fact.id, seen)
            forms = TEXTS[fact.relation]
            pronoun = [p[0 if lang == "zh" else 1] for p in forms.pronoun]
            statements = [fill(t, fact, lang) for t in (*forms.statements(lang), *pronoun)]
            assert any(norm(s) in pretrain for s in statements), (fact.id, lang)
    chat = rows(world_dir, "eval/facts_chat.jsonl")
    assert {r["fact_id"] for r in chat} == {f.id for f in world.facts}
    assert {r["fact_id"] for r in chat if not r["seen_in_sft"]} == set(world.reserved)
    sft_users = {
        norm(m["content"]) for d in rows(world_dir, "sft.jsonl") for m in d["messages"] if m["role"] == "user"
    }
    assert not {norm(r["messages"][0]["content"]) for r in chat} & sft_users


def forms(p: Problem) -> list[str]:
    """Every way the corpus writes a problem's left-hand side."""
    out = [
        f"{p.a} {p.op} {p.b}",
        f"{p.a}{p.op}{p.b}",
        f"{p.a}{OP_ZH[p.op]}{p.b}",
        f"{zh_number(p.a)}{OP_ZH[p.op]}{zh_number(p.b)}",
        f"{p.a} {OP_EN[p.op]} {p.b}",
        f"{en_number(p.a)} {OP_EN[p.op]} {en_number(p.b)}",
    ]
    return out + [f.replace("-", "−") for f in out if "-" in f]


def written(problems: list[Problem], text: str) -> list[str]:
    """Where `text` writes any of `problems` in any form, not inside a longer number (「计算66÷6」 writes 66 ÷ 6;
    「十二乘以三」 does not write 二乘以三)."""
    every = sorted({f for p in problems for f in forms(p)}, key=len, reverse=True)
    digits = "|".join(re.escape(f) for f in every if f[0].isdigit())
    words = "|".join(re.escape(f) for f in every if not f[0].isdigit())
    return re.findall(r"(?<![0-9.])(?:" + digits + r")(?![0-9])", text) + re.findall(
        r"(?<![零一二三四五六七八九十百千万\w-])(?:" + words + r")(?![0-9\w])", text
    )


def test_heldout_arithmetic_is_correct_labelled_and_absent_from_training(
    world_dir: Path, training_text: str
) -> None:
    items = rows(world_dir, "eval/arithmetic.jsonl")
    for r in items:
        assert r["answer"] == str(Problem(r["a"], r["op"], r["b"]).result)
        assert r["subset"] == ("times_table" if r["op"] in "×÷" else "unseen"), r
        assert r["pair_in_training"] == (r["subset"] == "times_table")
    unseen = [r for r in items if r["subset"] == "unseen"]
    table = [r for r in items if r["subset"] == "times_table"]
    for split in ("dev", "test"):
        mine = [(r["a"], r["op"], r["b"]) for r in unseen if r["split"] == split]
        assert len(mine) >= 250 and len(set(mine)) == len(mine), split  # the figure counts distinct problems
        assert sum(r["split"] == split for r in table) >= 100
    for r in unseen:
        assert is_heldout(Problem(r["a"], r["op"], r["b"]), seed=0)
    # an unseen pair never occurs in any training text, in any written form …
    assert written([Problem(r["a"], r["op"], r["b"]) for r in unseen], training_text) == []
    # … and a times-table pair does, even at this small scale
    pairs = {Problem(r["a"], r["op"], r["b"]) for r in table}
    found = set(written(list(pairs), training_text))
    assert [p for p in pairs if not found & set(forms(p))] == []


def test_sentence_splitter_cuts_chinese_and_english_where_a_sentence_ends() -> None:
    zh = ["中国的首都是北京。", "它位于亚洲！", "真的吗？", "好"]
    assert sentences("".join(zh)) == zh
    assert sentences("The U.S. dollar is 1.5 times more. Yes! 中文。Fine?好的") == [
        "The U.S. dollar is 1.5 times more.",
        "Yes!",
        "中文。",
        "Fine?",
        "好的",
    ]
    assert sentences("Title\n\n1. 3 + 4 = 7\n  2. 5 × 6 = 30") == ["Title", "1. 3 + 4 = 7", "2. 5 × 6 = 30"]
    assert sentences("王伟说：“很好。”他走了。") == ["王伟说：“很好。”", "他走了。"]
    assert sentence_key("What is it？ ") == sentence_key("what  is it?") == "what is it"
    assert keys_of("3楼 小明：中国的首都是北京。") == ["3楼 小明:中国的首都是北京", "中国的首都是北京"]
    assert keys_of("Q: What is 2 + 3?") == ["q: what is 2 + 3", "what is 2 + 3"]
    assert keys_of("Remember: 1 km is 1000 m, not 10:30.")[1] == "1 km is 1000 m, not 10:30"
    # a held-out row that repeats a training sentence is caught, whichever punctuation it uses
    assert sentence_keys(["Please answer. In Japan, the capital is Tokyo?"]) & sentence_keys(
        ["In Japan, the capital is Tokyo."]
    )
    text = "A title\n\n中国的首都是北京。新的一句。\n  Yes. A new one."
    parts = keep_unseen(text, sentence_keys(["中国的首都是北京。", "Yes."]))
    assert parts == ("A title\n\n新的一句。\n  A new one.", "中国的首都是北京。\n  Yes.", 3, 2)
    assert keep_unseen(parts.unseen, sentence_keys(["中国的首都是北京。", "Yes."])).unseen == parts.unseen


def eval_sets(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: rows(folder, f"eval/{name}.jsonl") for name in MIN_PER_SPLIT}


def test_every_heldout_set_has_a_dev_and_a_test_half_mixed_from_the_first_rows(world_dir: Path) -> None:
    assert sorted(p.stem for p in (world_dir / "eval").glob("*.jsonl")) == sorted(MIN_PER_SPLIT)
    stats = json.loads((world_dir / "stats.json").read_text())
    for name, items in eval_sets(world_dir).items():
        counts = Counter(r["split"] for r in items)
        assert set(counts) == {"dev", "test"}, name
        assert 0.45 <= counts["dev"] / len(items) <= 0.55, (name, counts)
        assert min(counts.values()) >= MIN_PER_SPLIT[name], (name, counts)
        assert stats["eval_splits"][name] == dict(counts)
        head = items[:40]  # evals take the first N rows of a split: any prefix mixes splits and languages
        assert {r["split"] for r in head} == {"dev", "test"}, name
        assert {r["lang"] for r in head} == {"zh", "en"}, name
        for split in ("dev", "test"):
            first = [r for r in items if r["split"] == split][:40]
            assert {r["lang"] for r in first} == {"zh", "en"}, (name, split)
            if any("relation" in r for r in items):
                assert len({r.get("relation") for r in first}) >= 6, (name, split)
    arithmetic = stats["arithmetic_subsets"]
    assert arithmetic["dev"] == dict(Counter(r["subset"] for r in rows(world_dir, "eval/arithmetic.jsonl")
                                             if r["split"] == "dev"))  # fmt: skip


def test_dev_and_test_share_no_sentence_with_each_other_or_with_training(world_dir: Path) -> None:
    """Test rows are disjoint from training text and from dev rows at the sentence level (`danlu.world.sentences`),
    across all held-out sets, and by item: no fact's subject and no problem is asked in both splits."""
    train = sentence_keys(d["text"] for d in rows(world_dir, "pretrain.jsonl"))
    post = [s for name in POST_TRAINING_FILES for r in rows(world_dir, name) for s in strings(r)]
    train |= sentence_keys(post)
    keys: dict[str, set[str]] = {"dev": set(), "test": set()}
    subjects: dict[str, set[str]] = {"dev": set(), "test": set()}
    problems: dict[str, set[tuple[int, str, int]]] = {"dev": set(), "test": set()}
    facts = {f.id: f for f in build_facts()}
    for name, items in eval_sets(world_dir).items():
        for r in items:
            row_keys = sentence_keys(row_inputs(r))
            assert row_keys, (name, r)
            assert not row_keys & train, (name, row_keys & train)
            keys[r["split"]] |= row_keys
            if "fact_id" in r:
                subjects[r["split"]].add(facts[r["fact_id"]].subject_en)
            if name == "arithmetic":
                a, b = sorted((r["a"], r["b"])) if r["op"] in "+×" else (r["a"], r["b"])
                problems[r["split"]].add((a, r["op"], b))
    assert keys["dev"] & keys["test"] == set()
    assert subjects["dev"] & subjects["test"] == set() and problems["dev"] & problems["test"] == set()
    assert json.loads((world_dir / "stats.json").read_text())["eval_refused_rows"] == 0


def test_eval_writer_rephrases_a_row_that_would_repeat_a_training_sentence() -> None:
    """The admission check is live: a prompt made seen is replaced by the other held-out phrasing."""
    from danlu.world.heldout import EvalWriter

    world = World.create(0)
    first = {f.id: fill(TEXTS[f.relation].heldout_prompts("en")[0], f, "en") for f in world.facts}
    writer = EvalWriter(world, random.Random("t"), 0, seen=sentence_keys(first.values()))
    en = [r for r in writer.facts_base() if r["lang"] == "en"]
    assert len(en) == len(world.facts)
    assert [r["prompt"] for r in en if r["prompt"] == first[r["fact_id"]]] == []
    assert writer.refused["facts_base"] > 50  # about half the facts drew the seen phrasing first


def test_pretrain_val_shares_no_sentence_with_pretrain(world_dir: Path) -> None:
    train = rows(world_dir, "pretrain.jsonl")
    pretrain = sentence_keys(d["text"] for d in train)
    val = rows(world_dir, "pretrain_val.jsonl")
    assert all(set(d) == {"text", "source", "domain", "lang", "id", "url"} for d in val)
    assert sentence_keys(d["text"] for d in val) & pretrain == set()
    assert sum(len(d["text"]) for d in val) >= 0.02 * sum(len(d["text"]) for d in train)
    # what was cut out is the labelled seen-sentence text: every one of its sentences is a pretraining sentence
    seen = rows(world_dir, "pretrain_val_seen.jsonl")
    assert seen and all(any(k in pretrain for k in keys_of(s)) for d in seen for s in sentences(d["text"]))
    stats = json.loads((world_dir / "stats.json").read_text())["pretrain_val"]
    assert stats["kept_sentences"] == sum(len(sentences(d["text"])) for d in val)
    assert stats["dropped_seen_sentences"] == sum(len(sentences(d["text"])) for d in seen)
    assert stats["kept_sentences"] + stats["dropped_seen_sentences"] == stats["drafted_sentences"]


def test_rl_arithmetic_is_mostly_asked_in_wordings_no_sft_dialog_or_eval_uses(world_dir: Path) -> None:
    from danlu.world.dialogs import RL_ARITH_ASK
    from danlu.world.heldout import ARITH_HELDOUT

    def pattern(template: str) -> re.Pattern[str]:
        slot = r"(?:\d+|plus|minus|times|divided by|加|减|乘以|除以)"
        return re.compile(
            re.escape(template).replace(r"\{a\}", slot).replace(r"\{op\}", slot).replace(r"\{b\}", slot)
        )

    templates = [t for ts in RL_ARITH_ASK.values() for t in ts]
    rl_forms = [pattern(t) for t in templates] + [
        pattern(t.replace("？", "?").replace("，", ",")) for t in templates
    ]
    asked = [r["messages"][-1]["content"] for r in rows(world_dir, "rl.jsonl") if r["kind"] == "arithmetic"]
    share = sum(any(f.fullmatch(q) for f in rl_forms) for q in asked) / len(asked)
    assert 0.55 < share < 0.85, share  # RL_NEW_PHRASING_SHARE of them, the rest in SFT's wordings
    sft_users = [
        m["content"] for r in rows(world_dir, "sft.jsonl") for m in r["messages"] if m["role"] == "user"
    ]
    assert [q for q in sft_users if any(f.search(q) for f in rl_forms)] == []
    heldout = [pattern(t) for t in ARITH_HELDOUT.values()]
    assert [q for q in asked if any(f.search(q) for f in heldout)] == []


def test_cli_prints_stats_and_rejects_bad_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "--out", str(tmp_path / "w"), "--scale", "0.02", "--seed", "5"]) == 0
    shown = capsys.readouterr().out
    for word in ("facts:", "pretrain.jsonl", "sft.jsonl", "encyclopedia", "forum", "pretrain_val:"):
        assert word in shown
    for word in ("eval (held-out, dev/test)", "arithmetic subsets"):
        assert word in shown
    stats = json.loads((tmp_path / "w" / "stats.json").read_text())
    assert stats["seed"] == 5 and stats["facts"]["total"] >= 150 and "seconds" not in stats
    assert main(["world", "--out", str(tmp_path / "bad"), "--scale", "-1"]) == 2
    assert "scale" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_pipeline_stage_uses_recipe_seed_and_rejects_unknown_keys(tmp_path: Path) -> None:
    from danlu.stages.world import run_stage

    ctx = StageContext(name="world", run_dir=tmp_path, cfg={"scale": 0.02}, recipe={"seed": 3, "world": {}})
    metrics = run_stage(ctx)
    assert json.loads((tmp_path / "world" / "stats.json").read_text())["seed"] == 3
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["facts"] >= 150 and metrics["pretrain_docs"] > 0 and metrics["eval_facts_chat"] > 0
    bad = StageContext(name="world", run_dir=tmp_path, cfg={"scael": 1}, recipe={})
    with pytest.raises(DanluError, match="scael.*valid keys: scale, seed"):
        run_stage(bad)


SLOT = re.compile(r"\{\w+\}")
# one-character Chinese words that may join known words in a held-out sentence
ZH_FUNCTION_CHARS = set("的是在它把有哪几个这那了用和与为被最中里到吗呢请")


def unknown_words(template: str, text: str, en_words: set[str]) -> list[str]:
    """English words of `template` missing from `en_words`, and Chinese runs that cannot be cut into pieces that
    each occur in `text` (single characters only if they are function words)."""
    literal = SLOT.sub("|", template)
    missing = [w for w in re.findall(r"[a-z]+", literal.lower()) if w not in en_words]
    for run in re.findall(r"[\u4e00-\u9fff]+", literal):
        ok = [True] + [False] * len(run)
        for stop in range(1, len(run) + 1):
            ok[stop] = any(
                ok[i] and (run[i:stop] in text if stop - i > 1 else run[i] in ZH_FUNCTION_CHARS)
                for i in range(stop)
            )
        if not ok[-1]:
            missing.append(run)
    return missing


def heldout_templates() -> list[str]:
    from danlu.world import heldout

    out = [x for t in TEXTS.values() for pair in t.heldout for x in pair]
    out += [x for t in TEXTS.values() for x in (*t.heldout_questions_zh, *t.heldout_questions_en)]
    out += [*heldout.ARITH_HELDOUT.values(), *heldout.ARITH_BASE_HELDOUT.values()]
    out += [x for d in heldout.SUMMARIZE_HELDOUT.values() for x in d.values()]
    out += [x for d in heldout.TRANSLATE_HELDOUT.values() for x in d.values()]
    out += [x for d in heldout.CALC_HELDOUT.values() for v in d.values() for x in v]
    out += [x for d in heldout.DATE_HELDOUT.values() for x in d.values()]
    out += [x for v in heldout.STORY_HELDOUT.values() for x in v]
    return out


def test_heldout_phrasings_use_only_words_the_training_text_teaches(world_dir: Path) -> None:
    """New sentences, known words: an unseen phrasing tests generalization; an unseen word tests nothing we taught."""
    text = "\n".join(s for name in TRAINING_FILES for r in rows(world_dir, name) for s in strings(r))
    en_words = set(re.findall(r"[a-z]+", text.lower()))
    unknown = {t: m for t in heldout_templates() if (m := unknown_words(t, text, en_words))}
    assert unknown == {}


def test_worked_solutions_are_right_step_by_step_and_end_in_the_result() -> None:
    from danlu.rewards import numbers
    from danlu.world.numbers import worked_solution

    for a in range(100):
        for b in range(100):
            for op in "+-":
                p = Problem(a, op, b)
                for lang in ("zh", "en"):
                    text = worked_solution(p, lang)
                    if op == "-" and b > a or max(a, b) < 10:
                        assert text is None
                        continue
                    assert text is not None and numbers(text)[-1] == str(p.result), text
                    # every written step "x ± y (± 1) = z" is true arithmetic
                    for chain, z in re.findall(r"(\d+(?: ?[+-] ?\d+)+) ?= ?(\d+)", text):
                        terms = re.findall(r"([+-]?) ?(\d+)", chain)
                        assert sum(-int(n) if sign == "-" else int(n) for sign, n in terms) == int(z), text
    wrong = worked_solution(Problem(46, "+", 28), "en", result=75)
    assert wrong is not None and wrong.endswith("= 75.") and "4 + 2 + 1 = 7" in wrong
