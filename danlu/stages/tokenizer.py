"""Pipeline stage `tokenizer`: trains the byte-level BPE on the run's text and writes it to `DIR/tokenizer/`.

The training text is the prepared pretraining text (the `data` stage's `text/**/*.jsonl`, or the world corpus'
pretrain.jsonl when there is no data stage), plus the dialogs of world/sft.jsonl so that the words and layout of
conversations (roles, tool calls) get tokens of their own too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.files import read_records
from danlu.pipeline import StageContext

SFT_SHARE = 0.2  # at most this share of max_chars goes to dialogs, the rest to pretraining text


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    max_chars: int = 50_000_000
    min_frequency: int = 2
    max_token_length: int | None = 16  # bytes; about 5 Chinese characters


def capped_texts(paths: Iterable[Path], field: str, budget: int, counter: dict[str, int]) -> Iterator[str]:
    """The `field` strings of records in `paths`, until `budget` characters have been yielded."""
    for path in paths:
        for rec in read_records(path, text_field=field):
            text = rec.get(field)
            if not isinstance(text, str) or not text:
                continue
            if counter["chars"] + len(text) > budget:
                text = text[: budget - counter["chars"]]
            counter["chars"] += len(text)
            counter["docs"] += 1
            yield text
            if counter["chars"] >= budget:
                return


def dialog_texts(path: Path, budget: int, counter: dict[str, int]) -> Iterator[str]:
    """Each dialog of an OpenAI-messages JSONL as plain `role\\ncontent` text, tool calls written out."""
    from danlu.tools import tool_call_text

    for rec in read_records(path):
        parts = []
        for m in rec.get("messages") or []:
            if not isinstance(m, dict):
                continue
            body = m.get("content") if isinstance(m.get("content"), str) else ""
            for call in m.get("tool_calls") or []:
                fn = call.get("function", call) if isinstance(call, dict) else {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        args = json.loads(args)
                body += "\n" + tool_call_text(str(fn.get("name", "")), args if args is not None else {})
            parts.append(f"{m.get('role', '')}\n{body}")
        text = "\n".join(parts)
        if not text or counter["chars"] + len(text) > budget:
            return
        counter["chars"] += len(text)
        counter["docs"] += 1
        yield text


def read_config(section: dict[str, Any]) -> TokenizerConfig:
    return from_dict(TokenizerConfig, section, "tokenizer")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.tokenizer import Tokenizer

    cfg = read_config(ctx.cfg)
    world = ctx.input("world") if ctx.has("world") else None
    if ctx.has("data"):
        text_dir = ctx.input("data") / "text"
        pretrain = sorted(text_dir.rglob("*.jsonl"))
        if not pretrain:
            raise DanluError(f"{text_dir}: no *.jsonl text files to train the tokenizer on")
    else:
        pretrain = [ctx.input("world") / "pretrain.jsonl"]
    counter = {"chars": 0, "docs": 0}

    def texts() -> Iterator[str]:
        if world is not None and (world / "sft.jsonl").is_file():
            yield from dialog_texts(world / "sft.jsonl", int(cfg.max_chars * SFT_SHARE), counter)
        yield from capped_texts(pretrain, "text", cfg.max_chars, counter)

    tok = Tokenizer.train(texts(), cfg.vocab_size, cfg.min_frequency, max_token_length=cfg.max_token_length)
    tok.save(ctx.out)
    metrics: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "train_chars": counter["chars"],
        "train_docs": counter["docs"],
    }
    val = world / "pretrain_val.jsonl" if world is not None else None
    if val is not None and val.is_file():
        docs = [r["text"] for r in read_records(val) if isinstance(r.get("text"), str)]
        n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
        n_chars = sum(len(d) for d in docs)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        if n_tokens:
            metrics["val_chars_per_token"] = round(n_chars / n_tokens, 3)
            metrics["val_bytes_per_token"] = round(n_bytes / n_tokens, 3)
    print(
        f"[tokenizer] {tok.vocab_size} tokens from {counter['chars']:,} chars ({counter['docs']:,} documents)"
        + (
            f"; {metrics['val_chars_per_token']} chars/token on pretrain_val"
            if "val_chars_per_token" in metrics
            else ""
        )
    )
    return metrics
