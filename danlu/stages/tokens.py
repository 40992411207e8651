"""Pipeline stage `tokens`: the run's pretraining text → packed token shards (train) + held-out shards (val)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import StageContext


@dataclass
class TokensConfig:
    workers: int = 2
    shard_tokens: int = 50_000_000
    inputs: list[str] | None = None  # default: the data stage's text, else the world corpus
    val_inputs: list[str] | None = None  # default: the world corpus' pretrain_val.jsonl


def read_config(section: dict[str, Any]) -> TokensConfig:
    return from_dict(TokensConfig, section, "tokens")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.data.shards import tokenize_corpus
    from danlu.files import expand_inputs

    cfg = read_config(ctx.cfg)
    if cfg.inputs:
        train = expand_inputs(cfg.inputs)
    elif ctx.has("data"):
        train = sorted((ctx.input("data") / "text").rglob("*.jsonl"))
    else:
        train = [ctx.input("world") / "pretrain.jsonl"]
    if cfg.val_inputs:
        val = expand_inputs(cfg.val_inputs)
    elif ctx.has("world"):
        val = [ctx.input("world") / "pretrain_val.jsonl"]
    else:
        raise DanluError("tokens: no validation text; set tokens.val_inputs")
    if not train:
        raise DanluError("tokens: no training text found")
    index = tokenize_corpus(
        {"train": train, "val": val}, ctx.input("tokenizer"), ctx.out, workers=cfg.workers,
        shard_tokens=cfg.shard_tokens,
    )  # fmt: skip
    st = index["stats"]
    return {
        "train_tokens": st["train"]["tokens"],
        "train_documents": st["train"]["documents"],
        "val_tokens": st["val"]["tokens"],
        "bytes_per_token": round(st["train"]["bytes"] / max(1, st["train"]["tokens"]), 3),
    }
