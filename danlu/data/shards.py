"""Tokenized pretraining data: flat memory-mapped token shards and the loader that packs them into rows.

Layout of a shard folder::

    index.json            {"dtype", "vocab_size", "bos_id", "tokenizer_sha256", "splits": {"train": [...], "val": [...]}}
    train_00000.bin       raw uint16/uint32 tokens; every document starts with the BOS token (<|endoftext|>)
    val_00000.bin

Rows are fixed windows of `seq_len + 1` tokens over the concatenated documents (documents run into each other,
separated by BOS, as in GPT-2/nanoGPT pretraining). The loader's order is a seeded permutation per epoch; its
position is two integers, saved with every checkpoint, so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu import DanluError
from danlu.data.position import batch_state, check_global_batch
from danlu.files import atomic_path, expand_inputs, read_records, record_text

INDEX = "index.json"
_worker_tokenizer: Any = None


def tokenizer_sha256(tokenizer_dir: str | Path) -> str:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from danlu.tokenizer import Tokenizer  # a vocab.txt-only folder: hash the tokenizer transformers builds

    return hashlib.sha256(Tokenizer.load(tokenizer_dir).backend.to_str().encode("utf-8")).hexdigest()


def tokenized_with(index: dict[str, Any], tokenizer_dir: str | Path) -> bool:
    """Whether the shards of `index` (their index.json) were made with the tokenizer in `tokenizer_dir`: ids of
    another vocabulary would train a model on the wrong tokens."""
    return index.get("tokenizer_sha256") == tokenizer_sha256(tokenizer_dir)


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from danlu.tokenizer import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, int]:
    bos = _worker_tokenizer.bos_id
    ids = _worker_tokenizer.encode_batch(texts)
    flat = np.fromiter(
        (t for doc in ids for t in (bos, *doc)), dtype=np.int64, count=sum(len(d) + 1 for d in ids)
    )
    return flat, sum(len(t.encode("utf-8")) for t in texts)


def _texts(files: list[Path], text_field: str, chunk: int = 512) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in files:
        for lineno, rec in enumerate(read_records(path, text_field=text_field), 1):
            text = record_text(rec, text_field, f"{path}: record {lineno}")
            if text:
                batch.append(text)
            if len(batch) >= chunk:
                yield batch
                batch = []
    if batch:
        yield batch


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self._count >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            part.astype(self.dtype).tofile(self._file)
            self._count += len(part)
            self.shards[-1]["tokens"] = self._count

    def _open(self) -> None:
        if self._file:
            self._file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 — closed by close() or the next _open()
        self._count = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self._file:
            self._file.close()
        return self.shards


def tokenize_corpus(
    splits: dict[str, list[Path]], tokenizer_dir: str | Path, out_dir: str | Path, *, text_field: str = "text",
    workers: int = 2, shard_tokens: int = 50_000_000, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Tokenizes each split's files into shards under `out_dir` (written atomically); returns the index."""
    from tqdm import tqdm

    from danlu.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    index: dict[str, Any] = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir),
        "splits": {},
        "stats": {},
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(max(1, workers), initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
            for split, files in splits.items():
                writer = _ShardWriter(tmp, split, dtype, shard_tokens)
                total_bytes = sum(f.stat().st_size for f in files)
                bar = tqdm(
                    total=total_bytes,
                    unit="B",
                    unit_scale=True,
                    desc=f"tokenize {split}",
                    disable=not progress,
                )
                docs = tokens = text_bytes = 0
                chunks = _texts(files, text_field)
                for (flat, nbytes), n_docs in _imap_with_counts(pool, chunks):
                    writer.write(flat)
                    docs += n_docs
                    tokens += len(flat)
                    text_bytes += nbytes
                    bar.update(min(nbytes, max(0, total_bytes - bar.n)))
                bar.close()
                if tokens == 0:
                    raise DanluError(f"split {split!r}: no text found in {', '.join(map(str, files))}")
                index["splits"][split] = writer.close()
                index["stats"][split] = {"documents": docs, "tokens": tokens, "bytes": text_bytes}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _imap_with_counts(pool: Any, chunks: Iterable[list[str]]) -> Iterator[tuple[tuple[np.ndarray, int], int]]:
    counts: list[int] = []

    def feed() -> Iterator[list[str]]:
        for c in chunks:
            counts.append(len(c))
            yield c

    for i, result in enumerate(pool.imap(_encode_chunk, feed())):
        yield result, counts[i]


def load_index(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / INDEX
    if not path.exists():
        raise DanluError(
            f"{shard_dir}: not a token shard folder (no {INDEX}); create one with `danlu data tokenize`"
        )
    return json.loads(path.read_text())


class RowOrder:
    """Which rows each rank reads: a seeded permutation of the `rows` row indices per epoch (index order without
    `shuffle`), walked one global batch of `batch_size × world_size` rows at a time, rank r taking the r-th slice of
    each; an epoch's tail shorter than a global batch is skipped. So N processes with batch B read, together, exactly
    the rows one process with batch N·B reads, and the position (epoch, rows of it consumed: the same on every rank)
    resumes exactly. The one home of this rule for the row sources that index their rows (`TokenRows`, the
    distillation's `PackedRows`)."""

    def __init__(
        self, rows: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:  # fmt: skip
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def next_indices(self) -> np.ndarray:
        """This rank's row indices of the next global batch."""
        if self.pos + self.global_batch > self.rows:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        first = self.pos + self.rank * self.batch_size
        self.pos += self.global_batch
        return self._order[first : first + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rows": self.rows,
                **batch_state(self.batch_size, self.world_size)}  # fmt: skip

    def load_state_dict(self, state: dict[str, int], what: str = "") -> None:
        """Continues from a saved position; `what` prefixes the error when it belongs to other rows or another seed.
        The position counts rows of the one global order, so under the same global batch another world size
        reshards exactly (`check_global_batch`); another global batch is refused (its epoch tails, and the steps
        the run counts, would differ)."""
        if state.get("rows") != self.rows or state.get("seed") != self.seed:
            raise DanluError(
                f"{what}the checkpoint's data position belongs to other data "
                f"({state.get('rows')} rows, seed {state.get('seed')}; now {self.rows} rows, seed {self.seed})"
            )
        check_global_batch(state, self.batch_size, self.world_size, f"{what.rstrip(': ')} data".strip(),
                           rank=self.rank)  # fmt: skip
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


class TokenRows:
    """Deterministic batches of (input_ids, targets) rows of `seq_len` tokens from one split of a shard folder.

    Each distributed rank takes its own slice of every global batch, so 2 ranks × batch B see exactly the rows
    that 1 rank × batch 2B sees: the property the DDP equivalence test checks.
    """

    def __init__(
        self, shard_dir: str | Path, split: str, seq_len: int, batch_size: int, *, rank: int = 0,
        world_size: int = 1, seed: int = 0, shuffle: bool = True,
    ) -> None:  # fmt: skip
        index = load_index(shard_dir)
        if split not in index["splits"]:
            raise DanluError(f"{shard_dir}: no {split!r} split (has: {', '.join(index['splits'])})")
        self.index = index
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self._arrays = []
        starts = []
        for shard in index["splits"][split]:
            arr = np.memmap(Path(shard_dir) / shard["file"], dtype=index["dtype"], mode="r")
            n_rows = (len(arr) - 1) // seq_len
            self._arrays.append(arr)
            starts.extend((len(self._arrays) - 1, r * seq_len) for r in range(n_rows))
        self._rows = np.array(starts, dtype=np.int64).reshape(-1, 2)
        if len(self._rows) < batch_size * world_size:
            raise DanluError(
                f"{shard_dir}: split {split!r} has {len(self._rows)} rows of {seq_len} tokens, fewer than one global "
                f"batch of {batch_size * world_size}; use more data, a smaller batch_size or a shorter seq_len"
            )
        self.order = RowOrder(len(self._rows), batch_size, rank=rank, world_size=world_size, seed=seed,
                              shuffle=shuffle)  # fmt: skip

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = self.order.next_indices()
        rows = np.stack([self._arrays[s][o : o + self.seq_len + 1] for s, o in self._rows[picked]]).astype(
            np.int64
        )
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "targets": t[:, 1:]}

    def sequential(
        self, max_rows: int | None = None, batch_size: int = 16
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Rows in file order (for evaluation), split across ranks, `batch_size` at a time."""
        n = len(self._rows) if max_rows is None else min(max_rows, len(self._rows))
        mine = np.arange(self.rank, n, self.world_size)
        for i in range(0, len(mine), batch_size):
            rows = np.stack(
                [self._arrays[s][o : o + self.seq_len + 1] for s, o in self._rows[mine[i : i + batch_size]]]
            ).astype(np.int64)
            t = torch.from_numpy(rows)
            yield {"input_ids": t[:, :-1], "targets": t[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)


def tokenize_command(args: argparse.Namespace) -> int:
    files = expand_inputs(args.inputs)
    splits: dict[str, list[Path]] = {"train": files}
    if args.val_fraction > 0:
        splits = _split_by_fraction(files, args.val_fraction, Path(args.out))
    try:
        index = tokenize_corpus(
            splits, args.tokenizer, args.out, text_field=args.text_field, workers=args.workers,
            shard_tokens=args.shard_tokens,
        )  # fmt: skip
    finally:
        shutil.rmtree(Path(args.out).with_name(f".{Path(args.out).name}.split"), ignore_errors=True)
    for split, st in index["stats"].items():
        print(
            f"{split}: {st['documents']:,} documents, {st['tokens']:,} tokens, {st['bytes'] / max(st['tokens'], 1):.2f} bytes/token"
        )
    print(f"wrote {args.out}")
    return 0


def _split_by_fraction(files: list[Path], fraction: float, out: Path) -> dict[str, list[Path]]:
    """Holds out every k-th document into a validation file (deterministic), written beside the output."""
    from danlu.files import write_jsonl_atomic

    every = max(2, round(1 / fraction))
    train, val = [], []
    for path in files:
        for i, rec in enumerate(read_records(path)):
            (val if i % every == every - 1 else train).append(rec)
    staging = out.with_name(f".{out.name}.split")
    write_jsonl_atomic(staging / "train.jsonl", train)
    write_jsonl_atomic(staging / "val.jsonl", val)
    return {"train": [staging / "train.jsonl"], "val": [staging / "val.jsonl"]}
