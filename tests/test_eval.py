"""Evaluation tasks on a tiny random checkpoint: bpb, multiple choice, GSM8K extraction, world sets, bad input."""

from __future__ import annotations

import json
import math
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
    assert res["bpb"] > 0 and res["n"] > 0


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
    assert res["random"] == 0.25 and 0 <= res["accuracy"] <= 1
    assert res["accuracy"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in res["subjects"].values()) / 4)
    q0, q1 = read_questions(tmp_path / "mc" / "geo_dev.csv")["geo"].questions
    prompt = build_prompt(q0, [q1])
    assert (
        "东京" in prompt and prompt.endswith("答案：") and "答案：B" in prompt
    )  # the shot carries its answer


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


def test_preference_accuracy_is_split_by_kind(ckpt) -> None:
    from danlu.eval.world import preference_accuracy

    rows = [
        {"prompt": "1+1=?", "chosen": "2", "rejected": "3", "kind": "arithmetic"},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello! Hello! Hello!", "kind": "repetitive"},
        {"prompt": "2+2=?", "chosen": "4", "rejected": "5", "kind": "arithmetic"},
    ]
    res = preference_accuracy(ckpt.model, ckpt.tokenizer, rows, chat=True)
    assert set(res) >= {"accuracy", "accuracy_arithmetic", "accuracy_repetitive"}
    assert res["accuracy"] == pytest.approx(
        (2 * res["accuracy_arithmetic"] + res["accuracy_repetitive"]) / 3, abs=1e-3
    )


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

    res = run_tasks(ckpt, ["world"], EvalOptions(limit=4, batch_size=4))
    assert {"world/facts_base", "world/facts_chat", "world/tools", "world/preference_chat"} <= set(res)
    assert all(0 <= m["accuracy"] <= 1 and m["n"] == 4 for m in res.values())
    assert res["world/preference_base"]["random"] == 0.5


def test_eval_command_prints_a_table_and_writes_json(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    data = _write(tmp_path / "geo_dev.csv", CMMLU)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_checkpoint), "--task", "cmmlu", "world/facts_base", "--data", str(data),
                 "--limit", "2", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "cmmlu" in printed and "random" in printed and "0.2500" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["cmmlu"]["n"] == 2 and "world/facts_base" in saved["results"]


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
