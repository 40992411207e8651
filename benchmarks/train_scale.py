"""Training tokens/s on one machine: 1 process against 2 processes (torchrun, gloo) with the same global batch.

On a CPU the question a user has is whether `torchrun --nproc_per_node 2` beats one process that uses both cores
through its own threads. Each launch runs danlu's Trainer (the engine every stage trains with: bf16 autocast where
the CPU has it, AdamW, gradient clipping, DDP or FSDP2) on the tiny recipe's model shape and global batch, with
rows of random tokens (what rows hold does not change the arithmetic). Modes run interleaved, round after round, so
a load spike on a shared machine hits each alike; each figure is the median over rounds of tokens/s between the
end of the warmup steps and the last step, timed on rank 0 (the ranks wait for each other every step).

    python benchmarks/train_scale.py                     # 3 rounds of 1×2 threads, 1×1, 2×1 DDP, 2×1 FSDP2
    python benchmarks/train_scale.py --rounds 5 --steps 40 --depth 6
    # on GPUs (one process per GPU; MFU against the GPU's bf16 peak): 117M parameters (depth 12, width 768, GPT-2's vocabulary)
    python benchmarks/train_scale.py --device cuda --gpus 1 --depth 12 --vocab 50304 --seq 1024 --batch 16 --compile on

MFU is the engine's own figure (6N + attention FLOPs per token, `ModelConfig.flops_per_token`, over the device's
peak, `engine.peak_flops`), taken over the same timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (label, processes, threads per process, parallel)
MODES = [("1 process × 2 threads", 1, 2, "ddp"), ("1 process × 1 thread", 1, 1, "ddp"),
         ("2 processes × 1 thread, DDP", 2, 1, "ddp"), ("2 processes × 1 thread, FSDP2", 2, 1, "fsdp")]  # fmt: skip


class RandomRows:
    """Rows of random tokens, the global batch of each step drawn from the step's seed and rank r taking the r-th
    slice: the data contract of danlu's sources (`data.shards.RowOrder`) without a shard folder."""

    def __init__(self, vocab: int, seq: int, batch: int, rank: int, world: int) -> None:
        self.vocab, self.seq, self.batch, self.rank, self.world = vocab, seq, batch, rank, world
        self.position = 0
        self.times: list[float] = []  # when each batch was asked for (the previous step has ended)

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.times.append(time.perf_counter())
        g = torch.Generator().manual_seed(self.position)
        rows = torch.randint(0, self.vocab, (self.batch * self.world, self.seq + 1), generator=g)
        self.position += 1
        mine = rows[self.rank * self.batch : (self.rank + 1) * self.batch]
        return {"input_ids": mine[:, :-1], "targets": mine[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def worker(args: argparse.Namespace) -> None:
    """One launch: trains `args.steps` steps and writes rank 0's tokens/s after the warmup to `args.result`."""
    from danlu.engine import Hooks, TrainConfig, Trainer, init_distributed
    from danlu.model import ModelConfig, Transformer

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, lr=1e-3, warmup_steps=2, log_every=10**6, eval_every=0, progress=False,
                      parallel=args.parallel, threads=args.threads, compile=args.compile, device=args.device,
                      seed=0)  # fmt: skip
    d = init_distributed(cfg.device)
    cfg.batch_size = args.batch // d.world_size
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=args.vocab, depth=args.depth, max_position_embeddings=args.seq)
    data = RandomRows(args.vocab, args.seq, cfg.batch_size, d.rank, d.world_size)
    trainer = Trainer(cfg, Transformer(mcfg), data, lambda m, b: (m(b["input_ids"], b["targets"]), {}),
                      Path(args.out), Hooks(save_model=lambda *a: None), stage="benchmark",
                      flops_per_token=mcfg.flops_per_token(args.seq))  # fmt: skip
    trainer.fit()
    if d.main:
        t = data.times  # (the next batch is asked for once the step's optimizer update has run)
        seconds = t[-1] - t[args.warmup]  # steps warmup … steps-2 (the last step's end is not seen)
        tps = (len(t) - 1 - args.warmup) * args.batch * args.seq / seconds
        # each process's peak is its own device's (a GPU, or on a CPU the cores its threads use): all of them
        mfu = tps * trainer.flops_per_token / (trainer.peak * d.world_size)
        Path(args.result).write_text(json.dumps({"tokens_per_s": tps, "mfu": mfu, "dtype": str(trainer.dtype),
                                                 "device": str(trainer.device), "params": mcfg.num_params()}))


def launch(args: argparse.Namespace, procs: int, threads: int, parallel: str, tmp: Path) -> dict[str, Any]:
    result = tmp / f"result-{procs}-{threads}-{parallel}.json"
    result.unlink(missing_ok=True)
    flags = [f"--threads={threads}", f"--parallel={parallel}", f"--steps={args.steps}", f"--warmup={args.warmup}",
             f"--device={args.device}", f"--compile={args.compile}",
             f"--batch={args.batch}", f"--seq={args.seq}", f"--depth={args.depth}", f"--vocab={args.vocab}",
             f"--out={tmp / 'out'}", f"--result={result}", "--worker"]  # fmt: skip
    script = str(Path(__file__).resolve())
    if procs == 1:
        cmd = [sys.executable, script, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script,
               *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if args.device.startswith("cuda"):
        env.pop("OMP_NUM_THREADS")  # (threads do not drive a GPU's speed)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows), split among the processes")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4, help="the tiny recipe's model: width 64 × depth")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--modes", default=",".join(str(i) for i in range(len(MODES))),
                    help="CPU: which modes (indices into: " + "; ".join(m[0] for m in MODES) + ")")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then one process per GPU: --gpus)")
    ap.add_argument("--gpus", type=int, default=1, help="cuda: 1 process, and torchrun's N processes when N > 1")
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    # the launched processes' own flags
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("threads", "parallel", "out", "result"):  # (device and compile are the orchestrator's own)
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from danlu.engine import close_distributed

        args.threads = int(args.threads)
        try:
            worker(args)
        finally:
            close_distributed()
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    modes = [MODES[int(i)] for i in args.modes.split(",")]
    if args.device.startswith("cuda"):
        modes = [("1 GPU", 1, 1, "ddp")]
        if args.gpus > 1:
            modes += [(f"{args.gpus} GPUs, torchrun, {p.upper()}", args.gpus, 1, p) for p in ("ddp", "fsdp")]
    print(f"{machine()}; model depth {args.depth} (vocab {args.vocab}), global batch {args.batch} × {args.seq} "
          f"tokens, {args.steps} steps ({args.warmup} warmup), {args.rounds} interleaved rounds")  # fmt: skip
    figures: dict[str, list[float]] = {m[0]: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, procs, threads, parallel in modes:
                got = launch(args, procs, threads, parallel, Path(tmp))
                figures[label].append(got["tokens_per_s"])
                print(f"  round {r + 1}: {label:32s} {got['tokens_per_s']:9,.0f} tokens/s, MFU {got['mfu']:.1%} "
                      f"({got['params'] / 1e6:.1f}M parameters, {got['device']}, {got['dtype']})", flush=True)  # fmt: skip
    base = statistics.median(figures[modes[0][0]])
    print(f"medians (ratio to {modes[0][0]}):")
    for label, values in figures.items():
        m = statistics.median(values)
        print(f"  {label:32s} {m:9,.0f} tokens/s  {m / base:.2f}x")


if __name__ == "__main__":
    main()
