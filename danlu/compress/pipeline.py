"""`danlu compress` and the `compress` stage: subset → prune → distill → quantize, each step measured.

Every step writes a checkpoint folder under `out/` (pruned/, distilled/, int8/, int4/) and one row of the report:
non-embedding and total parameters, weight-file bytes, held-out bits-per-byte and held-out factual accuracy. The
report goes to `out/report.json` and `out/report.md`. Steps switch off one by one (`compress.distill.enabled=false`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.compress.distill import DistillConfig
from danlu.compress.subset import SubsetConfig


@dataclass
class PruneConfig:
    enabled: bool = True
    calibration_rows: int = 1024  # rows of seq_len tokens the importance is measured on
    seq_len: int = 128


@dataclass
class QuantizeConfig:
    enabled: bool = True
    bits: list[int] = field(default_factory=lambda: [8, 4])
    group_size: int = 32  # int4 group along the input (GGUF's block size)


@dataclass
class CompressConfig:
    """Recipe `compress:`; `ratio` sets the student's shape unless `shape` gives it explicitly."""

    teacher: str | None = None
    data: str | None = None  # texts (.jsonl/.txt/.parquet) to select the subset from and distill on
    eval_data: str | None = None  # held-out texts for bits-per-byte
    facts: str | None = None  # held-out factual completions ({prompt, answer(s), lang}) for accuracy
    ratio: float = 10.0
    shape: dict[str, int] | None = (
        None  # hidden_size, intermediate_size, num_hidden_layers, num_attention_heads …
    )
    multiple: int = 64  # widths the ratio's shape rounds to (≥ 32: GGUF blocks)
    eval_tokens: int = 50_000
    eval_facts: int = 200
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    train: dict[str, Any] = field(default_factory=dict)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def teacher_memory(path: Path, dtype_bytes: int = 4, available: int | None = None) -> int:
    """Bytes loading the teacher takes (its weights at `dtype_bytes` per value + 25% for activations and the
    student); refuses, saying how much it needs, when the machine has less free memory."""
    from danlu.io import read_config, weight_files

    cfg = read_config(path)
    stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(
        str(cfg.get("torch_dtype") or cfg.get("dtype")), 4
    )
    params = sum(f.stat().st_size for f in weight_files(path)) / stored
    need = int(params * dtype_bytes * 1.25)
    available = _available_memory() if available is None else available
    if available and need > available:
        raise DanluError(
            f"--teacher {path}: needs about {need / 2**30:.1f} GiB ({params / 1e9:.2f}B parameters × {dtype_bytes} "
            f"bytes + 25% for activations and the student), but only {available / 2**30:.1f} GiB is free; use a "
            "machine with more memory, or run under torchrun with the teacher sharded by FSDP"
        )
    return need


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(
    name: str, model: Any, tokenizer: Any, folder: Path | None, cfg: CompressConfig
) -> dict[str, Any]:
    """One report row: parameters, bytes, held-out bpb and factual accuracy of `model`."""
    from danlu.compress.quantize import state_bytes

    mcfg = model.config
    row: dict[str, Any] = {
        "model": name, "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(embeddings=False),
        "bytes": weight_bytes(folder) if folder is not None else state_bytes(model),
    }  # fmt: skip
    model.eval()
    if cfg.eval_data:
        from danlu.eval.bpb import evaluate_bpb

        res = evaluate_bpb(
            model, tokenizer, cfg.eval_data, seq_len=cfg.prune.seq_len, max_tokens=cfg.eval_tokens
        )
        row.update(val_bpb=res["bpb"], eval_tokens=res["n"])
    if cfg.facts and cfg.eval_facts:
        from danlu.eval.generative import completion_accuracy
        from danlu.files import read_records
        from danlu.generate import Generator

        rows = list(read_records(Path(cfg.facts)))[: cfg.eval_facts]
        res = completion_accuracy(Generator(model, tokenizer), rows, max_tokens=16)
        row.update(fact_accuracy=res["accuracy"], fact_rows=len(rows))
    print("[danlu] compress: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()))  # fmt: skip
    return row


def _read_texts(path: str, field_name: str) -> list[dict[str, Any]]:
    from danlu.files import read_records

    p = Path(path)
    if not p.is_file():
        raise DanluError(f"compress.data: {path}: no such file (texts as .jsonl/.json/.parquet/.txt)")
    if p.suffix in (".txt", ".md"):
        return [{field_name: t} for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return list(read_records(p))


def run_compress(teacher_path: str | Path, out: Path, cfg: CompressConfig, tcfg: Any) -> dict[str, Any]:
    """Runs the enabled steps and writes the report; returns {"rows": [...], step metrics…}. `tcfg` is the
    engine's TrainConfig for distillation (the caller merges the recipe's `train:` sections)."""
    from danlu.compress.distill import PackedRows, distill
    from danlu.compress.importance import measure_importance, require_native
    from danlu.compress.prune import TargetShape, prune, shape_for_ratio
    from danlu.compress.quantize import quantize_model, save_quantized
    from danlu.compress.subset import select_subset
    from danlu.engine import set_seed
    from danlu.eval.bpb import text_batches
    from danlu.files import atomic_path, write_json_atomic, write_jsonl_atomic
    from danlu.io import load_checkpoint, save_model_dir

    teacher_path = Path(teacher_path)
    if not teacher_path.is_dir():
        raise DanluError(f"--teacher {teacher_path}: no such checkpoint folder")
    if not cfg.data:
        raise DanluError(
            "compress: no texts to calibrate and distill on (give --data FILE or compress.data=FILE)"
        )
    if cfg.multiple < 32 or cfg.multiple % 32:
        raise DanluError(
            f"compress.multiple={cfg.multiple}: must be a multiple of 32 (GGUF quantizes in blocks of 32)"
        )
    out.mkdir(parents=True, exist_ok=True)
    teacher_memory(teacher_path)
    ckpt = load_checkpoint(teacher_path, quiet=True)
    teacher, tok = ckpt.model, ckpt.tokenizer
    require_native(teacher, "compress")
    set_seed(cfg.subset.seed)
    rows = [measure("teacher", teacher, tok, teacher_path, cfg)]
    result: dict[str, Any] = {"teacher": str(teacher_path)}

    records = _read_texts(cfg.data, cfg.subset.text_field)
    if cfg.subset.enabled:
        records, report = select_subset(records, cfg.subset, "compress.subset")
        write_jsonl_atomic(out / "subset.jsonl", records)
        result["subset"] = report
        print(f"[danlu] compress: subset of {report['rows_picked']} rows from {report['rows_seen']} "
              f"({report['near_duplicates_skipped']} near-duplicates skipped, {report['groups']} groups)")  # fmt: skip
    texts = [
        str(r[cfg.subset.text_field]) for r in records if isinstance(r, dict) and cfg.subset.text_field in r
    ]
    if not texts:
        raise DanluError(f"compress.data: {cfg.data}: no {cfg.subset.text_field!r} texts")
    seq_len = min(cfg.prune.seq_len, teacher.config.max_position_embeddings)
    calibration = list(text_batches(tok, texts, seq_len, 16, cfg.prune.calibration_rows * seq_len))

    student = teacher
    if cfg.prune.enabled:
        target = (
            TargetShape(**cfg.shape)
            if cfg.shape
            else shape_for_ratio(teacher.config, cfg.ratio, cfg.multiple)
        )
        scores = measure_importance(teacher, calibration)
        student, plan = prune(teacher, scores, target)
        meta = {"stage": "compress.prune", "parent": str(teacher_path), "plan": plan.summary(teacher.config)}
        with atomic_path(out / "pruned") as tmp:
            save_model_dir(tmp, student.state_dict(), student.config, tok, meta, chat=ckpt.is_chat)
        write_json_atomic(out / "pruned" / "importance.json", {"tokens": scores.tokens, **scores.to_dict()})
        rows.append(measure("pruned", student, tok, out / "pruned", cfg))
        result["prune"] = {**plan.summary(teacher.config), "calibration_tokens": scores.tokens,
                           "shape": {k: getattr(student.config, k) for k in TargetShape.__dataclass_fields__}}  # fmt: skip

    if cfg.distill.enabled:
        if student is teacher:
            raise DanluError("compress.distill needs a smaller student: enable compress.prune")
        d_len = min(cfg.distill.seq_len, teacher.config.max_position_embeddings)
        data = PackedRows.from_texts(tok, texts, d_len, tcfg.batch_size, tcfg.seed)
        if cfg.distill.tokens:
            tcfg.steps = max(1, cfg.distill.tokens // (tcfg.batch_size * tcfg.grad_accum * d_len))
        held = None
        if cfg.eval_data:
            held_texts = [
                str(r.get(cfg.subset.text_field, ""))
                for r in _read_texts(cfg.eval_data, cfg.subset.text_field)
            ]
            held = PackedRows(list(text_batches(tok, held_texts, d_len, 16, 16 * d_len)), 1)
        meta = {"stage": "compress.distill", "parent": str(out / "pruned"), "teacher": str(teacher_path)}
        result["distill"] = distill(student, teacher, data, out / "distilled", tcfg=tcfg, cfg=cfg.distill,
                                    tokenizer=tok, meta=meta, eval_rows=held, chat=ckpt.is_chat)  # fmt: skip
        student = student.float()
        rows.append(measure("distilled", student, tok, out / "distilled", cfg))

    if cfg.quantize.enabled:
        source = out / ("distilled" if cfg.distill.enabled else "pruned" if cfg.prune.enabled else "")
        for bits in cfg.quantize.bits:
            base = load_checkpoint(source if source != out else teacher_path, quiet=True)
            q = quantize_model(base.model, bits, cfg.quantize.group_size)
            with atomic_path(out / f"int{bits}") as tmp:
                save_quantized(
                    q, tmp, tok, {"stage": f"compress.int{bits}", "parent": str(source)}, chat=ckpt.is_chat
                )
            rows.append(measure(f"int{bits}", q, tok, out / f"int{bits}", cfg))
    result["rows"] = rows
    write_json_atomic(out / "report.json", result)
    (out / "report.md").write_text(report_table(rows), encoding="utf-8")
    return result


def report_table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (one row per step)."""
    head = "| model | params | non-emb params | bytes | held-out bpb | fact acc |\n|---|---:|---:|---:|---:|---:|\n"

    def cell(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    body = "".join(
        f"| {r['model']} | {cell(r['params'], ',')} | {cell(r['non_embedding_params'], ',')} | {cell(r['bytes'], ',')} | "
        f"{cell(r.get('val_bpb'), '.4f')} | {cell(r.get('fact_accuracy'), '.3f')} |\n"
        for r in rows
    )
    return head + body


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Flat metrics for stage.json: each row's numbers under its model's name."""
    flat: dict[str, Any] = {}
    for r in result.get("rows", []):
        for k, v in r.items():
            if k != "model":
                flat[f"{r['model']}_{k}"] = v
    for step in ("distill",):
        for k, v in (result.get(step) or {}).items():
            flat[f"{step}_{k}"] = v
    return flat
