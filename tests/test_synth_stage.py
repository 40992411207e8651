"""The `synth` stage (`danlu run synth`): a teacher served by `danlu serve` writes Self-Instruct rows and answers,
students are fine-tuned on hand-written vs hand-written + synthetic data with the same steps, and the held-out
deltas are paired item by item. On a tiny run: the world corpus at scale 0.05, a random 1-layer base model and a
1-layer teacher overfitted in seconds to answer every request with the same numbered list of questions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import STAGES, StageContext
from danlu.runner import run_pipeline
from danlu.synth.experiment import SynthExperimentConfig, check_config, prepare_data
from danlu.synth.stats import paired_difference
from danlu.synth.students import split_of
from tests.conftest import overfit_chat_model

pytest.importorskip("openai")

QUESTIONS = [
    "中国最高的山是什么?",
    "What is the capital of Japan?",
    "长江有多长?",
    "Name the largest planet.",
]
LIST = "\n".join(f"{i}. {q}" for i, q in enumerate(QUESTIONS, 1))


def test_runner_knows_the_synth_stage() -> None:
    """`danlu run synth` needs the runner to know the stage; it reads sft and pretrain, so it comes after them."""
    assert "synth" in STAGES and STAGES.index("sft") < STAGES.index("synth")


def test_paired_difference_against_an_independent_computation() -> None:
    base = [1, 0, 0, 1, 1, 0, 0, 0, 1, 0]
    other = [1, 1, 0, 1, 0, 1, 1, 0, 1, 0]
    d = [b - a for a, b in zip(base, other)]
    half = 1.96 * statistics.stdev(d) / len(d) ** 0.5
    got = paired_difference(base, other)
    assert got["delta"] == round(statistics.mean(d), 4) == 0.2
    assert got["ci95"] == [round(0.2 - half, 4), round(0.2 + half, 4)]
    assert (got["better"], got["worse"], got["n"]) == (3, 1, 10)
    assert paired_difference([1, 0], [1, 0])["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="2 vs 3 items"):
        paired_difference([1, 0], [1, 0, 1])


def test_split_field_wins_and_the_hash_fallback_is_a_stable_partition() -> None:
    assert split_of({"messages": [{"role": "user", "content": "x"}], "split": "test"}) == "test"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(400)]
    first = [split_of(r) for r in rows]
    assert first == [split_of(r) for r in rows] and set(first) == {"dev", "test"}
    assert 150 < first.count("dev") < 250  # about half


def test_bad_synth_sections() -> None:
    cases = [
        ({"n": 0, "answers": 0}, "no synthetic data to compare with"),
        ({"gold": True, "answers": 0}, "synth.gold needs synth.answers"),
        ({"split": "val"}, "synth.split 'val': one of dev, test, all"),
        ({"eval_sets": ["tools"]}, r"tools not scored by generation here"),
        ({"steps": 0}, "synth.steps 0: must be at least 1"),
        ({"answers": -1}, "synth.answers -1: must be 0 or more"),
    ]
    for section, message in cases:
        with pytest.raises(DanluError, match=message):
            check_config(from_dict(SynthExperimentConfig, section, "synth"))
    with pytest.raises(DanluError, match="synth: unknown key 'teachers'"):
        from_dict(SynthExperimentConfig, {"teachers": "x"}, "synth")


def test_prepared_sets_are_disjoint_and_gold_is_aligned(tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"},
                          {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "more"}]}
            for i in range(30)]  # fmt: skip
    rows += [
        {"messages": [{"role": "user", "content": "question 3"}, {"role": "assistant", "content": "again"}]}
    ]
    rows += [{"messages": [{"role": "user", "content": f"calc {i}"},
                           {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calculator"}}]},
                           {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}
             for i in range(5)]  # fmt: skip
    (world / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = SynthExperimentConfig(hand=10, seeds=4, answers=15, gold=True)
    files = prepare_data(world, tmp_path / "out", cfg, seed=1)
    hand, prompts, gold = (_rows(files[k]) for k in ("hand", "prompts", "gold"))
    asked = {r["messages"][0]["content"] for r in hand}
    assert len(hand) == 10 and len(prompts) == 15 and files["n_seeds"] == 4
    assert not asked & {p["messages"][-1]["content"] for p in prompts}  # no prompt the hand-written set asks
    assert len({p["messages"][-1]["content"] for p in prompts}) == 15  # each once
    assert not any("calc" in json.dumps(r) for r in hand + prompts)  # no tool dialogs
    assert [g["messages"][:-1] for g in gold] == [p["messages"] for p in prompts]  # the first exchange only
    assert all(len(g["messages"]) == 2 and g["messages"][1]["role"] == "assistant" for g in gold)
    assert set(files["seeds"].read_text(encoding="utf-8").split("\n")[:-1]) <= asked
    with pytest.raises(DanluError, match="hand \\(30\\) \\+ answers \\(15\\) need more"):
        prepare_data(world, tmp_path / "out2", SynthExperimentConfig(hand=30, answers=15), seed=1)


def _finished(run: Path, stage: str) -> None:
    (run / stage / "stage.json").write_text(
        json.dumps({"fingerprint": "test", "metrics": {}, "finished_at": 0})
    )


def _teacher(path: Path, run: Path, scratch: Path) -> Path:
    """A 1-layer chat model that answers with LIST: to the stage's first Self-Instruct requests and to world
    prompts (a few seconds of overfitting)."""

    from danlu.files import read_records
    from danlu.synth.instruct import InstructConfig, build_prompt
    from danlu.tokenizer import Tokenizer

    cfg = from_dict(SynthExperimentConfig, SECTION, "synth")
    files = prepare_data(run / "world", scratch, cfg, 0)  # the stage's own seeds (same seed)
    seeds = [line for line in files["seeds"].read_text(encoding="utf-8").splitlines() if line]
    icfg = InstructConfig(n=3, per_request=cfg.per_request, examples=min(cfg.examples, len(seeds)), seed=0)
    world = [r["messages"][-1]["content"] for r in read_records(files["prompts"])]
    asks = QUESTIONS + [build_prompt(seeds, [], j, icfg) for j in range(2)] + world
    tok = Tokenizer.train([LIST * 3] + asks * 10, vocab_size=800)
    rows = [tok.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": LIST}])[0]
            for q in asks]  # fmt: skip
    return overfit_chat_model(tok, rows, path)


SECTION = {"hand": 40, "seeds": 6, "n": 3, "answers": 4, "steps": 2, "eval_limit": 4,
           "max_tokens": 80, "instruction_tokens": 80, "temperature": 0.0, "instruction_temperature": 0.0,
           "concurrency": 2,
           "sft": {"train": {"batch_size": 4, "device": "cpu", "log_every": 1}}}  # fmt: skip


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, dict]:
    """A run with world, pretrain (random base) and sft (the overfitted teacher) finished, and the synth stage run."""
    from conftest import make_checkpoint

    from danlu.stages.synth import run_stage

    run = tmp_path_factory.mktemp("synth_run")
    run_pipeline({"seed": 0, "world": {"scale": 0.05}}, run)
    make_checkpoint(run / "pretrain", tiny_tokenizer, chat=False, context=256)
    _finished(run, "pretrain")
    _teacher(run / "sft", run, tmp_path_factory.mktemp("prepared"))
    _finished(run, "sft")
    recipe = {"seed": 0, "world": {"scale": 0.05}, "sft": {"replay": 0.1}, "synth": SECTION}
    metrics = run_stage(StageContext("synth", run, dict(SECTION), recipe))
    return run, metrics


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_stage_writes_data_students_and_paired_deltas(stage_run: tuple[Path, dict]) -> None:
    run, m = stage_run
    out = run / "synth"
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(result["accuracy"]) == {"hand", "hand+instruct", "hand+answers", "teacher"}
    assert set(result["delta"]) == {"hand+instruct", "hand+answers"}
    assert result["eval_rows"] == {"facts_chat": 4, "arithmetic_chat": 4, "translation": 4, "summary": 4}
    assert result["split"] == {"name": "dev", "made_by": ["field"]}  # the world's own dev rows (split_rows)
    for name in ("hand+instruct", "hand+answers"):
        d = result["delta"][name]
        assert d["all"]["n"] == 16 and d["all"]["ci95"][0] <= d["all"]["delta"] <= d["all"]["ci95"][1]
        assert m[f"{name}/delta"] == d["all"]["delta"]
        mine, base = result["items"][name], result["items"]["hand"]
        diffs = [b - a for s in mine for a, b in zip(base[s], mine[s])]
        assert d["all"]["delta"] == round(sum(diffs) / 16, 4)  # the same rows, paired
    # Self-Instruct: the list's questions, each kept once, answered by the teacher through danlu serve
    instruct = _rows(out / "instruct.jsonl")
    assert [r["messages"][0]["content"] for r in instruct] == QUESTIONS[:3]
    assert (
        instruct[0]["meta"]["teacher"].endswith("/v1#sft") and instruct[0]["messages"][1]["content"] == LIST
    )
    assert m["instruct/kept"] == 3 and m["instruct/generated"] >= 3
    assert result["yield"]["instruct"]["kept_ratio"] == round(3 / m["instruct/generated"], 4)
    # distillation: the teacher's answers to world prompts that the hand-written set does not ask
    hand_asks = {r["messages"][0]["content"] for r in _rows(out / "hand.jsonl")}
    answers = _rows(out / "answers.jsonl")
    assert 1 <= len(answers) <= 4 and not hand_asks & {r["messages"][-2]["content"] for r in answers}
    assert m["answers/kept"] == len(answers) and m["answers/generated"] == 4
    assert m["hand/duplicate_rate"] >= 0 and set(m["instruct/language_mix"]) <= {"zh", "en", "unknown"}
    assert sum(m["instruct/language_mix"].values()) == pytest.approx(1.0, abs=1e-3)
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "| hand+answers |" in text and "95% CI" in text and "kept / generated" in text


def test_students_share_steps_and_base(stage_run: tuple[Path, dict]) -> None:
    run, _ = stage_run
    students = sorted((run / "synth" / "students").iterdir())
    assert [p.name for p in students] == ["hand", "hand_answers", "hand_instruct"]
    steps = set()
    for folder in students:
        meta = json.loads((folder / "danlu.json").read_text())
        assert meta["parent"] == str(run / "pretrain")
        steps.add(meta["metrics"]["steps"])
    assert steps == {2}


def test_a_rerun_reuses_data_and_students(stage_run: tuple[Path, dict]) -> None:
    from danlu.stages.synth import run_stage

    run, metrics = stage_run
    out = run / "synth"
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("students/*/model.safetensors")}
    data = (out / "instruct.jsonl").read_bytes()
    recipe = {"seed": 0, "world": {"scale": 0.05}, "sft": {"replay": 0.1}, "synth": SECTION}
    again = run_stage(StageContext("synth", run, dict(SECTION), recipe))
    assert again == metrics
    assert {p: p.stat().st_mtime_ns for p in out.glob("students/*/model.safetensors")} == stamps
    assert (out / "instruct.jsonl").read_bytes() == data
    assert (out / "serve.log").read_text().count("$ ") == 1  # complete outputs: no teacher started again
    assert (out / "students" / "hand" / "scores.json").is_file() and (out / "teacher_scores.json").is_file()


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    from danlu.stages.synth import run_stage

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DanluError, match="needs the output of stage 'sft'"):
        run_stage(StageContext("synth", run, {}, {"synth": {}}))
    (run / "world").mkdir()
    with pytest.raises(DanluError, match=r"world/sft.jsonl is missing"):
        prepare_data(run / "world", tmp_path, SynthExperimentConfig(), 0)
