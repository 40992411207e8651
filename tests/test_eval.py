"""Evaluation tasks on a tiny random checkpoint: bpb, multiple choice, GSM8K extraction, world sets, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.cli import main
from danlu.io import load_checkpoint

CEVAL = "id,question,A,B,C,D,answer,explanation\n0,中国最高的山是____。,珠穆朗玛峰,泰山,华山,黄山,A,略\n1,日本的首都是____。,大阪,东京,京都,奈良,B,\n"
CMMLU = ",Question,A,B,C,D,Answer\n0,中国最长的河是,黄河,长江,珠江,淮河,B\n1,一加一等于,1,2,3,4,B\n"
MMLU_INDEX = "question,choice0,choice1,choice2,choice3,answer\nThe capital of Japan is,Osaka,Tokyo,Kyoto,Nara,1\n2+2=,3,4,5,6,1\n"
MMLU_ORIGINAL = "The capital of Japan is,Osaka,Tokyo,Kyoto,Nara,B\n2+2=,3,4,5,6,B\n7x8=,54,56,58,60,B\n"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_bpb_on_text_and_jsonl_agree_with_the_pretraining_metric(ckpt, tmp_path: Path) -> None:
    from danlu.eval.bpb import bits_per_byte, evaluate_bpb
    from danlu.stages import pretrain

    assert pretrain.bits_per_byte is bits_per_byte  # one implementation, shared
    text = "中国最高的山是珠穆朗玛峰。The capital of Japan is Tokyo. " * 6
    txt = evaluate_bpb(ckpt.model, ckpt.tokenizer, _write(tmp_path / "a.txt", text), seq_len=64)
    jl = evaluate_bpb(
        ckpt.model,
        ckpt.tokenizer,
        _write(tmp_path / "a.jsonl", json.dumps({"text": text}) + "\n"),
        seq_len=64,
    )
    assert txt == jl
    # an untrained model over a ~400-token vocabulary: about log(V) nats per token
    assert 4.0 < txt["loss"] < 8.0 and txt["perplexity"] == pytest.approx(math.exp(txt["loss"]), rel=1e-3)
    assert 0.5 < txt["bpb"] < 10 and txt["n"] > 50


def test_bpb_reads_token_shards(ckpt, tmp_path: Path) -> None:
    from danlu.data.shards import tokenize_corpus
    from danlu.eval.bpb import evaluate_bpb

    ckpt.tokenizer.save(tmp_path / "tok")
    _write(
        tmp_path / "val.jsonl",
        "".join(json.dumps({"text": f"日本的首都是东京。{i}"}) + "\n" for i in range(30)),
    )
    tokenize_corpus(
        {"val": [tmp_path / "val.jsonl"]}, tmp_path / "tok", tmp_path / "shards", workers=1, progress=False
    )
    res = evaluate_bpb(ckpt.model, ckpt.tokenizer, tmp_path / "shards", seq_len=32)
    text = evaluate_bpb(ckpt.model, ckpt.tokenizer, tmp_path / "val.jsonl", seq_len=32)
    # the shards hold the same documents joined the same way: the same tokens scored (the shard reader leaves out
    # the stream's last one), so about the same bits per byte
    assert text["n"] - 1 <= res["n"] <= text["n"] and res["bpb"] == pytest.approx(text["bpb"], rel=0.02)
    lo, hi = res["ci95"]
    assert lo < res["bpb"] < hi and res["rows"] >= 2


@pytest.mark.parametrize("text", [CEVAL, CMMLU, MMLU_INDEX, MMLU_ORIGINAL])
def test_multiple_choice_formats_read_the_same_answers(text: str, tmp_path: Path) -> None:
    from danlu.eval.multiple_choice import read_questions

    subjects = read_questions(_write(tmp_path / "geo_dev.csv", text))
    assert list(subjects) == ["geo"]
    qs = subjects["geo"].questions
    assert len(qs) >= 2 and all(len(q.choices) == 4 for q in qs)
    assert qs[1].answer == 1 and qs[0].where.endswith((":2", ":1"))


def test_multiple_choice_accuracy_per_subject_with_baseline_and_shots(ckpt, tmp_path: Path) -> None:
    from danlu.eval.multiple_choice import build_prompt, evaluate_multiple_choice, read_questions

    _write(tmp_path / "mc" / "geo_dev.csv", CEVAL)
    _write(tmp_path / "mc" / "math_dev.csv", MMLU_INDEX)
    res = evaluate_multiple_choice(ckpt.model, ckpt.tokenizer, tmp_path / "mc", shots=1)
    assert set(res["subjects"]) == {"geo", "math"} and res["n"] == 4
    assert res["random"] == 0.25
    assert res["accuracy"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in res["subjects"].values()) / 4)
    q0, q1 = read_questions(tmp_path / "mc" / "geo_dev.csv")["geo"].questions
    prompt = build_prompt(q0, [q1])
    assert "东京" in prompt and prompt.endswith("答案：")
    assert re.search(r"答案：\s?B\n", prompt)  # the shot carries its answer


def test_loglikelihood_matches_the_model_loss(ckpt) -> None:
    import torch

    from danlu.eval.loglik import loglikelihoods

    tok = ckpt.tokenizer
    ctx, cont = [tok.bos_id, *tok.encode("日本的首都是")], tok.encode("东京")
    (lp, _), (lp2, _) = loglikelihoods(ckpt.model, [(ctx, cont), (ctx[:2], cont)], vocab_size=10**9)
    x = torch.tensor([ctx + cont[:-1]])
    y = torch.tensor([[-100] * (len(ctx) - 1) + cont])
    with torch.no_grad():
        loss = ckpt.model(x, y, reduction="none")
    assert lp == pytest.approx(-loss.sum().item(), rel=1e-4)
    assert lp2 != lp  # batched rows of different lengths keep their own context


def test_gsm8k_answer_extraction() -> None:
    from danlu.eval.generative import extract_prediction, extract_reference

    assert extract_reference("48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert extract_reference("#### 1,234") == "1234"
    assert extract_prediction("so she has 5 apples and 7 pears, 12 in all") == "12"
    assert extract_prediction("#### 10.00\nQuestion: next") == "10"
    assert extract_prediction("no number here") is None


def test_short_answers_must_stand_alone_as_words() -> None:
    from danlu.eval.generative import contains_answer

    assert contains_answer(
        "S is the chemical symbol for sulfur.", ["S"]
    )  # a word, although a letter follows a space
    assert contains_answer("The element with atomic number 15 is phosphorus.", ["15"])
    assert contains_answer("铜的元素符号是Cu。", ["Cu"]) and contains_answer("首都是新德里。", ["新德里"])
    assert (
        not contains_answer("The Sun", ["S"])
        and not contains_answer("12", ["1"])
        and not contains_answer("1.5", ["1"])
    )
    assert contains_answer("The capital is New  Delhi.", ["New Delhi"])


def test_arithmetic_is_judged_by_its_last_number_not_by_a_step() -> None:
    from danlu.eval.generative import contains_answer, final_number_matches

    worked = "Ones: 6 + 8 = 14, write 4, carry 1. Tens: 4 + 2 + 1 = 7. So 46 + 28 = 74."
    assert final_number_matches(worked, ["74"])
    assert not final_number_matches(worked, ["14"]) and contains_answer(
        worked, ["14"]
    )  # why contains is wrong here
    assert not final_number_matches("no number", ["7"])


def test_preference_accuracy_is_split_by_kind_and_uses_the_mean_per_token(ckpt) -> None:
    from danlu.eval.loglik import loglikelihoods
    from danlu.eval.world import _figure, preference_flags

    rows = [
        {"prompt": "1+1=?", "chosen": "2", "rejected": "3", "kind": "arithmetic"},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello! Hello! Hello!", "kind": "repetitive"},
        {"prompt": "2+2=?", "chosen": "4", "rejected": "5", "kind": "arithmetic"},
    ]
    flags = preference_flags(ckpt.model, ckpt.tokenizer, rows, chat=True)
    tok = ckpt.tokenizer
    for row, ok in zip(rows, flags):  # the definition, recomputed by hand: mean log-probability per token
        ctx = tok.render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)[0]
        conts = [tok.encode(row[k]) + [tok.end_of_turn_id] for k in ("chosen", "rejected")]
        (lc, _), (lr, _) = loglikelihoods(ckpt.model, [(ctx, c) for c in conts], vocab_size=tok.vocab_size)
        assert ok == (lc / len(conts[0]) > lr / len(conts[1]))
    fig = _figure(flags, rows, "pairs", "dev", [], ("kind",), random=0.5)
    assert fig["n"] == 3 and fig["correct"] == sum(flags) and fig["random"] == 0.5
    assert set(fig["parts"]) == {"kind=arithmetic", "kind=repetitive"}
    assert (
        fig["parts"]["kind=arithmetic"]["n"] == 2 and fig["parts"]["kind=repetitive"]["correct"] == flags[1]
    )


def test_wilson_interval_matches_published_values() -> None:
    from danlu.eval.stats import proportion, wilson_interval

    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 → 0.2553–0.3662; 0/10 → 0–0.2775
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    fig = proportion(3, 4, "rows right")
    assert fig["value"] == 0.75 and fig["n"] == 4 and fig["ci95"][0] < 0.75 < fig["ci95"][1] < 1


def test_ratio_interval_of_equal_units_is_the_mean_interval() -> None:
    import statistics

    from danlu.eval.stats import Z95, ratio_interval

    xs = [2.0, 3.0, 5.0, 4.0, 6.0]
    r, lo, hi = ratio_interval(xs, [1.0] * 5)  # units of equal size: the ratio is a plain mean
    half = Z95 * statistics.stdev(xs) / len(xs) ** 0.5
    assert r == 4.0 and (lo, hi) == pytest.approx((4.0 - half, 4.0 + half))
    r, lo, hi = ratio_interval([2.0, 4.0], [1.0, 2.0])  # every unit at the same rate: no spread at all
    assert r == lo == hi == 2.0


def _world_rows(tmp_path: Path, split_field: bool) -> Path:
    """A held-out folder of the default world, with or without the dev/test split fields."""
    from danlu.eval.world import world_eval_dir

    src = world_eval_dir(None)
    out = tmp_path / "eval"
    out.mkdir(parents=True)
    for f in src.glob("*.jsonl"):
        rows = [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
        for i, r in enumerate(rows):
            r.pop("split", None)
            if split_field:
                r["split"] = "dev" if i % 2 == 0 else "test"
        (out / f.name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    return out


def test_splits_are_read_from_the_rows_and_test_needs_them(tmp_path: Path) -> None:
    from danlu.eval.world import split_rows

    marked = _world_rows(tmp_path / "a", split_field=True)
    dev, test = split_rows(marked, "facts_chat.jsonl", "dev"), split_rows(marked, "facts_chat.jsonl", "test")
    assert dev and test and {r["split"] for r in dev} == {"dev"} and {r["split"] for r in test} == {"test"}
    assert not {json.dumps(r) for r in dev} & {json.dumps(r) for r in test}
    assert len(split_rows(marked, "facts_chat.jsonl", "dev", limit=5)) == 5
    old = _world_rows(tmp_path / "b", split_field=False)
    everything = split_rows(old, "facts_chat.jsonl", "dev")  # a world from before splits: all rows are dev
    assert len(everything) == len(dev) + len(test)
    with pytest.raises(
        DanluError, match=r"facts_chat\.jsonl: these held-out rows have no dev/test split.*rebuild the world"
    ):
        split_rows(old, "facts_chat.jsonl", "test")
    with pytest.raises(DanluError, match="split 'val': one of dev, test"):
        split_rows(marked, "facts_chat.jsonl", "val")


def test_arithmetic_reports_unseen_sums_apart_from_the_times_table(ckpt, tmp_path: Path) -> None:
    from danlu.eval.world import arithmetic_subset, evaluate_world, split_rows

    folder = _world_rows(tmp_path, split_field=True)
    rows = split_rows(folder, "arithmetic.jsonl", "dev", limit=24)
    res = evaluate_world(
        ckpt.model, ckpt.tokenizer, ["arithmetic_chat"], data=folder, limit=24, batch_size=24
    )
    assert set(res) == {"arithmetic_chat_unseen", "arithmetic_chat_times_table"}
    for sub in ("unseen", "times_table"):
        fig = res[f"arithmetic_chat_{sub}"]
        assert fig["n"] == sum(arithmetic_subset(r) == sub for r in rows) > 0
        assert fig["value"] == round(fig["correct"] / fig["n"], 4) and fig["split"] == "dev"
    assert "occur in no training text" in res["arithmetic_chat_unseen"]["counts"]
    assert "times-table" in res["arithmetic_chat_times_table"]["counts"]
    assert arithmetic_subset({"op": "+", "pair_in_training": False}) == "unseen"
    assert arithmetic_subset({"subset": "times_table"}) == "times_table"


def test_a_stored_figure_is_reused_until_the_weights_or_rows_change(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:  # fmt: skip
    import shutil

    import danlu.eval.world as world
    from danlu.eval.store import FigureStore

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    ck = load_checkpoint(folder)
    first = world.evaluate_world(ck.model, ck.tokenizer, ["facts_chat"], limit=4, store=FigureStore(folder))
    calls = []
    real = world.score_set
    monkeypatch.setattr(world, "score_set", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = world.evaluate_world(ck.model, ck.tokenizer, ["facts_chat"], limit=4, store=FigureStore(folder))
    assert again == first and calls == []  # read back, not computed
    world.evaluate_world(ck.model, ck.tokenizer, ["facts_chat"], limit=5, store=FigureStore(folder))
    assert calls == ["facts_chat"]  # other rows: another figure
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten weights (a new mtime): every stored figure is stale
    assert FigureStore(folder).figures() == {}
    world.evaluate_world(ck.model, ck.tokenizer, ["facts_chat"], limit=4, store=FigureStore(folder))
    assert calls == ["facts_chat", "facts_chat"]


def test_gsm8k_task_runs_batched_and_greedy(ckpt, tmp_path: Path) -> None:
    from danlu.eval.tasks import EvalOptions, run_tasks

    rows = [
        {"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)
    ]
    data = _write(tmp_path / "g.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    opts = EvalOptions(data=str(data), shots=1, max_tokens=8, batch_size=2)
    a = run_tasks(ckpt, ["gsm8k"], opts)["gsm8k"]
    b = run_tasks(ckpt, ["gsm8k"], opts)["gsm8k"]
    assert a["n"] == 4 and a["shots"] == 1 and a == b  # greedy: deterministic


def test_world_sets_base_and_chat(ckpt) -> None:
    from danlu.eval.tasks import EvalOptions, run_tasks
    from danlu.eval.world import QUANTITIES

    res = run_tasks(ckpt, ["world"], EvalOptions(limit=4, batch_size=4))
    # a chat model: every quantity, base and chat form (a subset with none of the first 4 rows has no figure)
    assert {f"world/{q}" for q in QUANTITIES if not q.endswith("times_table")} <= set(res)
    assert set(res) <= {f"world/{q}" for q in QUANTITIES}
    for m in res.values():
        assert m["value"] == round(m["correct"] / m["n"], 4) and m["split"] == "dev" and m["counts"]
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    for s in ("arithmetic_base", "arithmetic_chat"):  # the two subsets share the set's 4 rows
        assert res[f"world/{s}_unseen"]["n"] + res.get(f"world/{s}_times_table", {"n": 0})["n"] == 4
    assert res["world/tools_call"]["n"] == res["world/tools_answer"]["n"] == res["world/facts_chat"]["n"] == 4
    assert res["world/preference_base"]["random"] == 0.5


def test_eval_command_prints_a_table_and_writes_json(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    data = _write(tmp_path / "geo_dev.csv", CMMLU)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_checkpoint), "--task", "cmmlu", "world/facts_base", "--data", str(data),
                 "--limit", "2", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "cmmlu" in printed and "random" in printed and "0.2500" in printed and "95% CI" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["cmmlu"]["n"] == 2 and saved["results"]["world/facts_base"]["n"] == 2
    assert saved["split"] == "dev"


def test_eval_command_scores_the_split_it_is_given(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from danlu.eval.world import split_rows

    marked = _world_rows(tmp_path / "a", split_field=True)
    out = tmp_path / "test.json"
    assert main(["eval", str(tiny_checkpoint), "--task", "world/facts_chat", "--split", "test", "--limit", "3",
                 "--world", str(marked), "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    fig = saved["results"]["world/facts_chat"]
    assert saved["split"] == "test" and fig["split"] == "test" and fig["n"] == 3
    test_rows = split_rows(marked, "facts_chat.jsonl", "test", limit=3)
    assert [e["prompt"] for e in fig["examples"][:3]] == [r["messages"][-1]["content"] for r in test_rows]
    old = _world_rows(tmp_path / "b", split_field=False)
    assert (
        main(
            [
                "eval",
                str(tiny_checkpoint),
                "--task",
                "world/facts_chat",
                "--split",
                "test",
                "--world",
                str(old),
            ]
        )
        == 2
    )
    assert "rebuild the world" in capsys.readouterr().err


def test_bad_input_gives_one_clear_error_each(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from danlu.eval.multiple_choice import read_questions
    from danlu.eval.tasks import get_task

    with pytest.raises(DanluError, match=r"geo\.csv:1: missing columns? .*answer.*found columns"):
        read_questions(_write(tmp_path / "geo.csv", "question,A,B,C,D\nq,a,b,c,d\n"))
    with pytest.raises(
        DanluError, match=r"bad\.csv:3: answer 'E' is out of range: this question has 4 choices"
    ):
        read_questions(_write(tmp_path / "bad.csv", "question,A,B,C,D,answer\nq,a,b,c,d,A\nq,a,b,c,d,E\n"))
    with pytest.raises(DanluError, match=r"idx\.csv:2: answer '4' is out of range"):
        read_questions(_write(tmp_path / "idx.csv", MMLU_INDEX.replace(",1\n", ",4\n", 1)))
    with pytest.raises(DanluError, match=r"unknown task 'mmmlu'; valid tasks: bpb, mc, .*mmlu.*gsm8k.*world"):
        get_task("mmmlu")
    (tmp_path / "notckpt").mkdir()
    assert main(["eval", str(tmp_path / "notckpt"), "--task", "world"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_checkpoint), "--task", "nope"]) == 2
    assert "valid tasks" in capsys.readouterr().err


def test_loglikelihood_of_a_continuation_longer_than_the_window(tiny_checkpoint) -> None:
    """A continuation longer than the model's context is scored on its last tokens, not a crash (issue 23's
    experiment met this with a 128-token model)."""
    from danlu.eval.loglik import loglikelihoods

    ckpt = load_checkpoint(tiny_checkpoint)
    window = ckpt.model.config.max_position_embeddings
    cont = [5 + (i % 50) for i in range(window + 20)]
    (long_total, _), (tail_total, _) = loglikelihoods(
        ckpt.model, [([1, 2, 3], cont), ([cont[-window - 1]], cont[-window:])]
    )
    assert long_total == pytest.approx(tail_total, rel=1e-5)
