"""`torchrun -m danlu run`: the whole pipeline on 2 CPU processes (gloo).

Before, every rank ran every stage: both built the world corpus and the data stage's datatrove folders at once, and
the launch died in the data stage (a temp file renamed by the other rank). Now rank 0 alone runs the stages that
have no distributed form while the other rank waits, and every rank runs the training stages; the run then equals a
1-process run with the same global batch. The training stages' own 2-process exactness (rows, losses, resume) is
tests/test_scale.py's; this file is about the runner around them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETECT = ('detect={"prompts": 24, "max_new_tokens": 8, "max_tokens": 64, "real": 0, "zero_shot": false, '
          '"train": {"steps": 4, "batch_size": 4}}')  # fmt: skip
# The smoke pipeline plus the detector; DPO (its judged pairs: the slowest smoke stage) is left to test_scale.
ARGS = ["smoke", DETECT, "train.global_batch_size=16", "dtype=fp32", "dpo.enabled=false"]
STAGES = ["world", "data", "tokenizer", "tokens", "pretrain", "sft", "reward", "ppo", "grpo", "eval", "detect",
          "export"]  # fmt: skip
ALONE = ["world", "data", "tokenizer", "tokens", "eval", "export"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _danlu_run(out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "danlu", "run", *ARGS, *extra, "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=480)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("torchrun_run")
    one = _danlu_run(root / "one", 1)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _danlu_run(root / "two", 2)
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-6000:])
    return root / "one", root / "two", two.stdout


def _files(folder: Path) -> dict[str, bytes]:
    """A stage's output files (all but its stage.json, which holds the stage's time) by path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "stage.json"}  # fmt: skip


def _losses(run: Path, stage: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("event") in (None, "train")]


def test_every_stage_finishes_once_and_trains_as_one_process(runs: tuple[Path, Path, str]) -> None:
    one, two, log = runs
    summary = json.loads((two / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    for stage in STAGES:  # rank 0 wrote each stage.json, once
        assert json.loads((two / stage / "stage.json").read_text())["metrics"] == summary["stages"][stage]
        header = f"── stage {stage} ──" + (" (rank 0 alone; 1 more wait)" if stage in ALONE else "")
        assert log.count(f"[danlu] {header}\n") == 1, stage
    assert log.count("[danlu] sft: 885 dialogs") <= 1  # a rank's own lines are rank 0's to print
    assert log.count("[danlu] run finished") == 1
    # what rank 0 made alone is what one process makes, byte for byte: the corpus, the data stage's filtered text,
    # rejects and stats, the tokenizer and the token shards
    for stage in ("world", "data", "tokenizer", "tokens"):
        assert _files(two / stage) == _files(one / stage) != {}, stage
    # the training stages ran on both processes (8 rows each of the global 16) with one process's losses
    assert "2 training processes share the node" in log
    for stage in ("pretrain", "sft"):
        got, want = _losses(two, stage), _losses(one, stage)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, stage
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5), stage
    # the detector: rank 0 sampled the machine text (once), both ranks trained on it, rank 0 scored
    assert "4 steps × 8 texts" in log
    machine = (two / "detect" / "machine_train.jsonl").read_text().splitlines()
    assert len(machine) == len((one / "detect" / "machine_train.jsonl").read_text().splitlines()) > 0
    assert "a_in_distribution/fine-tuned/auroc" in summary["stages"]["detect"]
    assert (two / "export" / "Modelfile").is_file() and (two / "report.html").is_file()


def test_a_rerun_under_torchrun_skips_what_is_done_on_every_rank(runs: tuple[Path, Path, str]) -> None:
    """Rank 0 decides which stages are unchanged, for both ranks: none reruns, none waits for a stage the other
    skipped."""
    _, two, _ = runs
    again = _danlu_run(two, 2)
    assert again.returncode == 0, again.stderr[-4000:]
    for stage in STAGES:
        assert again.stdout.count(f"[danlu] {stage}: unchanged since its last run, skipped") == 1, stage
    assert "── stage" not in again.stdout


def test_a_failing_stage_rank_0_runs_alone_ends_the_launch_with_its_message(tmp_path: Path) -> None:
    """The data stage fails on rank 0; rank 1, waiting for it, stops too and says why in one line, not a
    traceback of the lost connection."""
    bad = _danlu_run(tmp_path, 2, 'data={"inputs": [{"path": "/nonexistent/x.jsonl"}]}', "--only", "world", "data")
    assert bad.returncode != 0
    assert "danlu run: error: stage 'data' failed: data.inputs[0].path: /nonexistent/x.jsonl" in bad.stderr
    assert "rank 1: another process of this launch stopped while this one waited for it" in bad.stderr
    assert "[rank1]: Traceback" not in bad.stderr


def test_single_process_hides_the_launch_from_what_runs_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `single_process` a stage (and any child process it starts) sees no torchrun launch: no collective
    the waiting ranks would never join; outside, the launch is back as it was."""
    from danlu.engine import init_distributed, launch_world_size, single_process

    launch = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "x", "ROLE_RANK": "0"}  # fmt: skip
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    assert launch_world_size() == 2
    with single_process():
        assert launch_world_size() == 1
        assert init_distributed("cpu").world_size == 1
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.environ))"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        assert not any(f"'{key}'" in child for key in launch)
    assert {k: os.environ[k] for k in launch} == launch


def test_compress_on_two_processes_reports_what_one_process_does(runs: tuple[Path, Path, str]) -> None:
    """`torchrun … danlu compress` with FSDP2: rank 0 prunes (one plan for both ranks), both distill, both heal the
    shared-block option (under DDP: FSDP2 cannot shard a block two layers share — this crashed before), rank 0
    alone measures, restores chat (its SFT child a launch of its own: before, each rank's child joined the other's
    and the launch hung) and quantizes. The report equals one process's, row for row."""
    one, _, _ = runs
    world = one / "world"
    args = ["--teacher", str(one / "pretrain"), "--data", str(world / "pretrain.jsonl"), "--eval-data",
            str(world / "pretrain_val.jsonl"), "compress.ratio=2", "compress.subset.rows=300",
            "compress.distill.train.steps=3", "compress.scratch.enabled=false", "compress.factorize.enabled=false",
            "compress.share.heal_steps=1", "compress.restore.enabled=true", f"compress.restore.data={world / 'sft.jsonl'}",
            f"compress.restore.eval_data={world}", "compress.restore.limit=8", "compress.restore.sft.train.steps=2",
            "compress.quantize.bits=[8]", "compress.gguf=[]", "compress.eval_tokens=1000", "compress.eval_facts=0",
            "compress.decode_tokens=0", "train.global_batch_size=8", "dtype=fp32"]  # fmt: skip
    reports = {}
    for processes, out in ((1, one / "compress1"), (2, one / "compress2")):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if processes > 1 else []
        extra = ["train.parallel=fsdp"] if processes > 1 else []
        done = subprocess.run([sys.executable, *launcher, "-m", "danlu", "compress", *args, *extra, "--out", str(out)],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, (processes, done.stdout[-3000:], done.stderr[-6000:])
        assert done.stdout.count("| model | params |") == 1  # the report, printed by rank 0 alone
        reports[processes] = json.loads((out / "report.json").read_text())["rows"]
    assert [r["model"] for r in reports[2]] == ["teacher", "pruned", "distilled", "teacher + SFT", "distilled + SFT",
                                                "shared", "int8"]  # fmt: skip
    for got, want in zip(reports[2], reports[1]):
        assert got.keys() == want.keys(), got["model"]
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), (got["model"], key)


def test_detect_train_generating_its_machine_text_samples_once_under_torchrun(runs: tuple[Path, Path, str]) -> None:
    """`torchrun … danlu detect train --generate-with CKPT`: rank 0 alone samples (an endpoint would be asked once,
    not once per rank) and both ranks train on its texts, as one process does."""
    one, _, _ = runs
    world = one / "world"
    human = one / "human12.jsonl"  # as many human texts as prompts: the classes stay balanced
    human.write_text("".join((world / "pretrain_val.jsonl").read_text().splitlines(keepends=True)[:12]))
    args = ["detect", "train", "--human", str(human), "--generate-with", str(one / "sft"),
            "--prompts", str(world / "sft.jsonl"), "--max-prompts", "12", "steps=3", "global_batch_size=8",
            "max_tokens=32", "device=cpu", "dtype=fp32", "progress=false", "eval_share=0.2", "log_every=1"]  # fmt: skip
    made = {}
    for processes in (1, 2):
        out = one / f"detector{processes}"
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if processes > 1 else []
        done = subprocess.run([sys.executable, *launcher, "-m", "danlu", *args, "--out", str(out)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, (processes, done.stdout[-3000:], done.stderr[-6000:])
        assert done.stdout.count("machine texts from") == 1 and done.stdout.count(f"wrote {out}") == 1
        made[processes] = ((one / f"detector{processes}.generated.jsonl").read_bytes(), _losses(one, out.name))
    assert made[2][0] == made[1][0] and made[1][0]
    assert [v for _, v in made[2][1]] == pytest.approx([v for _, v in made[1][1]], abs=1e-5)
    assert len(made[1][1]) == 3


def test_a_command_without_a_distributed_form_runs_on_rank_0_alone(runs: tuple[Path, Path, str], tmp_path: Path) -> None:
    """`torchrun … danlu data prepare`: before, both ranks ran datatrove into one folder and one died renaming the
    other's temp file; now rank 0 runs it as one process does (same files, byte for byte) and rank 1 ends."""
    one, _, _ = runs
    args = ["-m", "danlu", "data", "prepare", "smoke", f'data.inputs=[{{"path": "{one / "world" / "pretrain.jsonl"}"}}]']
    outs = {}
    for processes in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if processes > 1 else []
        out = tmp_path / f"data{processes}"
        done = subprocess.run([sys.executable, *launcher, *args, "--out", str(out)], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, (processes, done.stderr[-4000:])
        assert ("rank 0 runs it alone" in done.stderr) == (processes > 1)
        outs[processes] = _files(out)
    assert outs[2] == outs[1] and any(name.startswith("text/") for name in outs[1])
