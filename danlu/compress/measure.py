"""One row of the compress report per model: parameters, bytes, held-out bpb, held-out facts, batch-1 decode speed.

Every step of the pipeline is measured the same way so the rows compare: bits-per-byte on the same held-out texts
and token budget, factual completions on the same held-out rows (the `test` split when the rows carry one, so no
choice is ever tuned on the figures reported), and greedy batch-1 decoding of the same prompt, eager (what
`danlu chat` does on a CPU without compile), median of three rounds after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from danlu.compress.sizes import count_params


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files of a checkpoint folder (safetensors, or a single .gguf file)."""
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def fact_rows(path: str | Path, limit: int, split: str | None) -> tuple[list[dict[str, Any]], str]:
    """The first `limit` held-out factual rows of `split` (all rows when they carry no `split` field), and the name
    of the split used."""
    from danlu.files import read_records

    rows = [r for r in read_records(Path(path)) if isinstance(r, dict)]
    if split and any("split" in r for r in rows):
        return [r for r in rows if r.get("split") == split][:limit], split
    return rows[:limit], "all"


@torch.no_grad()
def decode_speed(
    model: torch.nn.Module, tokenizer: Any, prompt: list[int], new_tokens: int, rounds: int = 3
) -> float:
    """Greedy batch-1 decode tokens/s (eager, no stop tokens), the median of `rounds` after one warm-up."""
    from danlu.generate import Generator, SamplingParams

    gen = Generator(model, tokenizer, compile=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop_token_ids=[])
    gen.generate([prompt], params)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = gen.generate([prompt], params)[0]
        times.append((time.perf_counter() - t0) / max(1, len(out.token_ids)))
    return 1.0 / statistics.median(times)


def measure(
    name: str, model: torch.nn.Module, tokenizer: Any, folder: Path | None, cfg: Any, chat: bool = False,
    say: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """One report row for `model` (eval mode). `cfg` is the CompressConfig (eval_data, eval_tokens, facts, …);
    `folder` the saved weights whose bytes are reported (None: the bytes the tensors take in memory); a `chat`
    model also answers the held-out chat facts when `compress.restore.eval_data` names a world."""
    from danlu.compress.quantize import state_bytes

    quantized = getattr(model, "quantization", None) is not None
    mcfg = model.config
    params = mcfg.num_params() if quantized else count_params(model)
    non_emb = mcfg.num_params(embeddings=False) if quantized else count_params(model, embeddings=False)
    row: dict[str, Any] = {"model": name, "params": params, "non_embedding_params": non_emb,
                           "bytes": weight_bytes(folder) if folder is not None else state_bytes(model)}  # fmt: skip
    model.eval()
    if cfg.eval_data:
        from danlu.eval.bpb import evaluate_bpb

        res = evaluate_bpb(
            model, tokenizer, cfg.eval_data, seq_len=cfg.prune.seq_len, max_tokens=cfg.eval_tokens
        )
        row.update(val_bpb=res["bpb"], eval_tokens=res["n"])
    prompt = [tokenizer.bos_id]
    if cfg.facts and cfg.eval_facts:
        from danlu.eval.generative import completion_accuracy
        from danlu.generate import Generator

        rows, split = fact_rows(cfg.facts, cfg.eval_facts, cfg.facts_split)
        if rows:
            res = completion_accuracy(Generator(model, tokenizer), rows, max_tokens=16)
            row.update(fact_accuracy=res["accuracy"], fact_rows=len(rows), fact_split=split)
            prompt = [tokenizer.bos_id, *tokenizer.encode(str(rows[0]["prompt"]))]
    if chat and cfg.restore.eval_data:
        from danlu.compress.restore import chat_facts

        row.update(chat_facts(model, tokenizer, cfg.restore))
    if cfg.decode_tokens:
        row["decode_tokens_per_s"] = decode_speed(model, tokenizer, prompt, cfg.decode_tokens)
    if say:
        print("[danlu] compress: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()))  # fmt: skip
    return row


def report_table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (one row per step)."""
    head = ("| model | params | non-emb params | bytes | held-out bpb | held-out facts | chat facts | decode tok/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip

    def cell(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    body = "".join(
        f"| {r['model']} | {cell(r.get('params'), ',')} | {cell(r.get('non_embedding_params'), ',')} | "
        f"{cell(r.get('bytes'), ',')} | {cell(r.get('val_bpb'), '.4f')} | {cell(r.get('fact_accuracy'), '.3f')} | "
        f"{cell(r.get('chat_fact_accuracy'), '.3f')} | "
        f"{cell(r.get('decode_tokens_per_s'), ',.0f')} |\n"
        for r in rows
    )
    return head + body
