"""Preference and RL-prompt readers in every supported format, the checking rewards, and bad input."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.data.preference import read_pairs, read_rl_prompts
from danlu.rewards import compute_rewards, get_reward_fn


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_all_preference_formats_read_as_messages(tmp_path: Path) -> None:
    rows = [
        {"prompt": "1+1?", "chosen": "2", "rejected": "3"},
        {"prompt": [{"role": "user", "content": "1+1?"}], "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]},
        {"conversations": [{"from": "human", "value": "1+1?"}], "chosen": {"from": "gpt", "value": "2"},
         "rejected": {"from": "gpt", "value": "3"}},
        {"instruction": "1+1?", "input": "", "chosen": "2", "rejected": "3"},
        {"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"},
        {"chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
         "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}]},
    ]  # fmt: skip
    pairs = read_pairs(_write(tmp_path / "p.jsonl", rows))
    assert len(pairs) == 6
    for p in pairs:
        assert p.prompt == [{"role": "user", "content": "1+1?"}]
        assert p.chosen == [{"role": "assistant", "content": "2"}]
        assert p.rejected == [{"role": "assistant", "content": "3"}]


def test_hh_rlhf_multi_turn_prompt(tmp_path: Path) -> None:
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: capital of France?\n\nAssistant: "
    pairs = read_pairs(_write(tmp_path / "hh.jsonl", [{"chosen": base + "Paris", "rejected": base + "Rome"}]))
    assert [m["role"] for m in pairs[0].prompt] == ["user", "assistant", "user"]
    assert pairs[0].chosen[0]["content"] == "Paris"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "  ", "rejected": "no"}, "empty completion"),
        ({"prompt": "q", "chosen": "a"}, "needs `chosen` and `rejected`"),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(DanluError, match=message) as e:
        read_pairs(path)
    assert f"{path}:3" in str(e.value)


def test_rl_prompts_and_gsm8k(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "2+3?"}], "answer": "5"},
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    ]
    prompts = read_rl_prompts(_write(tmp_path / "rl.jsonl", rows))
    assert prompts[0].answers == ["5"] and prompts[0].reward is None
    assert prompts[1].answers == ["7"] and prompts[1].reward == "gsm8k"
    with pytest.raises(DanluError, match=r"rl2.jsonl:1: an RL prompt needs an `answer`"):
        read_rl_prompts(_write(tmp_path / "rl2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))


def test_rl_prompt_steps_are_read_and_checked(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "46+28?"}], "answer": "74", "steps": ["6+8=14", "4+2+1=7"]}
    ]
    assert read_rl_prompts(_write(tmp_path / "rl.jsonl", rows))[0].steps == ["6+8=14", "4+2+1=7"]
    bad = [{**rows[0], "steps": "6+8=14"}]
    with pytest.raises(DanluError, match=r"bad.jsonl:1: `steps` must be a list of strings"):
        read_rl_prompts(_write(tmp_path / "bad.jsonl", bad))


def test_step_credit_counts_right_steps_whole_numbers_only() -> None:
    from danlu.rewards import step_credit

    steps = ["6+8=14", "4+2+1=7"]
    assert (
        step_credit("Ones: 6 + 8 = 14, write 4, carry 1. Tens: 4 + 2 + 1 = 7. So 46 + 28 = 74.", steps) == 1.0
    )
    assert step_credit("个位：6+8=14，写4进1；十位：4+2=6；所以46+28=64。", steps) == 0.5
    assert step_credit("16+8=145", ["6+8=14"]) == 0.0  # not inside longer numbers
    assert step_credit("anything", []) == 0.0


def test_step_marks_judge_the_kth_written_equation_against_the_kth_step() -> None:
    from danlu.rewards import step_marks

    text = "Ones: 9 - 8 = 0. Tens: 7 - 4 = 3. So 79 - 48 = 30."
    assert step_marks(text, ["9-8=1", "7-4=3"]) == [
        (15, 0.0),
        (32, 1.0),
    ]  # the final equation is the answer's
    assert text[:15].endswith("= 0") and text[:32].endswith("= 3")
    zh = "个位：14-6=8；十位：5-1-2=2；所以54-26=28。"
    assert step_marks(zh, ["14-6=8", "5-1-2=2"]) == [(zh.index("；"), 1.0), (zh.index("；所以"), 1.0)]
    assert step_marks("The answer is 12.", ["5+0=5", "1+4=5"]) == [(17, 0.0), (17, 0.0)]  # never written
    assert step_marks("16+8=24", ["6+8=14"]) == [(7, 0.0)]  # a misread operand is a wrong step


def test_checking_rewards() -> None:
    world = get_reward_fn("world")
    assert world("89加17等于106。", ["106"]) == 1.0
    assert world("89 + 17 = 105", ["106"]) == 0.0
    assert world("The capital of France is Paris.", ["Paris"]) == 1.0
    assert get_reward_fn("gsm8k")("so 3+4=7\n#### 7", ["7"]) == 1.0
    assert get_reward_fn("gsm8k")("#### 1,200", ["1200"]) == 1.0
    assert get_reward_fn("exact")(" Paris. ", ["paris"]) == 1.0
    with pytest.raises(DanluError, match="unknown reward function"):
        get_reward_fn("nope")


def test_reward_function_that_raises_or_returns_nan_stops() -> None:
    def broken(text: str, answers: list[str]) -> float:
        raise ValueError("boom")

    with pytest.raises(DanluError, match="raised ValueError: boom.*rl.jsonl:4"):
        compute_rewards([broken], ["x"], [["1"]], ["rl.jsonl:4"], ["broken"])
    with pytest.raises(DanluError, match="returned nan"):
        compute_rewards([lambda t, a: math.nan], ["x"], [["1"]], ["rl.jsonl:1"], ["nanfn"])


def test_world_rl_prompts_need_tools_in_stated_shares_and_wordings_of_their_own() -> None:
    """RL trains tool use too (issue 24): prompts that need get_date or the calculator, in the RL_MIX shares, asked
    in wordings no SFT dialog and no held-out set uses, with answers the tools give."""
    import datetime as dt

    from danlu.tools import format_date, run_tool
    from danlu.world.build import RL_MIX, rl_prompts, sft_dialogs
    from danlu.world.dialogs import RL_CALC_ASK, RL_DATE_ASK
    from danlu.world.heldout import EvalWriter
    from danlu.world.index import World

    world = World.create(0)
    rl = rl_prompts(world, 0, 0.5)
    for kind, share in RL_MIX.items():
        assert abs(sum(r["kind"] == kind for r in rl) / len(rl) - share) < 0.01, kind
    tools = [r for r in rl if r.get("tool")]
    assert {r["kind"] for r in tools} == {"calculator", "date"} and all(
        (r["tool"] == "calculator") == (r["kind"] == "calculator") for r in tools
    )
    for r in tools:
        if r["tool"] == "calculator":
            assert r["answers"] == [run_tool("calculator", {"expression": r["expression"]})]
        else:  # the answer is the ISO date or the weekday that get_date returns for the row's `today`
            returned = format_date(dt.date.fromisoformat(r["today"]))
            assert r["answer"] in returned.split() or r["answer"] == returned.split()[-1]
    wordings = [t for ts in RL_CALC_ASK.values() for t in ts] + [t for ts in RL_DATE_ASK.values() for t in ts]
    stems = [t.split("{p}")[0] or t.split("{p}")[-1] for t in wordings]
    asked = [r["messages"][-1]["content"] for r in tools]
    assert sum(any(s.rstrip("？?。.") in q for s in stems) for q in asked) == len(asked)
    sft_users = {
        m["content"] for d in sft_dialogs(world, 0, 0.5) for m in d["messages"] if m["role"] == "user"
    }
    heldout = EvalWriter(world, random.Random("0:eval"), 0).all()
    heldout_users = {m["content"] for rows in heldout.values() for r in rows for m in r.get("messages", [])
                     if isinstance(m, dict) and m.get("role") == "user"}  # fmt: skip
    assert not set(asked) & sft_users and not set(asked) & heldout_users
    assert not [s for s in stems if any(s.rstrip("？?。.") in q for q in sft_users | heldout_users)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"tool": "weather"}, "`tool` is 'weather'; expected one of get_date, calculator"),
     ({"tool": "get_date", "today": "5 Dec"}, "`today` is '5 Dec'; expected an ISO date")],
)  # fmt: skip
def test_rl_prompt_with_an_unknown_tool_or_date_names_file_and_line(tmp_path: Path, extra: dict, message: str) -> None:
    path = _write(tmp_path / "rl.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"},
                                          {"messages": [{"role": "user", "content": "today?"}], "answer": "x", **extra}])  # fmt: skip
    with pytest.raises(DanluError, match=rf"rl.jsonl:2: {re.escape(message)}"):
        read_rl_prompts(path)
