"""Which model answers a request: named models (`--model NAME=CHECKPOINT`), and confidence fallback.

A fine-tuned model can be sure of what it learned and unsure elsewhere. With `fallback` set, a model's answer
whose confidence — the mean log-probability of its sampled tokens — is below `min_logprob` is replaced by its
base model's answer to the same prompt. The response's `model` field names the model that actually answered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")


@dataclass
class ServedModel:
    """A loaded checkpoint and the worker thread that generates with it."""

    name: str
    path: str
    tokenizer: Any
    context_length: int
    worker: Any  # engine.ModelWorker
    meta: dict[str, Any] = field(default_factory=dict)
    created: int = 0
    fallback: str | None = None
    min_logprob: float | None = None
    parent: str | None = None  # an adapter's base model (served under that name), as vLLM lists LoRA modules

    def card(self) -> dict[str, Any]:
        """The /v1/models entry."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "danlu",
            "context_length": self.context_length,
            "chat": bool(self.meta.get("chat", True)),
            "fallback": self.fallback,
            "parent": self.parent,
            **({"adapter": self.meta["adapter"].get("method")} if self.meta.get("adapter") else {}),
        }


def parse_model_specs(checkpoints: list[str], named: list[str]) -> list[tuple[str, str]]:
    """`CHECKPOINT` positionals and `NAME=CHECKPOINT` options → [(name, path)], names unique and well formed."""
    specs: list[tuple[str, str]] = []
    for path in checkpoints:
        specs.append((Path(path).resolve().name, path))
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DanluError(f"--model {item!r}: expected NAME=CHECKPOINT")
        specs.append((name, path))
    if not specs:
        raise DanluError("no model to serve: give a CHECKPOINT folder or --model NAME=CHECKPOINT")
    seen: set[str] = set()
    for name, _ in specs:
        if not _NAME.match(name):
            raise DanluError(
                f"model name {name!r}: use letters, digits and . _ - : / (at most 128 characters)"
            )
        if name in seen:
            raise DanluError(f"model name {name!r} given twice; name them with --model NAME=CHECKPOINT")
        seen.add(name)
    return specs


def parse_fallbacks(items: list[str], names: list[str]) -> dict[str, str]:
    """`FINETUNED=BASE` options → {finetuned: base}, both names served."""
    out: dict[str, str] = {}
    for item in items:
        a, sep, b = item.partition("=")
        if not sep:
            raise DanluError(f"--fallback {item!r}: expected MODEL=BASE_MODEL (names given with --model)")
        for n in (a, b):
            if n not in names:
                raise DanluError(
                    f"--fallback {item!r}: no served model named {n!r}; served: {', '.join(names)}"
                )
        if a == b:
            raise DanluError(f"--fallback {item!r}: a model cannot fall back to itself")
        out[a] = b
    return out


def mean_logprob(completion: Any) -> float | None:
    lps = list(getattr(completion, "logprobs", None) or [])
    return sum(lps) / len(lps) if lps else None


def confident(model: ServedModel, completion: Any) -> bool:
    """True when no fallback applies: no threshold, no log-probs, or mean log-prob at or above the threshold."""
    if model.fallback is None or model.min_logprob is None:
        return True
    m = mean_logprob(completion)
    return m is None or m >= model.min_logprob


def load_served_model(
    name: str, path: str, *, device: str = "cpu", max_active: int = 64, compile: bool = False,
    engine: str = "thread", threads: int | None = None,
) -> ServedModel:  # fmt: skip
    """Loads a checkpoint (danlu.io) and starts its generation worker; `compile` compiles its decode step now.
    `engine="process"` runs the model in a process of its own (danlu.serve.engine_process: what `danlu serve`
    does, so that the event loop and the decode loop do not share one GIL; `threads` its CPU threads, see
    `engine_threads`); "thread" in a thread of this one."""
    import time

    from danlu.io import resolve_checkpoint
    from danlu.serve.engine import ModelWorker
    from danlu.serve.engine_process import EngineSpec, ProcessWorker, served_generator

    if engine == "process":
        folder = resolve_checkpoint(path)  # a hub id downloads here, once, its messages in the server's terminal
        if not folder.is_dir():  # said before an engine process starts for nothing
            raise DanluError(f"{path}: no such checkpoint folder")
        worker = ProcessWorker(EngineSpec(name, str(folder), str(device), compile, max_active, threads))
        tokenizer, context, meta = (
            worker.info["tokenizer"],
            worker.info["context_length"],
            worker.info["meta"],
        )
    elif engine == "thread":
        gen, ckpt = served_generator(name, str(path), str(device), compile)
        worker = ModelWorker(gen, name=name, max_active=max_active)
        tokenizer, context = ckpt.tokenizer, int(ckpt.config.max_position_embeddings)
        meta = dict(ckpt.meta or {})
    else:
        raise DanluError(f"engine must be process or thread, not {engine!r}")
    return ServedModel(name=name, path=str(path), tokenizer=tokenizer, context_length=context, worker=worker,
                       meta=meta, created=int(time.time()))  # fmt: skip


def parse_ensembles(
    items: list[str], weights: list[str], taken: list[str]
) -> list[tuple[str, list[str], list[float] | None]]:
    """`NAME=A,B[,C]` options and `[NAME=]W1,W2` weights → [(name, member paths, weights or None)]. A weight list
    without a name belongs to the only ensemble; names must not clash with served models."""
    from danlu.ensemble import parse_members

    out: list[tuple[str, list[str], list[float] | None]] = []
    names = list(taken)
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name or not members:
            raise DanluError(f"--ensemble {item!r}: expected NAME=CHECKPOINT,CHECKPOINT[,…]")
        if not _NAME.match(name):
            raise DanluError(
                f"ensemble name {name!r}: use letters, digits and . _ - : / (at most 128 characters)"
            )
        if name in names:
            raise DanluError(
                f"model name {name!r} given twice; give each --model and --ensemble its own name"
            )
        names.append(name)
        out.append((name, parse_members(members)[0], None))
    for item in weights:
        name, sep, values = item.rpartition("=")
        if not sep:
            if len(out) != 1:
                raise DanluError(f"--weights {item!r}: with {len(out)} ensembles, write --weights NAME=W1,W2")
            name = out[0][0]
        k = next((i for i, e in enumerate(out) if e[0] == name), None)
        if k is None:
            raise DanluError(f"--weights {item!r}: no ensemble named {name!r}; ensembles: "
                             f"{', '.join(e[0] for e in out) or '-'}")  # fmt: skip
        out[k] = (name, *parse_members(",".join(out[k][1]), values))
    return out


def load_served_ensemble(
    name: str,
    paths: list[str],
    weights: list[float] | None = None,
    *,
    device: str = "cpu",
    max_active: int = 64,
) -> ServedModel:
    """Loads the members (danlu.ensemble) and starts one generation worker for the ensemble; it decodes eagerly
    (each member's decode step would need its own compiled graph)."""
    import time

    from danlu.ensemble import load_ensemble
    from danlu.generate import Generator
    from danlu.serve.engine import ModelWorker

    ckpt = load_ensemble(paths, weights, device=device)
    worker = ModelWorker(Generator(ckpt.model, ckpt.tokenizer), name=name, max_active=max_active)
    return ServedModel(name=name, path=",".join(paths), tokenizer=ckpt.tokenizer,
                       context_length=int(ckpt.config.max_position_embeddings), worker=worker, meta=ckpt.meta,
                       created=int(time.time()))  # fmt: skip
