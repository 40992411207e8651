"""Cached top-k teacher logits: the teacher runs once over the distillation rows, not at every training step.

For each position of each row the cache keeps the teacher's K most likely tokens (ids) and their log-probabilities at
the distillation temperature, plus the log of the mass left to all other tokens, so the loss
(`danlu.losses.topk_kd_loss`) compares teacher and student on K + 1 bins: the K tokens and one bucket for the tail.
Training then needs no teacher forward: steps are faster, and a teacher too big to sit beside the student can be
unloaded once the cache is written (held-out KL still asks for it).

Storage: log-probs in fp16 (they lie in [-65000, 0], where fp16's 11-bit significand is finer than bf16's 8 bits:
steps of 0.008 nats at -10 against 0.06; the clamp keeps them finite), ids in int16 when the vocabulary fits (else
int32): (2 + 2)·K + 2 bytes per position, e.g. 130 bytes at K = 32 instead of 4·V (16 KB at V = 4096) for full fp32
logits. One safetensors file beside the output folder (`<out>.teacher_top<K>.safetensors`, written atomically; under
torchrun rank 0 writes it for all rows, since every rank reads from all rows over the epochs). Its metadata names
the teacher (a hash of its weights as they run, dtype included), the rows (a hash of their tokens), K and T: a run
reuses a matching cache (a resumed or repeated run pays the teacher pass once) and refuses one that does not match,
saying what differs — the cache sits beside a resumable run, so silently rebuilding it would hide that the run now
points at another teacher or other data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError

FORMAT = "danlu.teacher_topk/1"
_FLOOR = -65000.0  # log-probs below this are stored as this (exp underflows to 0 in fp32 either way)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's tensors as they are (names, dtypes, shapes, bytes): the teacher's identity for a cache."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rows_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the rows' input ids and targets (int64): the data's identity for a cache."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.to(torch.int64).contiguous()
        h.update(f"{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_path(out: Path, k: int) -> Path:
    """Beside the output folder, not in it: the engine swaps the whole folder at every checkpoint."""
    out = Path(out)
    return out.with_name(f"{out.name}.teacher_top{k}.safetensors")


@torch.no_grad()
def teacher_topk(
    teacher: torch.nn.Module, x: torch.Tensor, k: int, temperature: float, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probs (N, L, K) fp16, their ids (N, L, K) int16/int32 and the tail's log-mass (N, L)
    fp16 at `temperature`, for rows `x` (N, L), `batch_size` rows per forward."""
    device = next(teacher.parameters()).device
    ids_dtype = torch.int16 if teacher.config.vocab_size <= 2**15 else torch.int32
    logp, ids, tail = [], [], []
    for i in range(0, len(x), batch_size):
        scaled = teacher(x[i : i + batch_size].to(device)).float() / temperature
        top = scaled.topk(k, dim=-1)
        top_logp = top.values - torch.logsumexp(scaled, dim=-1, keepdim=True)
        # log(1 - mass of the top k): one pass fewer over the vocabulary than a log-sum-exp of the rest; where the
        # rest is below fp32's resolution (or empty, k = V) it is -inf -> the floor, a tail of 0
        rest = torch.log1p(-top_logp.exp().sum(-1).clamp(max=1.0))
        logp.append(top_logp.clamp(min=_FLOOR).to(torch.float16).cpu())
        ids.append(top.indices.to(ids_dtype).cpu())
        tail.append(rest.clamp(min=_FLOOR).to(torch.float16).cpu())
    return {"logp": torch.cat(logp), "ids": torch.cat(ids), "tail": torch.cat(tail)}


def load_or_build(
    path: Path, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, temperature: float
) -> dict[str, torch.Tensor]:
    """The cache at `path` if it was made from this teacher, these rows, K and T; built and written there when
    absent; a DanluError naming what differs when it was made from something else."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from danlu.files import atomic_path

    want = {"format": FORMAT, "teacher": weights_hash(teacher), "rows": rows_hash(x, y), "k": str(k),
            "temperature": repr(float(temperature))}  # fmt: skip
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                have = f.metadata() or {}
        except Exception as e:  # a truncated or foreign file
            raise DanluError(f"{path}: unreadable teacher top-k cache ({e}); delete it to rebuild") from None
        differ = [key for key in want if have.get(key) != want[key]]
        if differ:
            what = {"format": "another cache format", "teacher": "another teacher (or teacher dtype)",
                    "rows": "other distillation rows", "k": f"top-{have.get('k')} (now {k})",
                    "temperature": f"temperature {have.get('temperature')} (now {float(temperature)})"}  # fmt: skip
            raise DanluError(
                f"{path}: this teacher top-k cache was made from {', '.join(what[d] for d in differ)}; it does not "
                "match this run. Delete the file to rebuild it for this run, or distill into another output folder"
            )
        return load_file(str(path))
    cache = teacher_topk(teacher, x, k, temperature)
    with atomic_path(path) as tmp:
        save_file(cache, str(tmp), metadata=want)
    return cache


class TopKRows:
    """A data source: the batches of `rows` (a PackedRows) with the teacher's cached top-k for each of their rows.
    `attach` gives it the cache once the teacher sits on its device; its position is the rows' position."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows
        self.cache: dict[str, torch.Tensor] | None = None

    def attach(self, cache: dict[str, torch.Tensor]) -> None:
        n = len(self.rows.x)
        if any(len(v) != n for v in cache.values()):
            raise DanluError(f"teacher top-k cache: {len(cache['logp'])} rows for {n} rows of data")
        self.cache = cache

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cache is None:
            raise DanluError("TopKRows: no teacher cache attached (call attach first)")
        batch = self.rows.next_batch()
        idx = batch.pop("row")
        batch.update({f"teacher_{k}": v[idx] for k, v in self.cache.items()})
        return batch

    def sequential(self, batch_size: int = 16) -> Any:
        return self.rows.sequential(batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)
