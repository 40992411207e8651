"""`danlu compress` and the `compress` stage: subset → prune → distill → quantize, each step measured.

Every step writes a checkpoint folder under `out/` (pruned/, distilled/, scratch/, int8/, int4/, gguf/) and one row
of the report: non-embedding and total parameters, weight-file bytes, held-out bits-per-byte, held-out factual
accuracy and batch-1 decode tokens/s (`danlu.compress.measure`). Beside the chain run the control (the student's
shape trained from scratch on the distillation's token count) and two options, low-rank factorization and block
sharing, each measured from the distilled student and marked `pays` only if it saves at least `min_saving` of the
non-embedding parameters for at most `max_bpb_cost` of held-out bpb. The report goes to `out/report.json` and
`out/report.md`. Steps switch off one by one (`compress.distill.enabled=false`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.compress.distill import DistillConfig
from danlu.compress.lowrank import LowRankConfig
from danlu.compress.restore import RestoreConfig
from danlu.compress.share import ShareConfig
from danlu.compress.subset import SubsetConfig
from danlu.machine import available_memory


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
class ScratchConfig:
    """Recipe `compress.scratch:`: the from-scratch control (same shape, same tokens as the distillation)."""

    enabled: bool = True
    train: dict[str, Any] = field(
        default_factory=dict
    )  # engine overrides (lr, warmup_steps); never steps/batch


@dataclass
class CompressConfig:
    """Recipe `compress:`; `ratio` sets the student's shape unless `shape` gives it explicitly."""

    teacher: str | None = None
    student: str | None = None  # an existing student checkpoint to distill into (pruning is then skipped)
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
    facts_split: str | None = "test"  # rows of this split when the facts carry a `split` field
    decode_tokens: int = 64  # greedy batch-1 decode measured per row (0: skip)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    factorize: LowRankConfig = field(default_factory=LowRankConfig)
    share: ShareConfig = field(default_factory=ShareConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)  # SFT on dialogs after distillation (off)
    gguf: list[str] = field(default_factory=list)  # GGUF exports of the last float student (q8_0, q4_k_m, …)
    resume: str = "auto"  # auto: go on with an unfinished distillation or control (same settings)
    train: dict[str, Any] = field(default_factory=dict)


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
    available = available_memory() if available is None else available
    if available and need > available:
        raise DanluError(
            f"--teacher {path}: needs about {need / 2**30:.1f} GiB ({params / 1e9:.2f}B parameters × {dtype_bytes} "
            f"bytes + 25% for activations and the student), but only {available / 2**30:.1f} GiB is free; use a "
            "machine with more memory, or run under torchrun with the teacher sharded by FSDP"
        )
    return need


def _read_texts(path: str, field_name: str) -> list[dict[str, Any]]:
    from danlu.files import read_records

    p = Path(path)
    if not p.is_file():
        raise DanluError(f"compress.data: {path}: no such file (texts as .jsonl/.json/.parquet/.txt)")
    if p.suffix in (".txt", ".md"):
        return [{field_name: t} for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return list(read_records(p))


def run_compress(
    teacher_path: str | Path, out: Path, cfg: CompressConfig, tcfg: Any, recipe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runs the enabled steps and writes the report; returns {"rows": [...], step metrics…}. `tcfg` is the
    engine's TrainConfig for distillation (the caller merges the recipe's `train:` sections); `recipe` the whole
    recipe, whose `sft:` section the restore step fine-tunes with.

    Under torchrun every rank trains (distillation, the scratch control, the options' healing); rank 0 alone prunes,
    measures, restores chat (its SFT runs as a launch of its own), quantizes and writes the report, while the
    others wait or, once no step needs them, return."""
    from danlu.compress.distill import PackedRows
    from danlu.compress.importance import require_native
    from danlu.compress.measure import measure, report_table
    from danlu.compress.restore import check_restore, restore_chat
    from danlu.compress.subset import select_subset
    from danlu.engine import init_distributed, resume_wanted, set_seed, single_process, wait_for_main
    from danlu.eval.bpb import text_batches
    from danlu.files import write_json_atomic, write_jsonl_atomic
    from danlu.io import load_checkpoint

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
    check_restore(cfg.restore)
    if cfg.restore.enabled and not cfg.distill.enabled:
        raise DanluError("compress.restore fine-tunes the distilled student: enable compress.distill too")
    out.mkdir(parents=True, exist_ok=True)
    teacher_memory(teacher_path)
    ckpt = load_checkpoint(teacher_path, quiet=True)
    teacher, tok = ckpt.model, ckpt.tokenizer
    require_native(teacher, "compress")
    set_seed(cfg.subset.seed)
    d = init_distributed(tcfg.device)

    def measured(name: str, model: Any, folder: Path | None, chat: bool = False) -> list[dict[str, Any]]:
        """[one report row] on rank 0, measured alone (figures do not split over ranks, and a decode speed taken
        beside other ranks would share their cores); [] elsewhere. `model` must be whole: under torchrun a trained
        one is read back from its folder first (FSDP leaves it sharded, where rank 0 alone could not run it)."""
        return [measure(name, model, tok, folder, cfg, chat=chat)] if d.main else []

    rows = measured("teacher", teacher, teacher_path, chat=ckpt.is_chat)
    result: dict[str, Any] = {"teacher": str(teacher_path)}

    records = _read_texts(cfg.data, cfg.subset.text_field)
    if cfg.subset.enabled:
        records, report = select_subset(records, cfg.subset, "compress.subset")
        result["subset"] = report
        if d.main:
            write_jsonl_atomic(out / "subset.jsonl", records)
            print(f"[danlu] compress: subset of {report['rows_picked']} rows from {report['rows_seen']} "
                  f"({report['near_duplicates_skipped']} near-duplicates skipped, {report['groups']} groups)")  # fmt: skip
    texts = [
        str(r[cfg.subset.text_field]) for r in records if isinstance(r, dict) and cfg.subset.text_field in r
    ]
    if not texts:
        raise DanluError(f"compress.data: {cfg.data}: no {cfg.subset.text_field!r} texts")
    seq_len = min(cfg.prune.seq_len, teacher.config.max_position_embeddings)
    calibration = list(text_batches(tok, texts, seq_len, 16, cfg.prune.calibration_rows * seq_len))

    pruning = cfg.prune.enabled and not cfg.student
    if d.main or not pruning:
        student, student_dir = _make_student(
            teacher, tok, ckpt.is_chat, teacher_path, calibration, out, cfg, result, say=d.main
        )
    wait_for_main(d)
    if pruning and d.world_size > 1:  # rank 0's one plan for all: importance sums can differ in their last bits
        student, student_dir = load_checkpoint(out / "pruned", quiet=True).model.float(), out / "pruned"
    if student is not teacher:
        rows += measured("student" if cfg.student else "pruned", student, student_dir)
    final_dir, chat = (student_dir if student is not teacher else teacher_path), ckpt.is_chat
    base = rows[-1] if rows else {}  # the row the options are judged against: the last float student's

    d_len = min(cfg.distill.seq_len, teacher.config.max_position_embeddings)

    def packed() -> PackedRows:  # the same rows in the same order for every run on them
        return PackedRows.from_texts(tok, texts, d_len, tcfg.batch_size, tcfg.seed)

    world = d.world_size  # the token budget is the global batch's
    if cfg.distill.tokens:
        tcfg.steps = max(1, cfg.distill.tokens // (tcfg.batch_size * tcfg.grad_accum * world * d_len))
    held = None
    if cfg.eval_data:
        held_texts = [
            str(r.get(cfg.subset.text_field, "")) for r in _read_texts(cfg.eval_data, cfg.subset.text_field)
        ]
        held = PackedRows(list(text_batches(tok, held_texts, d_len, 16, 16 * d_len)), 1)
    if cfg.distill.enabled:
        from danlu.compress.distill import distill

        if student is teacher:
            raise DanluError(
                "compress.distill needs a smaller student: enable compress.prune or give compress.student"
            )
        meta = {"stage": "compress.distill", "parent": str(student_dir), "teacher": str(teacher_path)}
        resume = resume_wanted(out / "distilled", cfg.resume, tcfg, "distill")
        result["distill"] = distill(student, teacher, packed(), out / "distilled", tcfg=tcfg, cfg=cfg.distill,
                                    tokenizer=tok, meta=meta, eval_rows=held, chat=ckpt.is_chat,
                                    resume=resume)  # fmt: skip
        global_rows = tcfg.batch_size * tcfg.grad_accum * world
        result["distill"]["tokens"] = result["distill"]["steps"] * global_rows * d_len
        student, student_dir = student.float(), out / "distilled"
        if world > 1:  # FSDP leaves the student and the teacher sharded: the options start from whole copies
            student = load_checkpoint(student_dir, quiet=True).model.float()
            teacher = load_checkpoint(teacher_path, quiet=True).model
        final_dir = student_dir
        rows += measured("distilled", student, student_dir)
        base = rows[-1] if rows else {}
        # a base teacher gets the same fine-tuning too: the student's chat figures are then a share of its own
        controls = {} if ckpt.is_chat else {"teacher + SFT": teacher_path}
        controls["distilled + SFT"] = student_dir
        if cfg.scratch.enabled:
            from danlu.compress.baseline import train_from_scratch

            meta = {"stage": "compress.scratch", "parent": None, "control_of": str(student_dir)}
            scratch_cfg = _scratch_train(tcfg, cfg.scratch.train)
            scratch, result["scratch"] = train_from_scratch(
                student.config, packed(), out / "scratch", tcfg=scratch_cfg, tokenizer=tok, meta=meta,
                chat=ckpt.is_chat, resume=resume_wanted(out / "scratch", cfg.resume, scratch_cfg, "scratch"),
            )  # fmt: skip
            if world > 1:  # as the distilled student: FSDP leaves it sharded
                scratch = load_checkpoint(out / "scratch", quiet=True).model.float()
            rows += measured("scratch", scratch, out / "scratch")
            controls["scratch + SFT"] = out / "scratch"
            del scratch
        if cfg.restore.enabled and d.main:  # the control gets the same fine-tuning, so its chat figures compare
            with single_process():  # the SFT child is a launch of its own, not a third rank of this one
                for name, folder in controls.items():
                    into = out / (("teacher" if folder == teacher_path else folder.name) + "_sft")
                    restored = restore_chat(folder, into, cfg.restore, recipe or {}, out / "restore.log")
                    model = load_checkpoint(restored, quiet=True).model
                    rows.append(measure(name, model, tok, restored, cfg, chat=True))
        if cfg.restore.enabled:
            wait_for_main(d)
            final_dir, chat = out / "distilled_sft", True

    if student is not teacher:
        for name, option in (("low-rank", cfg.factorize), ("shared", cfg.share)):
            if option.enabled:
                row, result[name] = _option(name, option, student, teacher, tok, calibration, packed, held, base,
                                            tcfg, cfg, d)  # fmt: skip
                rows += [row] if d.main else []

    if not d.main:  # what is left is rank 0's alone
        return result
    if cfg.quantize.enabled:
        rows += _quantize(final_dir, tok, chat, out, cfg)
    if cfg.gguf:
        rows += _gguf(final_dir, out, cfg.gguf, result)
    result["rows"] = rows
    write_json_atomic(out / "report.json", result)
    (out / "report.md").write_text(report_table(rows), encoding="utf-8")
    return result


def _scratch_train(tcfg: Any, overrides: dict[str, Any]) -> Any:
    """The distillation's engine config with the control's own optimizer settings; the token budget (steps, batch,
    accumulation) stays the distillation's, which is the point of the control."""
    import dataclasses

    fixed = sorted(k for k in overrides if k in ("steps", "batch_size", "global_batch_size", "grad_accum"))
    unknown = sorted(k for k in overrides if k not in {f.name for f in dataclasses.fields(tcfg)})
    if fixed or unknown:
        why = "cannot differ from the distillation's (equal tokens)" if fixed else "is not a train setting"
        raise DanluError(f"compress.scratch.train: {', '.join(fixed + unknown)} {why}")
    return dataclasses.replace(tcfg, **overrides)


def _make_student(
    teacher: Any, tok: Any, chat: bool, teacher_path: Path, calibration: list, out: Path, cfg: CompressConfig,
    result: dict[str, Any], say: bool = True,
) -> tuple[Any, Path]:  # fmt: skip
    """The student and its folder: `compress.student` loaded (same tokenizer required), or the teacher pruned to
    the target shape, or (neither) the teacher itself."""
    from danlu.compress.distill import check_same_tokenizer
    from danlu.compress.importance import measure_importance, require_native
    from danlu.compress.prune import TargetShape, prune, shape_for_ratio
    from danlu.files import atomic_path, write_json_atomic
    from danlu.io import load_checkpoint, save_model_dir

    if cfg.student:
        path = Path(cfg.student)
        if not path.is_dir():
            raise DanluError(f"compress.student={path}: no such checkpoint folder")
        s = load_checkpoint(path, quiet=True)
        check_same_tokenizer(tok, s.tokenizer, f"compress.student={path}")
        require_native(s.model, "compress.student")
        if say:
            print(f"[danlu] compress: distilling into {path} (compress.student given: pruning skipped)")
        return s.model.float(), path
    if not cfg.prune.enabled:
        return teacher, teacher_path
    target = (
        TargetShape(**cfg.shape) if cfg.shape else shape_for_ratio(teacher.config, cfg.ratio, cfg.multiple)
    )
    scores = measure_importance(teacher, calibration)
    student, plan = prune(teacher, scores, target)
    meta = {"stage": "compress.prune", "parent": str(teacher_path), "plan": plan.summary(teacher.config)}
    with atomic_path(out / "pruned") as tmp:
        save_model_dir(tmp, student.state_dict(), student.config, tok, meta, chat=chat)
    write_json_atomic(out / "pruned" / "importance.json", {"tokens": scores.tokens, **scores.to_dict()})
    result["prune"] = {**plan.summary(teacher.config), "calibration_tokens": scores.tokens,
                       "shape": {k: getattr(student.config, k) for k in TargetShape.__dataclass_fields__}}  # fmt: skip
    return student, out / "pruned"


def _option(
    name: str, option: Any, student: Any, teacher: Any, tok: Any, calibration: list, packed: Any, held: Any,
    base: dict[str, Any], tcfg: Any, cfg: CompressConfig, d: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Low-rank factorization or block sharing applied to a copy of the student, healed by `heal_steps` of
    distillation, measured, and judged against `base` (the row of the model it started from). Under torchrun every
    rank heals, with DDP even under `train.parallel=fsdp` (FSDP2 cannot shard a block that two layers share, and a
    sharded copy could not be measured by rank 0 alone), and rank 0 measures and judges."""
    import copy
    import dataclasses
    import tempfile

    from danlu.compress.measure import measure

    model = copy.deepcopy(student).float()
    if name == "low-rank":
        from danlu.compress.lowrank import factorize_model

        info = factorize_model(model, calibration, option.energy)
    else:
        from danlu.compress.importance import measure_importance
        from danlu.compress.share import share_adjacent_blocks

        info = share_adjacent_blocks(model, measure_importance(student, calibration).layers)
    if option.heal_steps:
        from danlu.compress.distill import distill

        heal_cfg = dataclasses.replace(tcfg, steps=option.heal_steps, eval_every=0, save_minutes=0, parallel="ddp")
        with tempfile.TemporaryDirectory(
            prefix="danlu-heal-"
        ) as tmp:  # not a Llama checkpoint: not kept on disk
            info["heal"] = distill(model, teacher, packed(), Path(tmp) / "model", tcfg=heal_cfg, cfg=cfg.distill,
                                   tokenizer=tok, meta={"stage": f"compress.{name}"}, eval_rows=held)  # fmt: skip
        model = model.float()
    if not d.main:
        return {}, info
    row = measure(name, model, tok, None, cfg)
    saving = 1 - row["non_embedding_params"] / max(1, base["non_embedding_params"])
    info["param_saving"] = saving
    if "val_bpb" in row and "val_bpb" in base:
        info["bpb_cost"] = row["val_bpb"] / base["val_bpb"] - 1
        info["pays"] = saving >= option.min_saving and info["bpb_cost"] <= option.max_bpb_cost
    print(f"[danlu] compress: {name} saves {saving:.1%} of non-embedding parameters for "
          f"{info.get('bpb_cost', float('nan')):+.2%} bpb: {'pays' if info.get('pays') else 'does not pay'}")  # fmt: skip
    return row, info


def _quantize(source: Path, tok: Any, chat: bool, out: Path, cfg: CompressConfig) -> list[dict[str, Any]]:
    """int8 / int4 checkpoints of `source` (reloaded fresh for each width), measured."""
    from danlu.compress.measure import measure
    from danlu.compress.quantize import quantize_model, save_quantized
    from danlu.files import atomic_path
    from danlu.io import load_checkpoint

    rows = []
    for bits in cfg.quantize.bits:
        q = quantize_model(load_checkpoint(source, quiet=True).model, bits, cfg.quantize.group_size)
        with atomic_path(out / f"int{bits}") as tmp:
            save_quantized(q, tmp, tok, {"stage": f"compress.int{bits}", "parent": str(source)}, chat=chat)
        rows.append(measure(f"int{bits}", q, tok, out / f"int{bits}", cfg, chat=chat))
    return rows


def _gguf(source: Path, out: Path, quants: list[str], result: dict[str, Any]) -> list[dict[str, Any]]:
    """GGUF files of `source` through danlu's export (llama.cpp's quantizer for k-quants); rows with their sizes."""
    from danlu.export.gguf import export_gguf

    rows, reports = [], {}
    for quant in quants:
        rep = export_gguf(source, out / "gguf", quant, force=True)
        reports[quant] = {"path": str(rep.path), "bytes": rep.bytes, "quantizer": rep.quantizer,
                          "tensor_types": rep.tensor_types}  # fmt: skip
        rows.append({"model": f"gguf {quant}", "params": rep.n_params, "bytes": rep.bytes})
        print(f"[danlu] compress: wrote {rep.path} ({rep.bytes:,} bytes, {rep.quantizer})")
    result["gguf"] = reports
    return rows


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Flat metrics for stage.json: each row's numbers under its model's name."""
    flat: dict[str, Any] = {}
    for r in result.get("rows", []):
        for k, v in r.items():
            if k != "model":
                flat[f"{r['model'].replace(' ', '_')}_{k}"] = v
    for step in ("distill", "scratch", "low-rank", "shared"):
        for k, v in (result.get(step) or {}).items():
            flat[f"{step}_{k}"] = v
    return flat
