"""Distillation on the engine: the student learns the teacher's token distributions (Minitron's retraining step).

A stage is a data source and a loss: the data is packed rows of text (`PackedRows`, or pretraining's `TokenRows`),
the loss `danlu.losses.kd_loss` — forward KL(teacher‖student) at temperature T, or TRL's generalized JSD with β
(`beta`) — on every position the rows score, optionally mixed with the usual next-token cross-entropy (`alpha` < 1).
The teacher sits frozen beside the student in eval mode (bf16 on GPUs, fp32 on CPUs without bf16): it is not part of
the module the engine optimizes, checkpoints or wraps, so resume, DDP and FSDP see only the student.

Three options change where the teacher's knowledge comes from (each measured in benchmarks/distill_modes.py):
`topk: K` caches the teacher's top-K log-probs once and trains against them with no teacher forward
(danlu.compress.teacher_topk); `mode: sequence` trains by cross-entropy on continuations the teacher writes (Kim &
Rush), `mode: on_policy` by the generalized JSD on continuations the student writes with probability `lmbda` (TRL's
GKD) — both danlu.compress.kd_modes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from danlu import DanluError
from danlu.compress.kd_modes import GeneratedRows, check_parallel
from danlu.compress.teacher_topk import TopKRows, cache_path, load_or_build
from danlu.data.shards import RowOrder
from danlu.losses import generalized_jsd, kd_loss, topk_kd_loss
from danlu.losses_fused import logits_cross_entropy
from danlu.model import IGNORE_INDEX


@dataclass
class DistillConfig:
    """Recipe `compress.distill:`."""

    enabled: bool = True
    temperature: float = 1.0
    beta: float = (
        0.0  # 0: forward KL (the classic KD loss); 1: reverse KL; between: generalized JSD (TRL GKD)
    )
    alpha: float = 1.0  # weight of the KD loss; 1 - alpha goes to next-token cross-entropy on the data
    seq_len: int = 128
    tokens: int = 0  # distillation token budget; 0 = train.steps as given
    teacher_dtype: str = "auto"  # auto: bf16 on GPUs and bf16 CPUs, else fp32
    train: dict[str, Any] = field(default_factory=dict)
    # where the targets come from: the data rows (logits), the teacher's continuations (sequence, Kim & Rush), or
    # the student's own continuations with probability lmbda (on_policy, TRL's GKD); see danlu.compress.kd_modes
    mode: Literal["logits", "sequence", "on_policy"] = "logits"
    topk: int = 0  # logits mode: the teacher's cached top-k log-probs (+ a tail bucket); 0 = live logits
    lmbda: float = 0.5  # on_policy: share of batches whose continuations the student samples
    prompt_tokens: int = 16  # sequence / on_policy: each row's first tokens are the prompt ...
    new_tokens: int = 0  # ... and this many are generated after it; 0: as many as fill a row of seq_len
    gen_temperature: float = 1.0  # sampling temperature of the continuations (0 = greedy)
    top_p: float = 1.0

    def __post_init__(self) -> None:
        """Bad values are refused when the recipe is read, each with the key that is wrong."""
        generates = self.mode != "logits"
        bad = [
            (self.temperature <= 0, f"temperature={self.temperature}: must be > 0"),
            (not 0 <= self.beta <= 1, f"beta={self.beta}: must be in [0, 1] (0 forward KL, 1 reverse KL)"),
            (not 0 <= self.alpha <= 1, f"alpha={self.alpha}: must be in [0, 1] (the KD loss's weight)"),
            (self.topk < 0, f"topk={self.topk}: must be ≥ 0 (0 = the live teacher's full logits)"),
            (self.topk > 0 and generates, f"topk={self.topk} with mode={self.mode}: the cache holds the "
             "teacher's distributions on the data rows, which only mode logits trains on"),
            (generates and self.alpha < 1, f"alpha={self.alpha} with mode={self.mode}: alpha mixes in "
             "cross-entropy on the data rows, which only mode logits trains on"),
            (not 0 <= self.lmbda <= 1, f"lmbda={self.lmbda}: must be in [0, 1] (the share of on-policy batches)"),
            (self.gen_temperature < 0, f"gen_temperature={self.gen_temperature}: must be ≥ 0 (0 = greedy)"),
            (not 0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (generates and self.prompt_tokens < 1, f"prompt_tokens={self.prompt_tokens}: must be ≥ 1"),
            (self.new_tokens < 0, f"new_tokens={self.new_tokens}: must be ≥ 0 (0: as many as fill a row)"),
            (generates and self.prompt_tokens + max(1, self.new_tokens) > self.seq_len + 1,
             f"prompt_tokens={self.prompt_tokens} + new_tokens={self.new_tokens} exceed seq_len={self.seq_len} + 1: "
             "the prompt is cut from a row of seq_len tokens, and prompt and continuation (but its last token) "
             "make the new row"),
        ]  # fmt: skip
        for wrong, message in bad:
            if wrong:
                raise DanluError(f"compress.distill.{message}")

    def continuation(self, row_len: int, context: int) -> int:
        """Tokens generated per row in modes sequence and on_policy: by default as many as make a new row as long
        as the data's (`row_len` inputs: the prompt and all generated tokens but the last, which is only a
        target), so every mode trains on the same number of tokens; at most what the models' context holds."""
        return self.new_tokens or min(row_len + 1, context) - self.prompt_tokens


class PackedRows:
    """Rows of (input_ids, targets) packed from texts (documents joined with BOS, as pretraining packs them), served
    in a fresh shuffled order each epoch; its position is saved with the checkpoint so a resumed run continues.

    `batch_size` is per process, as the engine's `train.batch_size`: under torchrun rank r of N takes the r-th slice
    of every global batch of batch_size × N rows, by pretraining's rule (`danlu.data.shards.RowOrder`), so N
    processes read together the rows one process with N times the batch reads. `distill` sets the rank from the
    engine's process group (`shard`), so a caller may build the rows before that group exists."""

    def __init__(
        self, rows: list[dict[str, torch.Tensor]], batch_size: int, seed: int = 0, *, rank: int = 0,
        world_size: int = 1,
    ) -> None:  # fmt: skip
        if not rows:
            raise DanluError("distill: no training rows (the distillation texts are empty)")
        self.x = torch.cat([r["input_ids"] for r in rows])
        self.y = torch.cat([r["targets"] for r in rows])
        self.batch_size, self.seed = batch_size, seed
        self.shard(rank, world_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Reads as rank `rank` of `world_size` processes from the start of the data."""
        if len(self.x) < self.batch_size * world_size:
            raise DanluError(f"distill: {len(self.x)} rows of text, fewer than one global batch of "
                             f"{self.batch_size * world_size} ({self.batch_size} per process × {world_size}); use "
                             "more texts, a smaller train.batch_size or a shorter compress.distill.seq_len")  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.order = RowOrder(len(self.x), self.batch_size, rank=rank, world_size=world_size, seed=self.seed)

    @classmethod
    def from_texts(
        cls, tokenizer: Any, texts: Iterable[str], seq_len: int, batch_size: int, seed: int = 0
    ) -> PackedRows:
        from danlu.eval.bpb import text_batches

        return cls(list(text_batches(tokenizer, texts, seq_len, 64, 0)), batch_size, seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.order.next_indices())
        return {"input_ids": self.x[idx], "targets": self.y[idx], "row": idx}  # row: per-row teacher caches

    def sequential(self, batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.x), batch_size):
            yield {"input_ids": self.x[i : i + batch_size], "targets": self.y[i : i + batch_size]}

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state, "distill: ")


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, where: str) -> None:
    """Logit distillation compares distributions token by token, so both models must share one vocabulary."""
    a, b = teacher_tok.vocab_size, student_tok.vocab_size
    if a != b or _pieces(teacher_tok) != _pieces(student_tok):
        raise DanluError(
            f"{where}: the teacher's and the student's tokenizers differ ({a} vs {b} tokens"
            f"{'' if a != b else ', same size but different pieces'}); distillation on logits compares the two "
            "distributions token by token, so the student must use the teacher's tokenizer (prune the student "
            "from the teacher, or retrain it with the teacher's tokenizer)"
        )


def _pieces(tokenizer: Any) -> dict[str, int]:
    return tokenizer.backend.get_vocab(with_added_tokens=True)


def distill_loss(teacher: torch.nn.Module, cfg: DistillConfig) -> Any:
    """The engine's loss function: KD (or GJSD) against the frozen teacher, plus (1 - alpha)·cross-entropy; against
    the cached top-k teacher where the batch carries it; cross-entropy alone in mode sequence (the targets are the
    teacher's own continuations). Positions the targets do not score (IGNORE_INDEX) never count."""

    def loss_fn(
        model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch["input_ids"], batch["targets"]
        if cfg.mode == "sequence":
            ce = model(x, y)
            return ce, {"ce": float(ce.detach())}
        mask = y != IGNORE_INDEX
        s_logits = model(x)
        if "teacher_logp" in batch:
            kd = topk_kd_loss(s_logits, batch["teacher_logp"], batch["teacher_ids"], batch["teacher_tail"], mask,
                              cfg.beta, cfg.temperature)  # fmt: skip
            return _with_ce(kd, s_logits, y, cfg)
        with torch.no_grad():
            t_logits = teacher(x)
        if cfg.beta == 0:
            kd = kd_loss(s_logits, t_logits, mask, cfg.temperature)
        else:
            kd = cfg.temperature**2 * generalized_jsd(s_logits, t_logits, mask, cfg.beta, cfg.temperature)
        return _with_ce(kd, s_logits, y, cfg)

    return loss_fn


def _with_ce(
    kd: torch.Tensor, s_logits: torch.Tensor, y: torch.Tensor, cfg: DistillConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha·KD + (1 - alpha)·next-token cross-entropy on the data, and the stats the engine logs."""
    loss = cfg.alpha * kd
    stats = {"kd": float(kd.detach())}
    if cfg.alpha < 1:
        ce = logits_cross_entropy(s_logits, y)
        loss = loss + (1 - cfg.alpha) * ce
        stats["ce"] = float(ce.detach())
    return loss, stats


@torch.no_grad()
def heldout_kl(
    student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> float:
    """Mean KL(teacher‖student) per scored token at T = 1 on held-out rows: how far the student is from the teacher."""
    total, count = 0.0, 0
    device = student.lm_head.weight.device
    for b in batches:
        x, y = b["input_ids"].to(device), b["targets"].to(device)
        mask = y != IGNORE_INDEX
        n = int(mask.sum())
        total += float(generalized_jsd(student(x), teacher(x), mask, beta=0.0)) * n
        count += n
    return total / max(1, count)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    from danlu.engine import cpu_bf16_pays

    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name != "auto":
        raise DanluError(f"compress.distill.teacher_dtype={name!r}: expected auto, bf16 or fp32")
    return (
        torch.bfloat16
        if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays())
        else torch.float32
    )


def distill(
    student: torch.nn.Module, teacher: torch.nn.Module, data: Any, out: Path, *, tcfg: Any, cfg: DistillConfig,
    tokenizer: Any, meta: dict[str, Any], eval_rows: PackedRows | None = None, chat: bool = False,
    resume: bool = False, topk_cache: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Trains `student` toward `teacher` on `data` with the engine, saving the student to `out`; returns metrics
    (held-out KL to the teacher before and after, the last training losses). `resume` continues the checkpoint in
    `out` (weights, optimizer, data position) exactly. Under torchrun `data`, if `PackedRows`, is read as this
    process's rank: each rank its own slice of every global batch. `topk_cache` is where the teacher's top-k cache
    (`cfg.topk`) is kept, by default beside `out`: runs on the same rows from the same teacher may share one."""
    from danlu.engine import Hooks, Trainer, init_distributed, shard_blocks
    from danlu.io import save_model_dir

    d = init_distributed(tcfg.device)
    if isinstance(data, PackedRows) and (data.rank, data.world_size) != (d.rank, d.world_size):
        data.shard(d.rank, d.world_size)
    teacher.eval().requires_grad_(False)
    val = list(eval_rows.sequential(16)) if eval_rows is not None else []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": heldout_kl(m, teacher, val)} if val else {}

    def save(state: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        save_model_dir(folder, state, student.config, tokenizer, {**meta, **step_meta}, chat=chat)

    hooks = Hooks(save_model=save, evaluate=evaluate)
    source = _source(data, student, teacher, tokenizer, cfg, tcfg, d)
    trainer = Trainer(tcfg, student, source, distill_loss(teacher, cfg), out, hooks, stage="distill")
    sharded = teacher_is_sharded(cfg, tcfg, d)
    extra: dict[str, Any] = {"mode": cfg.mode, "topk": cfg.topk, "teacher_sharded": sharded}
    if sharded:  # cast where it lies, then shard: FSDP2 moves each rank's 1/N to the device
        shard_blocks(teacher.to(dtype=teacher_dtype(cfg.teacher_dtype, trainer.device)), frozen=True)
    else:
        teacher.to(trainer.device, teacher_dtype(cfg.teacher_dtype, trainer.device))
    if isinstance(source, TopKRows):
        t0 = time.perf_counter()
        source.attach(_teacher_cache(teacher, data, topk_cache or cache_path(out, cfg.topk), cfg, d))
        extra["teacher_cache_s"] = round(time.perf_counter() - t0, 2)
    if isinstance(source, GeneratedRows):
        source.autocast = trainer.autocast
    before = heldout_kl(trainer.raw_model.eval(), teacher, val) if val else None  # the student as given
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    after = heldout_kl(trainer.raw_model.eval(), teacher, val) if val else None
    if isinstance(source, GeneratedRows):
        extra["generated_batches"], extra["batches"] = source.generated, source.batches
    return {"steps": trainer.step, "kd_loss": metrics.get("kd", metrics.get("loss")), "heldout_kl_before": before,
            "heldout_kl_after": after, "tokens_per_s": metrics.get("tokens_per_s"), **extra}  # fmt: skip


def teacher_is_sharded(cfg: DistillConfig, tcfg: Any, d: Any) -> bool:
    """Under torchrun with `train.parallel=fsdp` the frozen teacher is sharded like the student (FSDP2, one unit per
    block: each rank holds 1/N of its weights and gathers one block at a time), so a teacher too large for one
    device fits N of them. Only for `mode: logits` without `topk`: there every rank runs the teacher on every step in
    lockstep, as a sharded forward needs; the top-k cache is built by rank 0 alone and generation may stop early on
    one rank, so those keep a whole teacher per rank."""
    return d.world_size > 1 and tcfg.parallel == "fsdp" and cfg.mode == "logits" and not cfg.topk


def _source(
    data: Any, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, cfg: DistillConfig, tcfg: Any,
    d: Any,
) -> Any:  # fmt: skip
    """The engine's data source for `cfg`: the rows themselves, with the teacher's cached top-k, or with
    continuations the teacher (sequence) or the student (on_policy) writes."""
    if cfg.topk:
        if not isinstance(data, PackedRows):
            raise DanluError("compress.distill.topk: the teacher cache is indexed by row: PackedRows only")
        return TopKRows(data)
    if cfg.mode == "logits":
        return data
    check_parallel(cfg.mode, tcfg.parallel, d.world_size)
    row_len = int(data.x.size(1)) if hasattr(data, "x") else cfg.seq_len
    context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    new = cfg.continuation(row_len, context)
    if new < 1 or cfg.prompt_tokens + new > context:
        raise DanluError(f"compress.distill: prompt_tokens={cfg.prompt_tokens} and {new} generated tokens do not "
                         f"fit rows of {row_len} tokens and the models' context of {context}")  # fmt: skip
    model = teacher if cfg.mode == "sequence" else student
    return GeneratedRows(data, model, tokenizer, share=1.0 if cfg.mode == "sequence" else cfg.lmbda,
                         prompt_tokens=cfg.prompt_tokens, new_tokens=new, temperature=cfg.gen_temperature,
                         top_p=cfg.top_p, seed=tcfg.seed, rank=d.rank)  # fmt: skip


def _teacher_cache(
    teacher: torch.nn.Module, data: PackedRows, path: Path, cfg: DistillConfig, d: Any
) -> dict[str, torch.Tensor]:
    """The teacher's top-k over all rows (every rank reads from all of them over the epochs), kept at `path`: built
    by rank 0 while the other ranks wait, then read by every rank."""
    vocab = teacher.config.vocab_size
    if cfg.topk > vocab:
        raise DanluError(f"compress.distill.topk={cfg.topk}: more than the vocabulary's {vocab} tokens")
    cache = load_or_build(path, teacher, data.x, data.y, cfg.topk, cfg.temperature) if d.main else None
    if d.world_size > 1:
        torch.distributed.barrier()
    if cache is None:
        cache = load_or_build(path, teacher, data.x, data.y, cfg.topk, cfg.temperature)
    return cache
