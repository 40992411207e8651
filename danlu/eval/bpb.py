"""Bits-per-byte and perplexity: how well a model predicts held-out text, comparable across tokenizers.

Loss per token depends on the vocabulary (a bigger vocabulary packs more bytes into a token); dividing the summed
loss by the bytes the predicted tokens stand for gives bits-per-byte, which does not. Pretraining's validation
hook and `danlu eval --task bpb` share this one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.eval.stats import ratio_interval
from danlu.model import IGNORE_INDEX

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def token_bytes(tokenizer: Any, vocab: int) -> torch.Tensor:
    """Bytes each token stands for (0 for special tokens and padding rows): the denominator of bits-per-byte."""
    special = {tokenizer.token_to_id(t) for t in tokenizer.special_tokens}
    sizes = [0 if i in special else len(tokenizer.piece_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(sizes + [0] * (vocab - len(sizes)), dtype=torch.float32)


@torch.no_grad()
def bits_per_byte(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], tbytes: torch.Tensor,
    per_row: list[tuple[float, float]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Mean loss (nats/token) and bits-per-byte: tokenizer-independent, so models with other vocabularies compare.

    `per_row` (when given) receives each row's (nats, bytes): the units a confidence interval is computed over."""
    nats = bytes_ = 0.0
    loss_sum, count = 0.0, 0
    device = model.lm_head.weight.device
    tbytes = tbytes.to(device)
    for batch in batches:
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        per_token = model(x, y, reduction="none").float().view(y.shape)
        valid = y != IGNORE_INDEX
        loss_sum += per_token[valid].sum().item()
        count += int(valid.sum())
        b = tbytes[y.clamp(min=0)] * valid
        row_nats = (per_token * (b > 0)).sum(-1)
        row_bytes = b.sum(-1)
        nats += row_nats.sum().item()
        bytes_ += row_bytes.sum().item()
        if per_row is not None:
            per_row += [(float(a), float(c)) for a, c in zip(row_nats.tolist(), row_bytes.tolist())]
    return {
        "val_loss": loss_sum / max(1, count),
        "val_bpb": nats / (math.log(2) * max(1.0, bytes_)),
        "tokens": count,
    }


def _text_rows(path: Path, text_field: str) -> Iterator[str]:
    from danlu.files import read_records

    if path.suffix in (".txt", ".md"):
        yield path.read_text(encoding="utf-8")
        return
    for i, row in enumerate(read_records(path), 1):
        if not isinstance(row, dict) or text_field not in row:
            raise DanluError(
                f"{path}:{i}: no {text_field!r} field (bpb reads plain text or records with {text_field!r})"
            )
        yield str(row[text_field])


def text_batches(
    tokenizer: Any, texts: Iterable[str], seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Documents joined with BOS (as pretraining packs them), cut into rows of seq_len+1 tokens; the last row padded."""
    stream: list[int] = []
    for text in texts:
        stream += [tokenizer.bos_id, *tokenizer.encode(text)]
        if max_tokens and len(stream) > max_tokens:
            stream = stream[: max_tokens + 1]
            break
    rows = []
    for start in range(0, max(0, len(stream) - 1), seq_len):
        chunk = stream[start : start + seq_len + 1]
        if len(chunk) < 2:
            break
        x, y = chunk[:-1], chunk[1:]
        pad = seq_len - len(x)
        rows.append((x + [tokenizer.pad_id] * pad, y + [IGNORE_INDEX] * pad))
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        yield {"input_ids": torch.tensor([r[0] for r in part]), "targets": torch.tensor([r[1] for r in part])}


def evaluate_bpb(
    model: Any, tokenizer: Any, data: str | Path, *, seq_len: int = 256, batch_size: int = 8, max_tokens: int = 200_000,
    text_field: str = "text", split: str = "val",
) -> dict[str, Any]:  # fmt: skip
    """Bits-per-byte, loss and perplexity of `model` on a text file (.txt/.jsonl/.json/.parquet) or a token shard folder."""
    path = Path(data)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    tbytes = token_bytes(tokenizer, model.config.vocab_size)
    if path.is_dir():
        batches = _shard_batches(path, tokenizer, split, seq_len, batch_size, max_tokens)
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise DanluError(f"{path}: bpb reads {', '.join(TEXT_SUFFIXES)} files or a token shard folder")
        batches = text_batches(tokenizer, _text_rows(path, text_field), seq_len, batch_size, max_tokens)
    else:
        raise DanluError(f"{path}: no such file or folder")
    rows: list[tuple[float, float]] = []
    res = bits_per_byte(model, batches, tbytes, per_row=rows)
    if not res["tokens"]:
        raise DanluError(f"{path}: no text to evaluate")
    _, lo, hi = ratio_interval([r[0] / math.log(2) for r in rows], [r[1] for r in rows])
    return {"bpb": round(res["val_bpb"], 5), "loss": round(res["val_loss"], 5),
            "perplexity": round(math.exp(min(res["val_loss"], 50.0)), 3), "n": res["tokens"], "rows": len(rows),
            "ci95": [round(lo, 5), round(hi, 5)]}  # fmt: skip


def _shard_batches(
    folder: Path, tokenizer: Any, split: str, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[dict[str, torch.Tensor]]:
    from danlu.data.shards import TokenRows, load_index

    index = load_index(folder)
    if split not in index["splits"]:
        split = next(iter(index["splits"]))
    if index.get("vocab_size") not in (None, tokenizer.vocab_size) or index.get("bos_id") not in (
        None,
        tokenizer.bos_id,
    ):
        raise DanluError(
            f"{folder}: tokenized with a different tokenizer than the checkpoint's; re-tokenize the text"
        )
    rows = TokenRows(folder, split, seq_len, batch_size, shuffle=False)
    return rows.sequential(max(1, max_tokens // seq_len), batch_size=batch_size)
