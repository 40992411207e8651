"""The data pipeline on datatrove: recipe `data:` section → text shards per domain, dialogs, rejected, stats.

Recipe schema (`data:`; every key optional except `inputs` outside `danlu run`, unknown keys are errors)::

    data:
      inputs:                       # one reader per input; in `danlu run` the default is the world corpus
        - path: dumps/zhwiki.xml.bz2   # a file, a folder (searched recursively) or a glob
          type: wikipedia           # wikipedia | stackexchange | reddit | html | warc | text | jsonl | parquet
          domain: encyclopedia      # default per type (encyclopedia, qa, forum, news, web); rows may carry their own
          lang: auto                # zh | en | auto (detected)
          source: zhwiki            # name used in ids, stats and rejected/ (default: the type)
          text_field: text          # jsonl/parquet
          base_url: null            # wikipedia / stackexchange: url prefix for document urls
          min_answer_score: 0       # stackexchange: best answer needs at least this score (accepted always wins)
          min_turns: 2              # reddit: shortest conversation kept
      clean: {normalize_unicode, remove_control, strip_markup, normalize_whitespace, traditional_to_simplified,
              remove_boilerplate, boilerplate_patterns, mask_emails, mask_phones, mask_ids, *_token}
      filters:
        language: {languages: [zh, en], min_confidence: 0.5, trust_source_lang: false}
        length: {min_chars: 10, max_chars: 1000000}
        english: {gopher_repetition, gopher_quality, fineweb, c4, and their thresholds;   (English docs only)
                  short_domains: [encyclopedia, qa, forum] get the `*_short` thresholds, see EnglishConfig}
        chinese: {enabled, min_han_ratio, min_avg_line_chars, max_dup_line_frac, top_ngrams, dup_ngrams,
                  min_stop_words, stop_words_short_chars, spam_words, max_spam_hits}      (Chinese docs only)
      dedup: {exact: true, url: true, minhash: true | {n_grams: 5, num_buckets: 14, hashes_per_bucket: 8,
              normalize_numbers: false}, top_clusters: 10}
      mix: {weights: {encyclopedia: 0.4, news: 0.3, qa: 0.2, forum: 0.1}, token_budget: null, max_repeat: 4,
            balance: 0.5, seed: 0}
      executor: {type: local | slurm | ray, workers: 1, tasks: null, start_method: fork,
                 options: {}}         # options go to datatrove's executor (slurm: partition, time, …)
      on_error: fail                # or skip: malformed records/files are counted and logged in rejected/read
      format: jsonl                 # or parquet
      tokenizer: null               # a tokenizer.json: exact token counts in stats beside the estimate
      augment: []                   # back_translation | paraphrase | recombine steps over the dialogs (data/augment.py)
      verbose: false                # datatrove's own logging on the console (always in .work/datatrove.log)

Stages (one datatrove executor each, chained; every one runs on the executor chosen, so the same recipe scales from
one process to Slurm or Ray): 0. reddit inputs only: each task parses its share of the reddit files and sends each
record to the task owning its thread (`RedditPartition`); 1. read (dumps are streamed: memory does not grow with a
file), clean, filter, record dedup facts and MinHash signatures (all tasks); 2. datatrove's MinHash buckets, then
candidate pairs verified against full signatures (one task per bucket); 3. datatrove's MinHash clusters, then the
dedup and mix plan (one task each, holding no signatures: see danlu.data.dedup); 4. label, drop duplicates with
datatrove's MinhashDedupFilter, mix and write (all tasks); 5. publish (one task). Duplicate choice and mixing follow
the one-task reading order (input, file, record), so a run on N tasks writes the same documents as a run on one.

Output (the folder given): `text/<domain>/<rank>.jsonl|parquet` (rows: text, id, source, domain, lang, url),
`dialogs/<rank>.jsonl` (OpenAI `messages` rows), `rejected/<step>/<rank>.jsonl` (rows with step and reason),
`stats.json`, `stats.md`. Work happens in `<out>/.work`, and the outputs above appear only when the whole run
has finished; an interrupted run resumes from datatrove's completion markers there (same recipe and inputs).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from danlu import DanluError
from danlu.config import apply_overrides, from_dict, load_recipe
from danlu.data.augment import AugmentStep, run_augment, validate_steps
from danlu.data.clean import CleanConfig, Cleaner, count_in, count_out, doc_tokens, flush_tally, tally
from danlu.data.dedup import (
    ApplyPlan,
    DedupConfig,
    DedupPlan,
    DedupSignatures,
    VerifyPairs,
    datatrove_minhash_config,
    minhash_signature_step,
)
from danlu.data.filters import (
    ChineseQualityFilter,
    FilterConfig,
    LanguageFilter,
    LengthFilter,
    english_filters,
    rejected_writer,
)
from danlu.data.mix import MixConfig
from danlu.data.report import TOKEN_ESTIMATE, build_stats, stats_markdown
from danlu.data.sources import READERS
from danlu.files import write_json_atomic, write_text_atomic

OUTPUTS = ("text", "dialogs", "rejected")
# The layout of `<out>/.work`; a change makes an interrupted run of older code start afresh instead of resuming
# from intermediates it cannot read (2: .meta dedup facts, full signatures, verified pairs, datatrove clusters).
WORK_FORMAT = 2


@dataclass
class InputConfig:
    path: str | list[str]
    type: Literal["wikipedia", "stackexchange", "reddit", "html", "warc", "text", "jsonl", "parquet"] = (
        "jsonl"
    )
    domain: str | None = None
    lang: str | None = None
    source: str | None = None
    text_field: str = "text"
    base_url: str | None = None
    min_answer_score: int = 0
    min_turns: int = 2


@dataclass
class ExecutorConfig:
    type: Literal["local", "slurm", "ray"] = "local"
    workers: int = 1
    tasks: int | None = None  # default: workers (local), 8 (slurm/ray)
    start_method: str = "fork"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    inputs: list[InputConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    on_error: Literal["fail", "skip"] = "fail"
    format: Literal["jsonl", "parquet"] = "jsonl"
    tokenizer: str | None = None
    verbose: bool = False
    keep_work: bool = False  # keep <out>/.work (datatrove logs, signatures) after a successful run
    augment: list[AugmentStep] = field(
        default_factory=list
    )  # steps over the dialogs written (data/augment.py)


def parse_config(cfg: dict[str, Any], where: str = "data") -> DataConfig:
    dc = from_dict(DataConfig, cfg, where)
    if dc.executor.workers < 1:
        raise DanluError(f"{where}.executor.workers: must be at least 1, got {dc.executor.workers}")
    validate_steps(dc.augment)
    return dc


# -- inputs --------------------------------------------------------------------------------------------------


def resolve_files(inp: InputConfig, i: int, base_dir: Path | None) -> list[str]:
    """The files of one input; a clear error for a missing path or a file of the wrong type."""
    where = f"data.inputs[{i}]"
    _, suffixes = READERS[inp.type]
    paths = inp.path if isinstance(inp.path, list) else [inp.path]
    out: list[str] = []
    for raw in paths:
        p = Path(os.path.expanduser(str(raw)))
        if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
            p = base_dir / p
        if any(ch in str(raw) for ch in "*?["):
            found = sorted(glob.glob(str(p if p.is_absolute() else (base_dir or Path()) / p), recursive=True))
            if not found:
                raise DanluError(f"{where}.path: {raw!r} matches no file")
            out += [f for f in found if Path(f).is_file()]
        elif p.is_dir():
            found = sorted(str(q) for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(suffixes))
            if not found:
                raise DanluError(
                    f"{where}.path: folder {p} has no {inp.type} files ({', '.join(suffixes[:4])}…)"
                )
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise DanluError(f"{where}.path: {p}: no such file or folder")
    for f in out:
        if not f.lower().endswith(suffixes):
            raise DanluError(
                f"{where}: {f} is not a {inp.type} file (expected {', '.join(s for s in suffixes if '.' in s[1:] or s)[:80]}…); "
                f"set `type:` to the file's format"
            )
    return out


def make_readers(
    dc: DataConfig, base_dir: Path | None, error_dir: str, partitions: str | None = None
) -> tuple[list[PipelineStep], list[PipelineStep]]:
    """The stage-1 reader of each input, and the steps of the stage before it (`RedditPartition` per reddit input,
    writing under `partitions`): reddit threads span files, so their files are split among tasks there."""
    from danlu.data.sources.reddit import RedditPartition

    if not dc.inputs:
        raise DanluError("data.inputs: no inputs given (a list of {path, type, domain, lang})")
    readers: list[PipelineStep] = []
    before: list[PipelineStep] = []
    names: dict[str, int] = {}
    for i, inp in enumerate(dc.inputs):
        cls, _ = READERS[inp.type]
        files = resolve_files(inp, i, base_dir)
        source = inp.source or cls.source_name
        names[source] = names.get(source, 0) + 1
        if names[source] > 1:
            source = f"{source}{names[source]}"  # two inputs of one type: distinct ids and stats
        lang = None if inp.lang in (None, "auto") else inp.lang
        options = {k: getattr(inp, k) for k in ("text_field", "base_url", "min_answer_score", "min_turns")}
        kw = dict(
            domain=inp.domain,
            lang=lang,
            source=source,
            on_error=dc.on_error,
            error_dir=error_dir,
            input_index=i,
        )
        if inp.type == "reddit" and partitions is not None:
            options["partitions"] = os.path.join(partitions, source)
            before.append(RedditPartition(files, options=options, **kw))  # type: ignore[arg-type]
        readers.append(cls(files, options=options, **kw))  # type: ignore[arg-type]
    return readers, before


# -- steps around the writers --------------------------------------------------------------------------------


def _work_adapter(writer: Any, doc: Document) -> dict[str, Any]:
    return {"text": doc.text, "id": doc.id, "metadata": doc.metadata}


def text_adapter(writer: Any, doc: Document) -> dict[str, Any]:
    m = doc.metadata
    row = {"text": doc.text, "id": doc.id}
    row.update({k: str(m.get(k) or "") for k in ("source", "domain", "lang", "url")})
    return row


class RankFileReader(PipelineStep):
    """Reads back `<folder>/<rank>.jsonl` written by the first stage: the same documents in the same order."""

    type = "📖 - READER"

    def __init__(self, folder: str) -> None:
        self.name = "read:work"
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import orjson  # datatrove's JsonlWriter wrote the file with it

        path = os.path.join(self.folder, f"{rank:05d}.jsonl")
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            for line in f:
                row = orjson.loads(line)
                yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata") or {})


class ResetRank(PipelineStep):
    """Deletes this task's files from an earlier, interrupted attempt, so that a rerun which now writes fewer
    (or no) files leaves nothing stale behind: `<pattern>` globs with `{rank}` (5 digits)."""

    type = "🧹 - RESET"

    def __init__(self, patterns: list[str]) -> None:
        self.name = "reset"
        super().__init__()
        self.patterns = patterns

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for pattern in self.patterns:
            for f in glob.glob(pattern.format(rank=f"{rank:05d}")):
                os.remove(f)
        if data:
            yield from data


class DialogWriter(PipelineStep):
    """Writes documents that carry a conversation to `dialogs/<rank>.jsonl` (OpenAI messages); passes all on."""

    type = "💽 - WRITER"

    def __init__(self, folder: str) -> None:
        self.name = "dialogs"
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        f = None
        try:
            for doc in data:
                msgs = doc.metadata.get("messages")
                if msgs:
                    if f is None:
                        os.makedirs(self.folder, exist_ok=True)
                        f = open(os.path.join(self.folder, f"{rank:05d}.jsonl"), "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
                    row = {"messages": msgs, "id": doc.id}
                    row.update(
                        {
                            k: doc.metadata[k]
                            for k in ("source", "domain", "lang", "url")
                            if doc.metadata.get(k)
                        }
                    )
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    self.stat_update("dialogs")
                yield doc
        finally:
            if f is not None:
                f.close()


class OutputStats(PipelineStep):
    """Counts what is written, by language and domain (and exact tokens when a tokenizer is given)."""

    type = "📊 - STATS"

    def __init__(self, tokenizer: str | None = None) -> None:
        self.name = "output"
        super().__init__()
        self.tokenizer = tokenizer
        self._tok: Any = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.tokenizer and self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer)
        try:
            for doc in data:
                n = doc_tokens(doc)
                m = doc.metadata
                tally(self, "docs")
                tally(self, "chars", len(doc.text))
                tally(self, "tokens", n)
                if m.get("messages"):
                    tally(self, "dialogs")
                for kind in ("lang", "domain"):
                    key = str(m.get(kind) or "unknown")
                    tally(self, f"{kind}:{key}:docs")
                    tally(self, f"{kind}:{key}:chars", len(doc.text))
                    tally(self, f"{kind}:{key}:tokens", n)
                if self._tok is not None:
                    tally(self, "tokens_exact", len(self._tok.encode(doc.text).ids))
                yield doc
        finally:
            flush_tally(self)


class Passthrough(PipelineStep):
    """Counts docs/chars/tokens in and out for a stage boundary (the step table's first row)."""

    type = "📊 - STATS"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        try:
            for doc in data:
                count_in(self, doc)
                count_out(self, doc)
                yield doc
        finally:
            flush_tally(self)


class Publish(PipelineStep):
    """Last stage (one task): writes stats.json/stats.md and moves the finished outputs into the output folder."""

    type = "💽 - WRITER"

    def __init__(self, work: str, out: str, step_order: list[str], token_counter: str) -> None:
        self.name = "publish"
        super().__init__()
        self.work, self.out, self.step_order, self.token_counter = work, out, step_order, token_counter

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        work, out = Path(self.work), Path(self.out)
        stats = build_stats(work / "logs", work / "plan", self.step_order, self.token_counter)
        for name in OUTPUTS:
            src = work / "output" / name
            if name != "rejected" and not src.exists():
                src.mkdir(parents=True)  # an empty result is still a result: later stages glob it
            if not src.exists():
                continue
            dst = out / name
            if dst.exists():
                old = out / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                dst.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            src.rename(dst)
        write_json_atomic(out / "stats.json", stats)
        write_text_atomic(out / "stats.md", stats_markdown(stats))
        return
        yield


# -- building and running ------------------------------------------------------------------------------------


def _executor(dc: DataConfig, pipeline: list[Any], tasks: int, logs: Path, depends: Any, job: str) -> Any:
    ex = dc.executor
    opts = dict(ex.options)
    if ex.type == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=min(ex.workers, tasks), logging_dir=str(logs), depends=depends,
            start_method=ex.start_method, **opts,
        )  # fmt: skip
    if ex.type == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        for key in ("partition", "time"):
            if key not in opts:
                raise DanluError(f"data.executor.options.{key}: required for the slurm executor")
        opts.setdefault("job_name", f"danlu_{job}")
        return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logs), depends=depends, **opts)
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(
        pipeline, tasks=tasks, workers=ex.workers, logging_dir=str(logs), depends=depends, **opts
    )


def build_executors(dc: DataConfig, out: Path, base_dir: Path | None) -> tuple[Any, list[str]]:
    """The chain of datatrove executors (the last one depends on the others) and the step order for stats."""
    work = out / ".work"
    wo = work / "output"
    rej = wo / "rejected"
    tasks = dc.executor.tasks or (dc.executor.workers if dc.executor.type == "local" else 8)
    mh = dc.dedup.minhash_settings()
    mh_cfg = datatrove_minhash_config(mh) if mh else None

    def writer_for(name: str) -> Any:
        return rejected_writer(str(rej / name))

    f = dc.filters
    filters: list[PipelineStep] = [
        LanguageFilter(f.language, writer_for("language")),
        LengthFilter(f.length, writer_for("length")),
    ]
    if f.chinese.enabled:
        filters.append(ChineseQualityFilter(f.chinese, writer_for("chinese")))
    filters += english_filters(f.english, writer_for)
    readers, before = make_readers(dc, base_dir, str(rej / "read"), str(work / "partitions"))
    logs = work / "logs"
    ex = None
    if before:  # reddit: each task parses its share of the files and sends each record to its thread's task
        reset0 = [
            str(work / "partitions" / "*" / "*" / "{rank}.jsonl"),
            str(rej / "read" / "*_{rank}.partition.jsonl"),
        ]
        ex = _executor(dc, [ResetRank(reset0), *before], tasks, logs / "0_partition", None, "partition")
    stage4_rejected = ("dedup", "mix")
    stage1_reset = [str(work / "filtered" / "{rank}.jsonl"), str(rej / "read" / "*_{rank}.jsonl")]
    stage1_rejected = [
        "language",
        "length",
        "chinese",
        "gopher_repetition",
        "gopher_quality",
        "fineweb",
        "c4",
    ]
    stage1_reset += [str(rej / name / "{rank}.jsonl") for name in stage1_rejected]
    stage1: list[Any] = [
        ResetRank(stage1_reset),
        *readers,
        Passthrough("read"),
        Cleaner(dc.clean),
        *filters,
        DedupSignatures(str(work / "meta"), mh_cfg.norm_config if mh_cfg is not None else None),
    ]
    from datatrove.pipeline.writers import JsonlWriter

    stage1.append(
        JsonlWriter(str(work / "filtered"), "${rank}.jsonl", compression=None, adapter=_work_adapter)
    )
    mh_dir = work / "minhash"
    if mh_cfg is not None:
        stage1.append(minhash_signature_step(str(mh_dir / "sigs"), mh_cfg, str(mh_dir / "full")))
    ex = _executor(dc, stage1, tasks, logs / "1_filter", ex, "filter")
    clusters = pairs = None
    if mh_cfg is not None and mh is not None:
        # datatrove's multi-stage MinHash: signatures (above, every task) → buckets → (verify) → clusters; no task
        # holds every signature, and the bucket and verify stages run one task per bucket
        from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster

        buckets = [MinhashDedupBuckets(str(mh_dir / "sigs"), str(mh_dir / "candidates"), config=mh_cfg)]
        ex = _executor(dc, buckets, mh_cfg.num_buckets, logs / "2_buckets", ex, "buckets")
        hashes = mh_cfg.num_buckets * mh_cfg.hashes_per_bucket
        verify = [
            VerifyPairs(
                str(mh_dir / "candidates"), str(mh_dir / "full"), str(mh_dir / "dups"), mh.threshold, hashes
            )
        ]
        ex = _executor(dc, verify, mh_cfg.num_buckets, logs / "2_verify", ex, "verify")
        cluster = [
            MinhashDedupCluster(
                str(mh_dir / "dups"), str(mh_dir / "clusters"), config=mh_cfg, save_cluster_id=True
            )
        ]
        ex = _executor(dc, cluster, 1, logs / "3_cluster", ex, "cluster")
        clusters, pairs = str(mh_dir / "clusters"), (str(mh_dir / "candidates"), str(mh_dir / "dups"))
    remove = str(mh_dir / "remove")
    plan = [DedupPlan(str(work / "meta"), clusters, str(work / "plan"), remove, dc.dedup, dc.mix, pairs)]
    ex = _executor(dc, plan, 1, logs / "3_plan", ex, "plan")
    if dc.format == "parquet":
        from datatrove.pipeline.writers import ParquetWriter

        text_writer: Any = ParquetWriter(str(wo / "text"), "${domain}/${rank}.parquet", adapter=text_adapter)
    else:
        text_writer = JsonlWriter(
            str(wo / "text"), "${domain}/${rank}.jsonl", compression=None, adapter=text_adapter
        )
    from datatrove.pipeline.dedup import MinhashDedupFilter

    stage4_reset = [str(wo / "text" / "*" / "{rank}.*"), str(wo / "dialogs" / "{rank}.jsonl")]
    stage4_reset += [str(rej / name / "{rank}.jsonl") for name in stage4_rejected]
    stage4 = [
        ResetRank(stage4_reset),
        RankFileReader(str(work / "filtered")),
        ApplyPlan(str(work / "plan"), "dedup"),
        MinhashDedupFilter(remove, exclusion_writer=writer_for("dedup")),
        DialogWriter(str(wo / "dialogs")),
        ApplyPlan(str(work / "plan"), "mix", writer_for("mix")),
        OutputStats(dc.tokenizer),
        text_writer,
    ]
    ex = _executor(dc, stage4, tasks, logs / "4_write", ex, "write")
    order = ["read", "clean"] + [s.name for s in filters] + ["dedup", "mix"]
    counter = (
        f"tokenizer {dc.tokenizer} (exact, in tokens_exact_out) and {TOKEN_ESTIMATE}"
        if dc.tokenizer
        else TOKEN_ESTIMATE
    )
    publish = [Publish(str(work), str(out), order, counter)]
    return _executor(dc, publish, 1, logs / "5_publish", ex, "publish"), order


def _fingerprint(dc: DataConfig, base_dir: Path | None) -> str:
    files = []
    for i, inp in enumerate(dc.inputs):
        for f in resolve_files(inp, i, base_dir):
            st = os.stat(f)
            files.append([f, st.st_size, st.st_mtime_ns])
    cfg = asdict(dc)
    cfg.pop("augment", None)  # augmentation runs after the datatrove stages: changing it keeps their work
    payload = json.dumps({"cfg": cfg, "files": files, "work": WORK_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet(logfile: Path, verbose: bool):
    """datatrove logs every task to stderr; send that to a file unless `verbose` (errors still surface)."""
    from loguru import logger

    if verbose:
        yield
        return
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a", encoding="utf-8") as f:
        saved = sys.stderr
        sys.stderr = f
        try:
            logger.remove()
            logger.add(f, level="INFO")
            yield
        finally:
            sys.stderr = saved
            logger.remove()
            logger.add(sys.stderr, level="WARNING")


def prepare_work(dc: DataConfig, out_dir: Path, base_dir: Path | None) -> Path:
    """`<out>/.work`, kept from an interrupted run of the same recipe and inputs (to resume), else fresh."""
    work = out_dir / ".work"
    fp = _fingerprint(dc, base_dir)
    marker = work / "fingerprint.json"
    if work.exists():
        old = json.loads(marker.read_text()) if marker.exists() else {}
        if old.get("fingerprint") != fp:  # different recipe or inputs: an old partial run cannot be resumed
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"fingerprint": fp})
    return work


def run_data(cfg: dict[str, Any], out_dir: Path, *, base_dir: Path | None = None) -> dict[str, Any]:
    """Runs the `data:` section into `out_dir`; returns the stats (also in out_dir/stats.json)."""
    dc = parse_config(cfg)
    out_dir = Path(out_dir)
    work = prepare_work(dc, out_dir, base_dir)
    executor, _ = build_executors(dc, out_dir, base_dir)
    try:
        with _quiet(work / "datatrove.log", dc.verbose):
            executor.run()
    except DanluError:
        raise
    except Exception as e:  # a DanluError raised in a worker process may arrive wrapped
        msg = str(e)
        if "DanluError" in type(e).__name__ or "(set data.on_error" in msg:
            raise DanluError(msg) from None
        raise
    if dc.executor.type != "local":
        return {"submitted": True, "executor": dc.executor.type, "out": str(out_dir)}
    stats_path = out_dir / "stats.json"
    if not stats_path.exists():
        raise DanluError(f"the data pipeline did not finish; see {work / 'datatrove.log'}")
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    _check_not_empty(stats, dc, out_dir)
    if dc.augment:
        stats["augment"] = run_augment(dc.augment, out_dir / "dialogs")
        stats["dialogs_augmented"] = sum(s["dialogs_out"] for s in stats["augment"])
        write_json_atomic(stats_path, stats)
        write_text_atomic(out_dir / "stats.md", stats_markdown(stats))
    if not dc.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def _check_not_empty(stats: dict[str, Any], dc: DataConfig, out_dir: Path) -> None:
    """No records in, or none left after the filters, is an error that says where they went, never a silent 0."""
    if not stats.get("documents_in"):
        errors = stats.get("read_errors", 0)
        raise DanluError(
            f"data: the inputs ({', '.join(str(i.path) for i in dc.inputs)[:300]}) hold no records"
            + (f"; {errors} could not be read (see {out_dir}/errors)" if errors else "")
        )
    if not stats.get("documents_out"):
        removed: dict[str, int] = {}
        for row in stats.get("steps", []):
            for reason, n in row["removed"].items():
                removed[f"{row['step']}:{reason}"] = removed.get(f"{row['step']}:{reason}", 0) + n
        top = ", ".join(f"{k} {v}" for k, v in sorted(removed.items(), key=lambda kv: -kv[1])[:5])
        raise DanluError(
            f"data: all {stats['documents_in']} records were rejected ({top}); see {out_dir}/stats.md and "
            f"{out_dir}/rejected, and relax those filters (e.g. data.filters.…=false) for this kind of text"
        )


def flat_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats as flat metrics for `danlu run`'s stage.json and summary."""
    m: dict[str, Any] = {
        k: stats.get(k, 0)
        for k in ("documents_in", "documents_out", "chars_in", "chars_out", "tokens_in", "tokens_out", "dialogs", "read_errors")
    }  # fmt: skip
    if "dialogs_augmented" in stats:
        m["dialogs_augmented"] = stats["dialogs_augmented"]
    m["docs_kept_fraction"] = round(m["documents_out"] / m["documents_in"], 4) if m["documents_in"] else 0.0
    for row in stats.get("steps", []):
        removed = sum(row["removed"].values())
        if removed:
            m[f"removed_{row['step'].replace(':', '_')}"] = removed
    return m


def prepare_command(recipe: str, out: str | None, workers: int | None, overrides: list[str]) -> int:
    """`danlu data prepare RECIPE`: runs the recipe's `data:` section and prints a summary."""
    data = apply_overrides(load_recipe(recipe), overrides)
    if "data" not in data or not isinstance(data["data"], dict):
        raise DanluError(f"{recipe}: the recipe has no `data:` section")
    cfg = dict(data["data"])
    if workers is not None:
        cfg["executor"] = {**(cfg.get("executor") or {}), "workers": workers}
    recipe_path = Path(recipe)
    base_dir = recipe_path.parent if recipe_path.suffix and recipe_path.exists() else None
    out_dir = Path(out) if out else Path("runs") / recipe_path.stem / "data"
    if not cfg.get("inputs"):
        raise DanluError(f"{recipe}: data.inputs is empty; `danlu data prepare` needs input files")
    stats = run_data(cfg, out_dir, base_dir=base_dir)
    if stats.get("submitted"):
        print(f"[danlu] data pipeline submitted to {stats['executor']}; outputs will appear in {out_dir}")
        return 0
    print(stats_markdown(stats).split("## Languages")[0].rstrip())
    print(f"\n[danlu] wrote {out_dir}/text, dialogs, rejected, stats.json, stats.md")
    return 0
