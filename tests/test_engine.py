"""The training engine: exact resume, DDP equivalence, the NaN guard, safe saves, schedules, recipe errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from danlu import DanluError
from danlu.config import apply_overrides, from_dict, load_recipe
from danlu.data.shards import TokenRows, tokenize_corpus
from danlu.engine import Hooks, TrainConfig, Trainer, lr_factor
from danlu.files import read_records, write_jsonl_atomic
from danlu.io import save_model_dir
from danlu.model import ModelConfig, Transformer
from tests.conftest import SAMPLE_TEXT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shards")
    tiny_tokenizer.save(base / "tok")
    write_jsonl_atomic(base / "train.jsonl", ({"text": t + f" {i}"} for i, t in enumerate(SAMPLE_TEXT * 4)))
    write_jsonl_atomic(base / "val.jsonl", ({"text": t} for t in SAMPLE_TEXT[:8]))
    tokenize_corpus({"train": [base / "train.jsonl"], "val": [base / "val.jsonl"]}, base / "tok", base / "shards",
                    workers=1, progress=False)  # fmt: skip
    return base / "shards", base / "tok"


def _trainer(shards: tuple[Path, Path], out: Path, tokenizer, steps: int = 12, **kw) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, dtype="fp32", device="cpu",
                      log_every=1, eval_every=0, progress=False, **kw)  # fmt: skip
    mcfg = ModelConfig(vocab_size=tokenizer.padded_vocab_size(64), depth=1, max_position_embeddings=32)
    data = TokenRows(shards[0], "train", 32, cfg.batch_size, seed=1)

    def save(state, folder, meta):
        save_model_dir(folder, state, mcfg, tokenizer, meta)

    return Trainer(cfg, Transformer(mcfg), data, lambda m, b: (m(b["input_ids"], b["targets"]), {}), out,
                   Hooks(save_model=save), stage="pretrain")  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon: its momentum buffers must be saved and restored
def test_resume_continues_bit_for_bit(tmp_path: Path, shards, tiny_tokenizer, optimizer: str) -> None:
    straight = _trainer(shards, tmp_path / "a", tiny_tokenizer, optimizer=optimizer)
    straight.fit()

    interrupted = _trainer(shards, tmp_path / "b", tiny_tokenizer, save_every=5, optimizer=optimizer)
    real_loss = interrupted.loss_fn

    def crash_at_step_7(m, b):
        if interrupted.step == 7:
            raise KeyboardInterrupt
        return real_loss(m, b)

    interrupted.loss_fn = crash_at_step_7
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = _trainer(shards, tmp_path / "b", tiny_tokenizer, save_every=5, optimizer=optimizer)
    resumed.resume()
    assert resumed.step == 5
    resumed.fit()
    for k, v in straight.raw_model.state_dict().items():
        assert torch.equal(v, resumed.raw_model.state_dict()[k]), k
    losses_a = [
        r["loss"] for r in read_records(tmp_path / "a" / "metrics.jsonl") if r.get("event") == "train"
    ]
    losses_b = {
        r["step"]: r["loss"]
        for r in read_records(tmp_path / "b" / "metrics.jsonl")
        if r.get("event") == "train"
    }
    assert [losses_b[s] for s in range(1, 13)] == losses_a


def test_resume_rejects_foreign_or_partial_checkpoints(tmp_path: Path, shards, tiny_tokenizer) -> None:
    with pytest.raises(DanluError, match="no trainer_state"):
        _trainer(shards, tmp_path / "empty", tiny_tokenizer).resume()
    t = _trainer(shards, tmp_path / "c", tiny_tokenizer, steps=2)
    t.fit()
    (tmp_path / "c" / "trainer_state" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(DanluError, match="unreadable or partial"):
        _trainer(shards, tmp_path / "c", tiny_tokenizer).resume()
    t = _trainer(shards, tmp_path / "d", tiny_tokenizer, steps=2)
    t.fit()
    state = json.loads((tmp_path / "d" / "trainer_state" / "state.json").read_text())
    (tmp_path / "d" / "trainer_state" / "state.json").write_text(json.dumps({**state, "stage": "sft"}))
    with pytest.raises(DanluError, match="checkpoint of stage 'sft'"):
        _trainer(shards, tmp_path / "d", tiny_tokenizer).resume()


def test_nan_loss_stops_without_touching_the_last_checkpoint(tmp_path: Path, shards, tiny_tokenizer) -> None:
    t = _trainer(shards, tmp_path / "n", tiny_tokenizer, steps=6, save_every=2)
    real = t.loss_fn
    t.loss_fn = lambda m, b: (real(m, b)[0] * (float("nan") if t.step >= 3 else 1.0), {})
    with pytest.raises(DanluError, match="not finite for 3 steps"):
        t.fit()
    state = json.loads((tmp_path / "n" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2
    from danlu.io import load_checkpoint

    assert all(torch.isfinite(p).all() for p in load_checkpoint(tmp_path / "n").model.parameters())


class _BrokenCompile:
    """Stands in for a compiled module whose compilation fails, as torch.compile does without a C++ toolchain."""

    class Error(RuntimeError):
        pass

    Error.__module__ = "torch._inductor.exc"

    def __init__(self, model: torch.nn.Module) -> None:
        self._orig_mod = model  # as torch.compile's OptimizedModule names what it wraps

    def __call__(self, *args, **kwargs):
        raise self.Error("C++ compile error: cannot find a compiler")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_failing_compile_falls_back_under_auto_and_stops_under_on(
    tmp_path: Path, shards, tiny_tokenizer, monkeypatch, capsys, mode: str
) -> None:
    monkeypatch.setattr(torch, "compile", _BrokenCompile)
    monkeypatch.setattr(Trainer, "_use_compile", lambda self: True)
    t = _trainer(shards, tmp_path / mode, tiny_tokenizer, steps=3, compile=mode)
    assert isinstance(t.model, _BrokenCompile)
    if mode == "on":
        with pytest.raises(_BrokenCompile.Error):
            t.fit()
        return
    t.fit()
    assert t.step == 3 and t.model is t.raw_model and not t.compiled
    assert "torch.compile failed" in capsys.readouterr().out
    losses = [h["loss"] for h in t.history if h.get("event") == "train"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trained, eagerly, from the first step


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, shards, tiny_tokenizer) -> None:
    t = _trainer(shards, tmp_path / "s", tiny_tokenizer, steps=2)
    t.fit()
    before = (tmp_path / "s" / "model.safetensors").read_bytes()

    def disk_full(state, folder, meta):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    t.hooks.save_model = disk_full
    with pytest.raises(DanluError, match="no space left on device"):
        t.save()
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]


def test_schedules() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=0.01)
    wsd = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.5)


def test_cpu_peak_counts_amx_for_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """MFU's denominator: AMX tiles for bf16 where the CPU has them and oneDNN may use them, vector widths
    otherwise (oneDNN capped below AMX runs AVX-512 BF16: its MFU must not be counted against the tiles)."""
    import danlu.engine as engine

    def cpu(flags: str) -> None:
        monkeypatch.setattr(engine, "_cpuinfo", lambda: f"cpu MHz\t\t: 2000.000\nflags\t\t: {flags}\n")

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu("fma avx2 avx512f avx512_bf16")
    assert engine.peak_flops(torch.device("cpu"), torch.bfloat16) == 2 * 2e9 * 2 * 16 * 2 * 2
    assert engine.peak_flops(torch.device("cpu"), torch.float32) == 2 * 2e9 * 2 * 16 * 2
    cpu("fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert engine.peak_flops(torch.device("cpu"), torch.bfloat16) == 2 * 2e9 * 1024
    assert engine.peak_flops(torch.device("cpu"), torch.float32) == 2 * 2e9 * 2 * 16 * 2
    for cap, amx in (("AVX512_CORE_BF16", False), ("avx2", False), ("AVX512_CORE_AMX", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        expected = 2 * 2e9 * 1024 if amx else 2 * 2e9 * 2 * 16 * 2 * 2
        assert engine.peak_flops(torch.device("cpu"), torch.bfloat16) == expected, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    cpu("fma avx2")
    assert engine.peak_flops(torch.device("cpu"), torch.float32) == 2 * 2e9 * 2 * 8 * 2


def test_dtype_auto_trains_in_bf16_only_where_this_cpu_multiplies_bf16_faster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """AMX: bf16 unmeasured; no bf16 instructions: fp32; AVX-512 BF16 alone (or oneDNN capped below AMX): bf16 only
    when its measured matrix products are clearly faster than fp32 (an Intel Xeon with AMX hidden ran them at 0.56×:
    bf16 there made training slower). The measurement itself is real and positive."""
    import danlu.engine as engine

    cpu = torch.device("cpu")
    speedup = {"value": 3.5}
    monkeypatch.setattr(engine, "_bf16_matmul_speedup", lambda: speedup["value"])

    def auto(flags: str, cap: str = "") -> torch.dtype:
        monkeypatch.setattr(engine, "_cpuinfo", lambda: f"flags\t\t: {flags}\n")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap) if cap else monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        engine.cpu_bf16_pays.cache_clear()
        return engine.resolve_dtype("auto", cpu)

    speedup["value"] = 0.5  # never asked where the flags decide
    assert auto("avx512f avx512_bf16 amx_bf16 amx_tile") == torch.bfloat16
    assert auto("avx2 fma") == torch.float32
    assert capsys.readouterr().out == ""
    assert auto("avx512f avx512_bf16") == torch.float32
    assert "ran 0.50× its fp32 ones: dtype auto is fp32" in capsys.readouterr().out
    assert auto("avx512f avx512_bf16 amx_bf16", cap="AVX512_CORE_BF16") == torch.float32
    speedup["value"] = 3.5
    assert auto("avx512f avx512_bf16") == torch.bfloat16
    assert engine.resolve_dtype("fp32", cpu) == torch.float32 and engine.resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.undo()
    engine.cpu_bf16_pays.cache_clear()
    assert 0 < engine._bf16_matmul_speedup(rows=64, inner=64, cols=64, repeats=1) < float("inf")


def test_muon_option_trains(tmp_path: Path, shards, tiny_tokenizer) -> None:
    t = _trainer(shards, tmp_path / "m", tiny_tokenizer, steps=8, optimizer="muon")
    t.fit()
    losses = [r["loss"] for r in t.history if r.get("event") == "train"]
    assert losses[-1] < losses[0]


def test_muon_stacks_same_shape_updates_without_changing_them() -> None:
    """In bf16 Muon orthogonalizes the updates of one shape as one batch of products (faster on a CPU): the weights
    after a few steps are the bits one-at-a-time updates give; in fp32 each matrix goes alone."""
    from danlu.engine import Muon
    from danlu.model import ModelConfig, Transformer

    torch.manual_seed(0)
    hidden = [p for n, p in Transformer(ModelConfig(vocab_size=256, depth=2)).named_parameters()
              if p.dim() == 2 and "embed" not in n]  # fmt: skip
    grads = [[torch.randn_like(p) for p in hidden] for _ in range(3)]
    for dtype, stacks in ((torch.bfloat16, 4), (torch.float32, len(hidden))):
        runs = []
        for together in (True, False):
            params = [nn.Parameter(p.detach().clone()) for p in hidden]
            opt = Muon(params, dtype=dtype)
            if not together:
                opt._stacks = lambda ps: [[i] for i in range(len(ps))]  # type: ignore[method-assign]
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = g.clone()
                opt.step()
            runs.append(params)
        assert len(Muon(hidden, dtype=dtype)._stacks(hidden)) == stacks
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        assert not all(torch.equal(a, p) for a, p in zip(runs[0], hidden))


def test_deterministic_compiled_training_repeats_bit_for_bit(tmp_path: Path, shards, tiny_tokenizer) -> None:
    """train.deterministic: two compiled runs from the same seed give the same losses and weights, bit for bit.
    Without it, compiled CPU kernels on 2 threads may sum in another order from one run to the next (BENCHMARKS.md,
    eleventh session), so same-seed runs of the default recipe drifted apart."""
    try:
        runs = []
        for name in ("a", "b"):
            torch._dynamo.reset()  # the second run compiles afresh, as a new process would
            t = _trainer(shards, tmp_path / name, tiny_tokenizer, steps=8, compile="on", deterministic=True,
                         threads=2)  # fmt: skip
            t.fit()
            assert torch.are_deterministic_algorithms_enabled()
            runs.append(t)
        losses = [[r["loss"] for r in t.history if r.get("event") == "train"] for t in runs]
        assert len(losses[0]) == 8 and losses[0] == losses[1]
        for k, v in runs[0].raw_model.state_dict().items():
            assert torch.equal(v, runs[1].raw_model.state_dict()[k]), k
    finally:
        torch.use_deterministic_algorithms(False)
        torch._dynamo.reset()


def test_recipe_errors_name_the_key() -> None:
    with pytest.raises(DanluError, match="unknown key 'stpes'.*valid keys: .*steps"):
        from_dict(TrainConfig, {"stpes": 3}, "pretrain.train")
    with pytest.raises(DanluError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(DanluError, match="key=value"):
        apply_overrides({}, ["pretrain.steps"])
    assert apply_overrides({}, ["pretrain.train.steps=5"]) == {"pretrain": {"train": {"steps": 5}}}
    # YAML reads on/off as booleans: the values the docs and messages name (train.compile=off) still work
    for word, value in (("on", "on"), ("off", "off"), ("auto", "auto")):
        section = apply_overrides({}, [f"pretrain.train.compile={word}"])["pretrain"]["train"]
        assert from_dict(TrainConfig, section, "pretrain.train").compile == value
    with pytest.raises(DanluError, match="'sometimes' is not one of 'auto', 'on', 'off'"):
        from_dict(TrainConfig, {"compile": "sometimes"}, "pretrain.train")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_ddp_and_fsdp_match_one_process(tmp_path: Path, shards, optimizer: str) -> None:
    """torchrun with 2 CPU processes (gloo), batch B each, gives the losses of 1 process with batch 2B — with DDP
    and with FSDP2 (fully_shard), through the same code path. Muon too: under FSDP each rank holds a slice of a
    matrix, and the update must orthogonalize the whole matrix, not the slice."""
    shard_dir, tok = shards
    common = [f"--data={shard_dir}", f"--tokenizer={tok}", "--recipe=smoke", "dtype=fp32", "device=cpu",
              "model.depth=1", "pretrain.seq_len=32", "pretrain.eval_facts=0", "pretrain.train.steps=6",
              "pretrain.train.eval_every=0", "pretrain.train.sample_every=0", "pretrain.train.log_every=1",
              "pretrain.train.warmup_steps=2", "train.threads=1", f"train.optimizer={optimizer}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def losses(p: Path) -> list[float]:
        return [r["loss"] for r in read_records(p / "metrics.jsonl") if r.get("event") == "train"]

    one = subprocess.run([sys.executable, "-m", "danlu", "pretrain", f"--out={tmp_path / 'one'}", *common,
                          "train.batch_size=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    reference = losses(tmp_path / "one")
    assert len(reference) == 6
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "danlu", "pretrain", f"--out={out}", *common, "train.batch_size=4",
                              f"train.parallel={parallel}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert two.returncode == 0, two.stderr[-8000:]  # enough to hold the failing rank's own traceback
        got = losses(out)
        assert len(got) == 6
        assert max(abs(x - y) for x, y in zip(reference, got)) < 1e-5, parallel


def test_a_command_ends_the_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`danlu <command>` destroys the torchrun process group when it ends, returned, failed or crashed: a process
    that exits with a live gloo group can have a worker thread free a collective's tensors while Python shuts down,
    which kills it with SIGABRT (seen once on rank 1 of the 2-process test)."""
    import argparse

    import torch.distributed as dist

    from danlu import cli

    def command(outcome: str) -> argparse.ArgumentParser:
        def run(args: argparse.Namespace) -> int:
            t = torch.ones(3)
            dist.all_reduce(t)  # the group is alive while the command runs
            if outcome == "fails":
                raise DanluError("no data")
            if outcome == "crashes":
                raise RuntimeError("bug")
            return 0

        parser = argparse.ArgumentParser()
        parser.set_defaults(_run=run, _every_rank=True, command="train")
        return parser

    try:
        for i, (outcome, code) in enumerate((("returns", 0), ("fails", 2), ("crashes", None))):
            store = f"file://{tmp_path / f'store{i}'}"
            dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
            monkeypatch.setattr(cli, "build_parser", lambda o=outcome: command(o))
            if code is None:
                with pytest.raises(RuntimeError, match="bug"):
                    cli.main([])
            else:
                assert cli.main([]) == code
            assert not dist.is_initialized(), outcome
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path, shards, tiny_tokenizer) -> None:
    def trainer(out: str, batch: int, accum: int) -> Trainer:
        t = _trainer(shards, tmp_path / out, tiny_tokenizer, steps=4, grad_accum=accum)
        t.data = TokenRows(shards[0], "train", 32, batch, seed=1)
        return t

    big, small = trainer("big", 8, 1), trainer("small", 4, 2)
    big.fit()
    small.fit()
    for k, v in big.raw_model.state_dict().items():
        torch.testing.assert_close(v, small.raw_model.state_dict()[k], atol=1e-5, rtol=1e-4)


def test_a_device_this_torch_cannot_reach_stops_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`device` settings are checked where they are read: a typo, a GPU this torch does not see, an index past the
    GPUs there are; `auto` and `cpu` always resolve."""
    from danlu.engine import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DanluError, match="'gpu': not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DanluError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DanluError, match="only 1 CUDA GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DanluError, match="no Apple GPU"):
        resolve_device("mps")
