"""Data pipeline throughput: danlu's pipeline vs a plain datatrove pipeline doing the same steps, side by side.

Input: real text from ../shared/data (tinyshakespeare, Chinese poetry, Chinese alpaca instructions) cut into
documents and repeated to about --mb megabytes, with a share of exact and near duplicates. Both pipelines do
the same steps on the same input, on the local executor with the same workers: read JSONL, clean/mask PII, tag
the language (zh/en by script counts) and drop others, Gopher repetition + Gopher quality + FineWeb on English
only, character n-gram repetition rules on Chinese only, MinHash (5-grams, 14 × 8) and write JSONL; both print
how many documents reach dedup, so one can check that they did the same work. danlu also does exact/URL dedup,
verifies MinHash candidates, plans the mix and keeps rejected/ and stats (see run_plain for the mapping).

    nice python benchmarks/data_throughput.py --mb 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def source_texts() -> list[str]:
    docs: list[str] = []
    shakespeare = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
    for i in range(0, len(shakespeare), 12):
        docs.append("\n\n".join(shakespeare[i : i + 12]))
    for f in sorted((SHARED / "chinese_poetry").rglob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        items = data if isinstance(data, list) else [data]
        buf = []
        for it in items:
            if isinstance(it, dict):
                paras = it.get("paragraphs") or it.get("content") or []
                buf.append("\n".join(paras) if isinstance(paras, list) else str(paras))
            if len(buf) == 8:
                docs.append("\n\n".join(x for x in buf if x))
                buf = []
    for f in sorted((SHARED / "alpaca_zh_hikariming").glob("*.json")):
        rows = json.loads(f.read_text(encoding="utf-8"))
        for i in range(0, len(rows), 4):
            docs.append(
                "\n\n".join(
                    f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows[i : i + 4]
                )
            )
    return [d for d in docs if len(d) > 200]


def build_input(folder: Path, mb: float, files: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    base = source_texts()
    target = int(mb * 1e6)
    folder.mkdir(parents=True, exist_ok=True)
    outs = [open(folder / f"part{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]  # noqa: SIM115
    size = n = 0
    while size < target:
        text = rng.choice(base)
        r = rng.random()
        if r < 0.1:  # a near duplicate: a few characters changed
            pos = rng.randrange(len(text))
            text = text[:pos] + "某" + text[pos + 1 :]
        elif r < 0.2:
            text = text + "\n"  # an exact duplicate after normalization
        line = (
            json.dumps({"text": text, "id": f"d{n}", "url": f"https://bench.example/{n}"}, ensure_ascii=False)
            + "\n"
        )
        outs[n % files].write(line)
        size += len(line.encode())
        n += 1
    for f in outs:
        f.close()
    return size


def run_ours(inp: Path, out: Path, workers: int) -> dict[str, int]:
    from danlu.data.pipeline import run_data

    stats = run_data(
        {"inputs": [{"path": str(inp)}], "executor": {"workers": workers, "tasks": workers}}, out
    )
    steps = {s["step"]: s for s in stats["steps"]}
    return {"to_dedup": steps["dedup"]["docs_in"], "out": stats["documents_out"]}


def run_plain(inp: Path, out: Path, workers: int) -> dict[str, int]:
    """The same steps with datatrove's own blocks, as a datatrove user would assemble them for zh + en text.

    datatrove has no offline language ID (its LanguageFilter downloads a fastText model) and no Chinese
    rules, so: a LambdaFilter tags the language by counting scripts (what danlu's identifier does) and drops
    other languages; the English filters only see English (as in danlu, with danlu's default thresholds);
    Chinese gets datatrove's Gopher repetition filter on characters with the thresholds of danlu's Chinese
    n-gram rules; PIIFormatter stands in for cleaning. Then the same MinHash dedup (5-grams, 14 × 8).
    """
    import re

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.filters import (
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LambdaFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from danlu.data.dedup import MinhashSettings, datatrove_minhash_config, stock_minhash_signature_step
    from danlu.data.filters import ChineseConfig, EnglishConfig
    from danlu.data.langid import MixedWordTokenizer

    cfg = datatrove_minhash_config(MinhashSettings())
    en, zh = EnglishConfig(), ChineseConfig()
    words = MixedWordTokenizer()  # datatrove's own English tokenizer needs an NLTK download
    han, latin = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"), re.compile("[A-Za-z]")

    def tag_language(doc) -> bool:  # noqa: ANN001
        h, lat = len(han.findall(doc.text)), len(latin.findall(doc.text)) / 4.5
        doc.metadata["language"] = "zh" if h > lat else "en" if lat > 0 else "unknown"
        return doc.metadata["language"] != "unknown"

    def only(lang: str, f) -> LambdaFilter:  # noqa: ANN001
        return LambdaFilter(lambda doc: doc.metadata["language"] != lang or f.filter(doc) is True)

    filters = [
        only("en", GopherRepetitionFilter(language=words)),
        only("en", GopherQualityFilter(min_doc_words=en.min_doc_words, stop_words=en.stop_words, language=words)),
        only("en", FineWebQualityFilter(char_duplicates_ratio=en.char_duplicates_ratio, language=words)),
        only("zh", GopherRepetitionFilter(
            top_n_grams=tuple((int(n), f) for n, f in zh.top_ngrams),
            dup_n_grams=tuple((int(n), f) for n, f in zh.dup_ngrams), language=words,
        )),
    ]  # fmt: skip
    w = out / "work"
    kw = {"tasks": workers, "workers": workers, "start_method": "fork"}
    s1 = LocalPipelineExecutor(
        [
            JsonlReader(str(inp)),
            PIIFormatter(),
            LambdaFilter(tag_language),
            *filters,
            JsonlWriter(str(w / "filtered"), "${rank}.jsonl", compression=None),
            stock_minhash_signature_step(str(w / "sigs"), cfg),
        ],
        logging_dir=str(w / "logs1"),
        **kw,
    )
    s2 = LocalPipelineExecutor(
        [MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=cfg)],
        tasks=cfg.num_buckets,
        workers=workers,
        start_method="fork",
        logging_dir=str(w / "logs2"),
        depends=s1,
    )
    s3 = LocalPipelineExecutor(
        [MinhashDedupCluster(str(w / "buckets"), str(w / "remove"), config=cfg)],
        tasks=1,
        logging_dir=str(w / "logs3"),
        depends=s2,
    )
    s4 = LocalPipelineExecutor(
        [
            JsonlReader(str(w / "filtered")),
            MinhashDedupFilter(str(w / "remove")),
            JsonlWriter(str(out / "text"), "${rank}.jsonl", compression=None),
        ],
        logging_dir=str(w / "logs4"),
        depends=s3,
        **kw,
    )
    s4.run()
    return {"to_dedup": count_rows(w / "filtered"), "out": count_rows(out / "text")}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def count_rows(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*.jsonl") for _ in open(f, encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of each pipeline (alternating); the best counts"
    )
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found: the benchmark needs ../shared/data")
    tmp = Path(tempfile.mkdtemp(prefix="danlu_bench_"))
    try:
        size = build_input(tmp / "in", args.mb, files=args.workers * 2)
        import contextlib
        import logging

        from loguru import logger

        logging.disable(logging.INFO)
        results: dict[str, tuple[float, dict[str, int]]] = {}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeat):
            for name, fn in (("plain datatrove", run_plain), ("danlu", run_ours)):
                out = tmp / name.replace(" ", "_")
                shutil.rmtree(out, ignore_errors=True)
                with open(os.devnull, "w") as devnull:
                    logger.remove()
                    t0 = time.perf_counter()
                    with contextlib.redirect_stderr(devnull):
                        counts = fn(tmp / "in", out, args.workers)
                    secs = time.perf_counter() - t0
                if name not in results or secs < results[name][0]:
                    results[name] = (secs, counts)
                loads.append(os.getloadavg()[0])
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores visible; python {platform.python_version()}")
        print(f"input: {size / 1e6:.1f} MB JSONL ({args.workers * 2} files), workers={args.workers}")
        print(f"load average (1 min) before/between/after runs: {', '.join(f'{x:.1f}' for x in loads)}")
        for name, (secs, c) in results.items():
            print(
                f"{name:16s} {secs:8.1f} s  {size / 1e6 / secs:7.2f} MB/s  "
                f"({c['to_dedup']:,} documents reach dedup, {c['out']:,} out)"
            )
        ratio = results["plain datatrove"][0] / results["danlu"][0]
        print(f"ratio danlu / plain datatrove (throughput): {ratio:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
