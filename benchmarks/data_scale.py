"""Data at scale: peak memory and MB/s of the Stack Exchange reader and of the whole data pipeline on generated
Posts.xml dumps of growing size, side by side with the reader before streaming (commit 0f3794c, which kept every
question and best answer in Python dicts until the end of the file).

The dump is generated: questions with HTML bodies (paragraphs, code), each with 0–3 answers placed after it, a
tenth of them at the very end of the file (the case that forces a reader to remember questions), accepted
answers on a third of the questions. Each measurement runs in a fresh process, so its peak RSS (VmHWM) is its
own; `base` is the process's RSS after imports, before reading.

    nice python benchmarks/data_scale.py --sizes 50,100,200 --pipeline-sizes 20,80
    nice -n 19 python benchmarks/data_scale.py --sizes "" --pipeline-sizes "" --posts /tmp/big/Posts.xml

The pipeline's rows also give each stage's own peak (`stages`: datatrove's executor folder, e.g. 1_filter,
3_plan → MiB above the RSS after imports), so a peak that grows with the document count is placed in a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "0f3794c"  # the last commit whose Stack Exchange reader held the whole file in dicts
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "an",
    "which",
    "at",
    "not",
    "have",
    "one",
    "can",
    "all",
    "data",
    "model",
    "river",
    "city",
    "library",
    "council",
    "budget",
    "forest",
    "winter",
    "market",
    "bridge",
    "garden",
    "museum",
    "station",
    "teacher",
    "function",
    "variable",
    "list",
    "string",
    "number",
    "value",
    "error",
    "file",
    "server",
    "query",
    "table",
    "index",
    "cache",
    "memory",
    "thread",
    "python",
    "compile",
    "build",
    "test",
    "version",
    "install",
    "module",
    "package",
    "import",
    "class",
    "method",
    "return",
    "loop",
    "sort",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
    return " ".join(words).capitalize() + "."


def _body(rng: random.Random) -> str:
    paras = [
        "<p>" + " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) + "</p>"
        for _ in range(rng.randint(1, 4))
    ]
    if rng.random() < 0.4:
        paras.insert(1, "<pre><code>for x in xs:\n    total += x * 2\nprint(total)</code></pre>")
    return "".join(paras)


def _row(attrs: dict[str, object]) -> str:
    return (
        "  <row "
        + " ".join(f'{k}="{escape(str(v), {chr(34): "&quot;"})}"' for k, v in attrs.items())
        + " />\n"
    )


def generate_posts(path: Path, mb: float, seed: int = 0) -> int:
    """Writes a Posts.xml of about `mb` megabytes; returns the number of questions."""
    rng = random.Random(seed)
    target = int(mb * 1e6)
    size, q, next_id = 0, 0, 1
    pending: list[tuple[int, str]] = []  # (question index it is due after, row) for answers placed later
    late: list[str] = []  # answers written at the very end of the file
    with open(path, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while size < target:
            qid = next_id
            answers = rng.choice((0, 1, 2, 2, 3))
            ids = list(range(qid + 1, qid + 1 + answers))
            next_id += 1 + answers
            attrs: dict[str, object] = {"Id": qid, "PostTypeId": 1, "Score": rng.randint(-2, 50)}
            if ids and rng.random() < 0.33:
                attrs["AcceptedAnswerId"] = rng.choice(ids)
            attrs.update(Title=_sentence(rng)[:120], Body=_body(rng), Tags="<python><data>")
            line = _row(attrs)
            for aid in ids:
                arow = _row(
                    {
                        "Id": aid,
                        "PostTypeId": 2,
                        "ParentId": qid,
                        "Score": rng.randint(-1, 80),
                        "Body": _body(rng),
                    }
                )
                if rng.random() < 0.1:
                    late.append(arow)
                else:
                    pending.append((q + rng.randint(0, 200), arow))
            due = [r for when, r in pending if when <= q]
            pending = [(when, r) for when, r in pending if when > q]
            chunk = line + "".join(due)
            f.write(chunk)
            size += len(chunk.encode())
            q += 1
        f.write("".join(r for _, r in pending) + "".join(late) + "</posts>\n")
    return q


def generate_wiki(path: Path, mb: float, seed: int = 0) -> int:
    """Writes a MediaWiki XML dump of about `mb` megabytes (articles with links, templates and references, and a
    redirect every 20 pages); returns the number of pages."""
    rng = random.Random(seed)
    target = int(mb * 1e6)
    size = n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">\n')
        f.write("<siteinfo><base>https://en.example.org/wiki/Main_Page</base></siteinfo>\n")
        while size < target:
            title = f"Article {n}"
            if n % 20 == 19:
                text = "#REDIRECT [[Article 1]]"
            else:
                paras = [
                    f"{_sentence(rng)} See [[{rng.choice(WORDS)}|{rng.choice(WORDS)}]].{{{{cite|x}}}}"
                    f"<ref>{_sentence(rng)}</ref>"
                    for _ in range(rng.randint(3, 12))
                ]
                text = f"{BOLD}{title}{BOLD} is a page.\n\n== History ==\n" + "\n\n".join(paras)
            page = (
                f"<page><title>{title}</title><ns>0</ns><id>{n + 1}</id><revision><id>{n}</id>"
                f'<text xml:space="preserve">{escape(text)}</text></revision></page>\n'
            )
            f.write(page)
            size += len(page.encode())
            n += 1
        f.write("</mediawiki>\n")
    return n


BOLD = "'" * 3  # wikitext bold


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _old_reader(kind: str) -> type:
    """A reader of commit BEFORE (`stackexchange` or `wikipedia`), loaded from git into a module of its own."""
    src = subprocess.run(
        ["git", "show", f"{BEFORE}:danlu/data/sources/{kind}.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mod = types.ModuleType(f"{kind}_before")
    exec(compile(src, f"{kind}_before.py", "exec"), mod.__dict__)
    return mod.StackExchangeReader if kind == "stackexchange" else mod.WikipediaReader


def _stage_peaks() -> dict[str, float]:
    """Records each datatrove stage's own peak RSS (MiB) into the dict returned, as the pipeline runs.

    With one worker every task runs in this process, one after another: before each task the kernel's peak
    (VmHWM) is read and reset (`/proc/self/clear_refs` 5), and after it VmHWM is that task's peak. The whole run's
    peak is then the largest of them (`_peak_kib`)."""
    from datatrove.executor import LocalPipelineExecutor

    peaks: dict[str, float] = {}
    launch = LocalPipelineExecutor._launch_run_for_rank

    def measured(self: Any, rank: int, *args: Any, **kwargs: Any) -> Any:
        global _PEAK_BEFORE
        _PEAK_BEFORE = max(_PEAK_BEFORE, _status_kib("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        try:
            return launch(self, rank, *args, **kwargs)
        finally:
            stage = Path(str(self.logging_dir.path)).name
            peaks[stage] = max(peaks.get(stage, 0.0), _status_kib("VmHWM") / 1024)

    LocalPipelineExecutor._launch_run_for_rank = measured  # type: ignore[method-assign]
    return peaks


_PEAK_BEFORE = 0  # KiB: the largest VmHWM seen before a reset by _stage_peaks


def _peak_kib() -> int:
    return max(_PEAK_BEFORE, _status_kib("VmHWM"))


def child(mode: str, path: str, work: str) -> None:
    """One measurement in this (fresh) process; prints JSON. Modes: se-reader, se-reader-before, wiki-reader,
    wiki-reader-before, pipeline (the whole data pipeline on one Stack Exchange input, local executor, 1 worker)."""
    from danlu.data.pipeline import run_data
    from danlu.data.sources import READERS

    kind = "wikipedia" if mode.startswith("wiki") else "stackexchange"
    cls = _old_reader(kind) if mode.endswith("-before") else READERS[kind][0]
    stages = _stage_peaks() if mode == "pipeline" else {}
    base = _rss_kib()
    t0 = time.perf_counter()
    if "reader" in mode:
        docs = sum(1 for _ in cls([path])(None, 0, 1))
    else:
        stats = run_data({"inputs": [{"path": path, "type": kind}], "executor": {"workers": 1}}, Path(work))
        docs = stats["documents_out"]
    secs = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would include the parent's RSS at the fork
    # (the generator's). workers=1 runs every task in this process.
    peak = _peak_kib()
    row = {"docs": docs, "seconds": secs, "base_mib": base / 1024, "peak_mib": peak / 1024}
    if stages:
        row["stages"] = {k: round(v - base / 1024, 1) for k, v in stages.items()}
    print(json.dumps(row))


def measure(mode: str, path: Path, work: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, str(path), str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sizes(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sizes", default="50,100,200", help="MB of Posts.xml for the reader, before and after")
    ap.add_argument("--pipeline-sizes", default="20,80", help="MB of Posts.xml for the whole pipeline")
    ap.add_argument("--wiki-sizes", default="", help="MB of a MediaWiki dump for the Wikipedia reader")
    ap.add_argument("--no-before", action="store_true", help="skip the readers of commit " + BEFORE)
    ap.add_argument(
        "--posts", action="append", default=[], help="an existing Posts.xml: the whole pipeline on it"
    )
    ap.add_argument(
        "--tmp", default=None, help="folder for generated dumps and outputs (default: the system's)"
    )
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    load = os.getloadavg()[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}")
    before = [] if args.no_before else ["-before"]
    jobs: dict[tuple[str, float], list[str]] = {}
    for mb in _sizes(args.sizes):
        jobs.setdefault(("posts", mb), []).extend(["se-reader"] + [f"se-reader{b}" for b in before])
    for mb in _sizes(args.pipeline_sizes):
        jobs.setdefault(("posts", mb), []).append("pipeline")
    for mb in _sizes(args.wiki_sizes):
        jobs.setdefault(("wiki", mb), []).extend(["wiki-reader"] + [f"wiki-reader{b}" for b in before])
    rows = []

    def run(modes: list[str], path: Path, records: int | None, out: Path) -> None:
        real_mb = path.stat().st_size / 1e6
        for mode in modes:
            load0 = os.getloadavg()[0]
            r = measure(mode, path, out / f"out-{mode}")
            row = {"mode": mode, "mb": round(real_mb, 1), "records": records, **r,
                   "mb_per_s": real_mb / r["seconds"], "load_start": load0, "load": os.getloadavg()[0]}  # fmt: skip
            rows.append(row)
            shutil.rmtree(out / f"out-{mode}", ignore_errors=True)
            stages = "  stages " + ", ".join(f"{k} +{v:.0f}" for k, v in r.get("stages", {}).items()) if r.get("stages") else ""  # fmt: skip
            print(
                f"{mode:18s} {real_mb:7.1f} MB  {r['docs']:8d} docs  {r['seconds']:7.1f} s  "
                f"{row['mb_per_s']:6.2f} MB/s  RSS after imports {r['base_mib']:4.0f} MiB, "
                f"peak {r['peak_mib']:5.0f} MiB (+{r['peak_mib'] - r['base_mib']:.0f})  load {load0:.1f}→{row['load']:.1f}"
                + stages,
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="danlu-data-scale-", dir=args.tmp) as tmp:
        for (kind, mb), modes in sorted(jobs.items()):
            path = Path(tmp) / f"{kind}{mb:g}" / ("Posts.xml" if kind == "posts" else "enwiki.xml")
            path.parent.mkdir()
            records = (generate_posts if kind == "posts" else generate_wiki)(path, mb)
            run(modes, path, records, path.parent)
            path.unlink()
        for i, posts in enumerate(args.posts):
            run(["pipeline"], Path(posts), None, Path(tmp) / f"given{i}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
