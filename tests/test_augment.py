"""`data.augment:` steps (back-translation, paraphrase, recombination) and the synth data statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from danlu import DanluError
from danlu.data.augment import AugmentStep, check_rewrite, opening_exchange, run_augment, run_step
from danlu.data.pipeline import parse_config, run_data
from danlu.synth.stats import distinct_n, duplicate_rate, language_mix, run_yield
from danlu.synth.teacher import Reply, Sampling

ZH_EN = {
    "中国最高的山是什么？": "What is the highest mountain in China?",
    "日本的首都是哪里？": "Where is the capital of Japan?",
    "12加34等于多少？": "What is 12 plus 34?",
}
EN_ZH = {
    "What is the highest mountain in China?": "中国的最高峰是哪座山？",
    "Where is the capital of Japan?": "日本首都在什么地方？",
    "What is 12 plus 34?": "12和34相加是多少？",
    "What is 12 and 34 together?": "12和34一共是多少？",
}
EN_BACK = {  # en→zh→en: the Chinese pivots back into English
    "How many moons does Mars have? It has 2.": "火星有几颗卫星？它有2颗。",
    "火星有几颗卫星？它有2颗。": "How many natural satellites does Mars have? There are 2.",
}


class DictTranslator:
    """A translation model with a fixed vocabulary of sentences: every request is answered by lookup, so each
    output can be traced to its input (and an unknown sentence gets an empty answer, as a weak model might)."""

    name = "dict-translator"

    def __init__(self, table: dict[str, str] | None = None, drop_numbers: bool = False) -> None:
        self.table = table if table is not None else {**ZH_EN, **EN_ZH, **EN_BACK}
        self.drop_numbers = drop_numbers
        self.requests: list[str] = []

    def chat(self, conversations: list[list[dict[str, Any]]], sampling: Sampling) -> list[Reply]:
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            text = prompt.split("：", 1)[-1] if "：" in prompt else prompt.split(": ", 1)[-1]
            self.requests.append(text)
            ans = self.table.get(text, "")
            if self.drop_numbers and ans.startswith("What is 12"):
                ans = "What is twelve plus thirty-four?"
            out.append(Reply(ans, "stop"))
        return out

    def complete(self, prompts: list[str], sampling: Sampling) -> list[Reply]:
        raise AssertionError("augmentation asks in chat form")

    def chat_template_prefix(self, system: str | None = None) -> str | None:
        return None


def u(t: str) -> dict[str, str]:
    return {"role": "user", "content": t}


def a(t: str) -> dict[str, str]:
    return {"role": "assistant", "content": t}


ZH_ROWS = [
    {
        "id": "d1",
        "messages": [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            u("中国最高的山是什么？"),
            a("珠穆朗玛峰。"),
            u("12加34等于多少？"),
            a("46"),
        ],
    },  # fmt: skip
    {"id": "d2", "messages": [u("日本的首都是哪里？"), a("东京。")]},
    {"id": "d3", "messages": [u("法国的首都是哪里？"), a("巴黎。")]},  # the translator does not know it
    {"id": "d4", "messages": [u("What is the highest mountain in China?"), a("Mount Everest.")]},  # English
]


def teacher_for(t: DictTranslator):
    return lambda step: t


def test_back_translation_keeps_turns_aligned_with_their_sources():
    t = DictTranslator()
    step = AugmentStep(type="back_translation", teacher="x", batch_size=2)  # batches cut across dialogs
    new, stats = run_step([dict(r) for r in ZH_ROWS], step, teacher_for(t))
    by_src = {r["meta"]["source_id"]: r for r in new}
    assert set(by_src) == {"d1", "d2"}  # d3: untranslatable, d4: English (not a zh-en-zh source)
    src = {r["id"]: r for r in ZH_ROWS}
    for sid, row in by_src.items():
        orig = src[sid]["messages"]
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in orig]
        for j, (m, o) in enumerate(zip(row["messages"], orig)):
            if o["role"] == "user":  # turn j is the round trip of source turn j, through its own pivot
                pivot = ZH_EN[o["content"]]
                assert row["meta"]["pivot"][str(j)] == pivot
                assert m["content"] == EN_ZH[pivot]
            else:
                assert m["content"] == o["content"]  # answers stay as written
        assert row["meta"]["changed_turns"] == [j for j, o in enumerate(orig) if o["role"] == "user"]
        assert row["lang"] == "zh" and row["source"] == "augment:back_translation_zh_en_zh"
    assert stats.eligible == 3 and stats.dialogs_out == 2
    assert stats.turns_tried == 4 and stats.turns_changed == 3
    assert dict(stats.rejected) == {"pivot_empty": 1}
    assert stats.requests == 4 + 3  # there for every turn, back for those whose pivot passed


def test_back_translation_en_zh_en_and_a_dropped_number_is_refused():
    rows = [
        {
            "id": "e1",
            "messages": [u("How many moons does Mars have? It has 2."), a("Two: Phobos and Deimos.")],
        }
    ]
    new, stats = run_step(rows, AugmentStep(type="back_translation", teacher="x", direction="en-zh-en"),
                          teacher_for(DictTranslator()))  # fmt: skip
    assert new[0]["messages"][0]["content"] == "How many natural satellites does Mars have? There are 2."
    assert new[0]["meta"]["pivot"] == {"0": "火星有几颗卫星？它有2颗。"}
    # a translator that writes 12 and 34 as words changed the question: the turn keeps its source text
    d1 = [dict(ZH_ROWS[0])]
    new, stats = run_step(
        d1, AugmentStep(type="back_translation", teacher="x"), teacher_for(DictTranslator(drop_numbers=True))
    )
    assert stats.rejected["pivot_numbers"] == 1 and stats.turns_changed == 1
    assert new[0]["messages"][3]["content"] == "12加34等于多少？"
    assert new[0]["meta"]["changed_turns"] == [1]


def test_rewrite_checks():
    step = AugmentStep(type="paraphrase", teacher="x")
    src = "中国最高的山是什么？"
    assert check_rewrite(src, "中国的最高峰是哪座山？", "stop", "zh", step) is None
    assert check_rewrite(src, "", "stop", "zh", step) == "empty"
    assert check_rewrite(src, "中国的最高峰是", "length", "zh", step) == "cut_off"
    assert check_rewrite(src, "What is the highest mountain?", "stop", "zh", step) == "language"
    assert check_rewrite(src, src, "stop", "zh", step) == "unchanged"
    assert check_rewrite(src, "今天天气很好吗？", "stop", "zh", step) == "unrelated"
    assert (
        check_rewrite(
            src, "中国最高的山是什么？请详细地说一说它有多高以及它在哪里并且为什么", "stop", "zh", step
        )
        == "length_ratio"
    )
    assert check_rewrite("12加34等于多少？", "12加35等于多少？", "stop", "zh", step) == "numbers"


def test_paraphrase_by_language():
    table = {
        "日本的首都是哪里？": "日本首都在什么地方？",
        "What is 12 and 34 together?": "How much is 12 plus 34?",
    }
    rows = [{"id": "z", "messages": [u("日本的首都是哪里？"), a("东京。")]},
            {"id": "e", "messages": [u("What is 12 and 34 together?"), a("46")]}]  # fmt: skip
    t = DictTranslator(table)
    new, stats = run_step(rows, AugmentStep(type="paraphrase", teacher="x"), teacher_for(t))
    assert {r["meta"]["source_id"]: r["messages"][0]["content"] for r in new} == {
        "z": "日本首都在什么地方？", "e": "How much is 12 plus 34?"}  # fmt: skip
    assert {r["lang"] for r in new} == {"zh", "en"} and stats.turns_changed == 2


def test_recombination_keeps_roles_alternating_and_only_compatible_turns():
    sys_a = {"role": "system", "content": "Be brief."}
    rows = [{"id": f"en{i}", "messages": [u(f"Question number {i} about rivers?"), a(f"Answer {i}."),
                                          u("And what about it?"), a("It is long.")]} for i in range(5)]  # fmt: skip
    rows += [
        {"id": f"zh{i}", "messages": [u(f"第{i}个关于山的问题是什么？"), a(f"第{i}个回答。")]}
        for i in range(4)
    ]
    rows += [
        {"id": f"sys{i}", "messages": [sys_a, u(f"Short question {i} please?"), a(f"Short answer {i}.")]}
        for i in range(3)
    ]
    rows += [{"id": "lonely", "messages": [u("これは相手のいない日本語の質問ですか？"), a("はい。")]},
             {"id": "bad", "messages": [a("An assistant opening."), u("Then a user.")]}]  # fmt: skip
    src = {r["id"]: r for r in rows}
    new, stats = run_step(
        rows, AugmentStep(type="recombine", max_rows=12, max_turns=3, seed=1), teacher_for(DictTranslator())
    )
    assert len(new) == 12 and stats.dialogs_out == 12
    combos = set()
    for r in new:
        msgs = r["messages"]
        body = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0
        ids = r["meta"]["source_ids"]
        assert 2 <= len(ids) <= 3 and len(set(ids)) == len(ids)  # distinct threads
        combos.add(tuple(sorted(ids)))
        for k, sid in enumerate(ids):
            system, opening = opening_exchange(src[sid]["messages"])
            assert body[2 * k : 2 * k + 2] == opening  # only opening exchanges move
            assert (msgs[0] if msgs[0]["role"] == "system" else None) == (sys_a if system else None)
        assert len({sid.rstrip("0123456789") for sid in ids}) == 1  # same language and system prompt
    assert len(combos) == 12  # no combination twice
    assert stats.turns_tried == 13  # opening exchanges: 5 en, 4 zh, 3 with a system prompt, 1 ja
    assert stats.rejected["no_opening_exchange"] == 1 and stats.rejected["no_compatible_partner"] == 1


def test_bad_augment_config():
    with pytest.raises(DanluError, match="needs `teacher:`"):
        parse_config({"inputs": [], "augment": [{"type": "back_translation"}]})
    with pytest.raises(DanluError, match="augment"):
        parse_config({"inputs": [], "augment": [{"type": "shuffle"}]})
    with pytest.raises(DanluError, match="fraction"):
        parse_config({"inputs": [], "augment": [{"type": "recombine", "fraction": 0}]})
    with pytest.raises(DanluError, match="two steps named"):
        parse_config({"inputs": [], "augment": [{"type": "recombine"}, {"type": "recombine"}]})
    with pytest.raises(DanluError, match=r"\{x\}"):
        parse_config(
            {"inputs": [], "augment": [{"type": "paraphrase", "teacher": "t", "prompts": {"zh": "改写"}}]}
        )


def test_local_checkpoint_teacher_counts_every_turn(tiny_checkpoint, tmp_path):
    """A real (random-weight) chat checkpoint in process: whatever it writes, each turn is kept or refused once."""
    (tmp_path / "dialogs").mkdir()
    with open(tmp_path / "dialogs" / "00000.jsonl", "w", encoding="utf-8") as f:
        for r in ZH_ROWS:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    steps = [AugmentStep(type="back_translation", teacher=str(tiny_checkpoint), max_tokens=8),
             AugmentStep(type="paraphrase", teacher=str(tiny_checkpoint), max_tokens=8)]  # fmt: skip
    report = run_augment(steps, tmp_path / "dialogs", progress=False)
    for s in report:
        assert s["teacher"] == str(tiny_checkpoint)
        assert s["turns_tried"] == s["turns_changed"] + sum(s["rejected"].values()) > 0
    assert (tmp_path / "dialogs" / "augment_paraphrase.jsonl").exists()


def test_pipeline_augment_steps_in_stats_and_sft_format(tmp_path, monkeypatch):
    import danlu.synth.teacher as teacher_mod
    from danlu.data.formats import read_conversations

    t = DictTranslator()
    monkeypatch.setattr(teacher_mod, "open_teacher", lambda spec, **kw: t)
    rows = [dict(r) for r in ZH_ROWS[:3]]
    rows += [{"id": f"q{i}", "messages": [u(f"第{i}个问题：长江流经哪些省份和城市？"), a(f"长江流经很多地方，这是第{i}个回答。")]}
             for i in range(6)]  # fmt: skip
    path = tmp_path / "in" / "dialogs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {"inputs": [{"path": str(path), "type": "jsonl", "domain": "qa", "lang": "zh"}],
           "filters": {"length": {"min_chars": 1}, "chinese": {"enabled": False}},
           "dedup": {"minhash": False},
           "augment": [{"type": "back_translation", "teacher": "http://127.0.0.1:1"},
                       {"type": "recombine", "max_rows": 4}]}  # fmt: skip
    out = tmp_path / "out"
    stats = run_data(cfg, out)
    assert stats["dialogs"] == 9
    steps = {s["step"]: s for s in stats["augment"]}
    assert steps["back_translation_zh_en_zh"]["dialogs_out"] == 2 and steps["recombine"]["dialogs_out"] == 4
    assert stats["dialogs_augmented"] == 6
    md = (out / "stats.md").read_text(encoding="utf-8")
    assert "## Augmentation" in md and "| recombine | recombine | 9 | 9 | 4 |" in md
    assert "augmented conversations for SFT: 6" in md
    assert json.loads((out / "stats.json").read_text())["dialogs_augmented"] == 6
    convs = read_conversations(sorted((out / "dialogs").glob("*.jsonl")))  # what `danlu sft --data` reads
    assert len(convs) == 9 + 6
    # a rerun with the recombine step removed leaves no stale file behind
    cfg["augment"] = cfg["augment"][:1]
    run_data(cfg, out)
    assert not (out / "dialogs" / "augment_recombine.jsonl").exists()


# ───────────────────────── synth statistics ─────────────────────────


def test_distinct_n_duplicates_and_language_mix():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["a b", "b a"], 2) == pytest.approx(1.0)  # n-grams never cross texts
    assert distinct_n(["山山水"], 1) == pytest.approx(2 / 3)  # Chinese by characters
    assert distinct_n(["山"], 2) == 0.0 and distinct_n([], 1) == 0.0
    assert duplicate_rate(["A b", "a  B", "c"]) == pytest.approx(1 / 3)
    mix = language_mix(["中文的句子", "An English sentence here", "另一个中文句子"])
    assert mix == {"zh": pytest.approx(0.6667), "en": pytest.approx(0.3333)}


def test_run_yield_from_a_synth_journal(tmp_path: Path):
    from danlu.synth.store import SynthStore

    store = SynthStore(tmp_path / "s.jsonl", {"x": 1})
    row = {"messages": [u("q"), a("r")], "meta": {}}
    store.commit(0, [dict(row, meta={})], [dict(row, meta={"failed": "rouge_l"})])
    store.commit(
        1, [dict(row, meta={})], [dict(row, meta={"failed": "length"}), dict(row, meta={"failed": "rouge_l"})]
    )
    y = run_yield(tmp_path / "s.jsonl")
    assert y == {"generated": 5, "kept": 2, "kept_ratio": 0.4, "rejected": {"rouge_l": 2, "length": 1}}
