"""Data at scale (issue 19): dumps are streamed in bounded memory, reddit files are split among tasks, MinHash
dedup runs as datatrove's multi-stage signatures → buckets → clusters → filter over several tasks, and a
several-task run of a recipe writes the same output as a one-task run."""

from __future__ import annotations

import bz2
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from fixtures_data import (
    reddit_records,
    web_rows,
    world_like_rows,
    write_jsonl,
    write_stackexchange,
    write_wikipedia,
)

from danlu import DanluError
from danlu.data.dedup import sort_records
from danlu.data.pipeline import run_data
from danlu.data.sources import READERS
from danlu.data.sources.reddit import RedditPartition, RedditReader

WORDS = [
    "river",
    "mountain",
    "library",
    "council",
    "budget",
    "forest",
    "winter",
    "harbor",
    "market",
    "bridge",
    "garden",
    "museum",
    "station",
    "teacher",
    "doctor",
    "farmer",
    "engineer",
    "painter",
    "student",
    "village",
    "island",
    "valley",
    "desert",
    "castle",
    "tower",
]
ADJS = [
    "old",
    "new",
    "small",
    "large",
    "quiet",
    "busy",
    "green",
    "bright",
    "cold",
    "warm",
    "narrow",
    "famous",
]
TEMPLATES = (
    "The {a} {n} is near the {m}, and many people go there in the {s}.",
    "A {b} {m} stands beside every {n} that we saw on our trip {k} years ago.",
    "When the {n} was {a}, nobody in the {m} wanted to talk about it with us.",
    "Our {m} has a {b} {n} which the children like to visit after school.",
)


def _text(i: int, n: int = 40) -> str:
    """About `n` words of plain sentences that differ between documents (seeded by `i`)."""
    import random

    rng = random.Random(i)
    out: list[str] = []
    while sum(len(x.split()) for x in out) < n:
        t = rng.choice(TEMPLATES)
        n1, m1, s1 = rng.sample(WORDS, 3)
        out.append(t.format(a=rng.choice(ADJS), b=rng.choice(ADJS), n=n1, m=m1, s=s1, k=rng.randint(2, 90)))
    return " ".join(out) + f" (note {i})"


def _row(**attrs: object) -> str:
    return (
        "  <row "
        + " ".join(f'{k}="{escape(str(v), {chr(34): "&quot;"})}"' for k, v in attrs.items())
        + " />\n"
    )


def posts_rows(questions: int, lag: int = 50) -> Iterator[tuple[str, dict]]:
    """Posts.xml rows in Id order: question q gets two answers `lag` questions later (answers far from their
    questions are what forces a reader to hold questions); every third question accepts its lower-scored answer,
    every seventh gets none."""
    next_id = 10**6
    for q in range(questions + lag):
        if q < questions:
            accepted = next_id + 2 * q + 1 if q % 3 == 0 else ""
            row = dict(Id=q + 1, PostTypeId=1, Score=1, Title=f"Question {q}", Body=f"<p>{_text(q)}</p>")
            if accepted:
                row["AcceptedAnswerId"] = accepted
            yield "q", row
        p = q - lag
        if p >= 0 and p % 7:
            for k, score in ((0, 5), (1, 2)):
                body = f"<p>Answer {k} to {p}: {_text(p + 1000 * (k + 1))}</p>"
                yield "a", dict(Id=next_id + 2 * p + k, PostTypeId=2, ParentId=p + 1, Score=score, Body=body)


def write_posts(path: Path, questions: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        for _, row in posts_rows(questions):
            f.write(_row(**row))
        f.write("</posts>\n")
    return path


def expected_answers(questions: int) -> dict[str, str]:
    """What the reader must pick, computed in memory: the accepted answer, else the best-scored one."""
    best: dict[str, tuple[int, str]] = {}
    accepted = {}
    for kind, row in posts_rows(questions):
        if kind == "q" and row.get("AcceptedAnswerId"):
            accepted[str(row["AcceptedAnswerId"])] = str(row["Id"])
        elif kind == "a":
            qid = str(row["ParentId"])
            score = 1 << 30 if str(row["Id"]) in accepted else int(row["Score"])
            if qid not in best or score > best[qid][0]:
                best[qid] = (score, row["Body"][3:-4])
    return {q: body for q, (_, body) in best.items()}


def write_wiki(path: Path, pages: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n')
        for i in range(pages):
            body = escape(f"'''Page {i}''' is about [[{WORDS[i % len(WORDS)]}]]. {_text(i)}")
            f.write(f"<page><title>Page {i}</title><ns>0</ns><id>{i + 1}</id><revision><id>{i}</id>")
            f.write(f'<text xml:space="preserve">{body}</text></revision></page>\n')
        f.write("</mediawiki>\n")
    return path


def peak_python_memory(kind: str, path: Path) -> tuple[int, int]:
    """(documents, peak bytes allocated by Python) while reading `path` with the `kind` reader."""
    cls, _ = READERS[kind]
    tracemalloc.start()
    try:
        n = sum(1 for _ in cls([str(path)])(None, 0, 1))
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- streaming -----------------------------------------------------------------------------------------------


def test_stackexchange_is_streamed_with_the_same_answers(tmp_path):
    """The reader spills questions to SQLite: Python memory stays flat as the file grows 8× (it held every
    question and answer before), and the answers chosen are the in-memory rule's."""
    small, big = (
        write_posts(tmp_path / "s" / "Posts.xml", 400),
        write_posts(tmp_path / "b" / "Posts.xml", 3200),
    )
    cls, _ = READERS["stackexchange"]
    docs = list(cls([str(small)])(None, 0, 1))
    want = expected_answers(400)
    assert len(docs) == len(want) and [d.id for d in docs] == [f"stackexchange:{q}" for q in want]
    for d in docs:
        assert d.metadata["messages"][1]["content"] == want[d.id.split(":")[1]]
    by_id = {d.id: d.metadata["messages"][1]["content"] for d in docs}
    assert "stackexchange:1" not in by_id  # question 0 has no answer
    assert by_id["stackexchange:4"].startswith("Answer 1 to 3")  # accepted, though the lower score
    assert by_id["stackexchange:2"].startswith("Answer 0 to 1")  # no accepted answer: the best score
    (n_small, peak_small), (n_big, peak_big) = (peak_python_memory("stackexchange", p) for p in (small, big))
    assert n_big > 7 * n_small
    assert peak_big < 1.5 * peak_small, (peak_small, peak_big)


def test_wikipedia_is_streamed(tmp_path):
    small, big = write_wiki(tmp_path / "s.xml", 500), write_wiki(tmp_path / "b.xml", 4000)
    (n_small, peak_small), (n_big, peak_big) = (peak_python_memory("wikipedia", p) for p in (small, big))
    assert (n_small, n_big) == (500, 4000)
    assert peak_big < 1.5 * peak_small, (peak_small, peak_big)


# -- reddit split among tasks --------------------------------------------------------------------------------


def write_reddit_split(folder: Path, threads: int = 12) -> list[Path]:
    """Submissions and comments in separate files (as pushshift publishes them): a thread spans files."""
    subs, comments = [], []
    for t in range(threads):
        subs.append(
            {"id": f"t{t}", "title": f"Thread {t}: {_text(t, 8)}", "selftext": _text(t + 50), "score": 3}
        )
        for c in range(3):
            parent = f"t3_t{t}" if c == 0 else f"t1_t{t}c{c - 1}"
            body = _text(t * 10 + c + 100)
            comments.append(
                {"id": f"t{t}c{c}", "link_id": f"t3_t{t}", "parent_id": parent, "score": 5, "body": body}
            )
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in (("RS_2024-01.jsonl", subs), ("RC_2024-01.jsonl", comments[::2]), ("RC_2024-02.jsonl", comments[1::2])):  # fmt: skip
        files.append(write_jsonl(folder / name, rows))
    return files


def test_reddit_files_are_split_among_tasks(tmp_path):
    files = [str(f) for f in write_reddit_split(tmp_path / "rd")]
    lines = sum(len(Path(f).read_text().splitlines()) for f in files)
    one = {d.id: d for d in RedditReader(files)(None, 0, 1)}
    assert len(one) == 12
    world, options = 3, {"partitions": str(tmp_path / "parts")}
    parsed = 0
    for rank in range(world):
        step = RedditPartition(files, options=options)
        list(step(None, rank, world))
        parsed += step.stats["records_partitioned"].total
        assert len(step.files_for_rank(rank, world)) == 1  # each task parses one of the three files
    assert parsed == lines  # every record parsed once in all, not once per task
    got = {}
    for rank in range(world):
        for d in RedditReader(files, options=options)(None, rank, world):
            assert d.id not in got  # each thread is built by exactly one task
            got[d.id] = d
    assert got.keys() == one.keys()
    assert all(got[k].text == one[k].text and got[k].metadata == one[k].metadata for k in one)


# -- several tasks = one task --------------------------------------------------------------------------------


def scale_inputs(d: Path) -> list[dict]:
    """Two JSONL inputs whose twins sit in different inputs (so a task's files are not in reading order), a
    Wikipedia dump, Posts.xml and reddit files split by kind."""
    rows = {r["id"]: r for r in web_rows()}
    a = [["zh-news", "en-news"], ["zh-art", "en-art"], ["en-news-exact", "zh-spam"], ["ja", "zh-news-url"]]
    for i, ids in enumerate(a):
        write_jsonl(d / "a" / f"part{i}.jsonl", [rows[k] for k in ids])
    # B's first file holds near-twins of documents in A's second file: on 4 tasks, task 0 reads B0 before
    # task 1 reads A1, but in reading order (all of A, then B) A1 comes first, and its documents must be kept
    write_jsonl(d / "b" / "part0.jsonl", [rows["zh-art-near"], rows["en-art-near"]])
    write_jsonl(d / "b" / "part1.jsonl", world_like_rows()[:64])
    write_reddit_split(d / "rd", threads=6)
    write_jsonl(d / "rd" / "RC_2024-03.jsonl", reddit_records())
    return [
        {"path": str(d / "a"), "type": "jsonl"},
        {"path": str(d / "b"), "type": "jsonl"},
        {"path": str(write_wikipedia(d / "wiki", compress=True)), "type": "wikipedia"},
        {"path": str(write_stackexchange(d / "se")), "type": "stackexchange"},
        {"path": str(d / "rd"), "type": "reddit"},
    ]


def output_of(out: Path) -> dict:
    def rows(sub: str) -> list[dict]:
        return sorted(
            (json.loads(line) for f in (out / sub).rglob("*.jsonl") for line in f.read_text().splitlines()),
            key=lambda r: (r["id"], r.get("step", ""), json.dumps(r, sort_keys=True)),
        )

    stats = json.loads((out / "stats.json").read_text())
    keep = (
        "documents_in",
        "documents_out",
        "tokens_out",
        "dialogs",
        "removed_by_reason",
        "mix",
        "minhash_pairs",
    )
    clusters = sorted((c["size"], c["kept_id"]) for c in stats["largest_duplicate_clusters"])
    return {"text": rows("text"), "dialogs": rows("dialogs"), "rejected": rows("rejected"),
            "stats": {k: stats[k] for k in keep}, "clusters": clusters}  # fmt: skip


def test_several_tasks_write_what_one_task_writes(tmp_path):
    """datatrove's local executor with 4 tasks on 2 workers — the shape of a Slurm or Ray run — against 1 task:
    the same documents, dialogs, rejected rows (with reasons) and stats, and the same twin kept."""
    cfg = {
        "inputs": scale_inputs(tmp_path / "in"),
        "mix": {"weights": {"encyclopedia": 0.5, "news": 0.2, "qa": 0.2, "forum": 0.1}, "token_budget": 4000},
        "filters": {"english": {"gopher_repetition": False}},  # the generated threads reuse four templates
        "keep_work": True,
    }
    one = run_data({**cfg, "executor": {"workers": 1, "tasks": 1}}, tmp_path / "one")
    run_data({**cfg, "executor": {"workers": 2, "tasks": 4}}, tmp_path / "many")
    a, b = output_of(tmp_path / "one"), output_of(tmp_path / "many")
    for part in a:
        assert a[part] == b[part], part
    kept = {r["id"] for r in a["text"]}
    assert {"text:zh-art", "text:en-art"} <= kept and not {"text2:zh-art-near", "text2:en-art-near"} & kept
    reasons = {(r["id"], r["reason"]) for r in a["rejected"] if r["step"] == "dedup"}
    assert {("text2:zh-art-near", "near_duplicate"), ("text:en-news-exact", "exact_duplicate")} <= reasons
    assert one["removed_by_reason"]["mix/mix_downsampled"] > 0
    assert (
        len(a["dialogs"]) == 9
    )  # 7 reddit threads and 2 Stack Exchange questions (dialogs are written before the mix)
    # the multi-task run really ran datatrove's MinHash stages across tasks
    work = tmp_path / "many" / ".work"
    assert len(list((work / "minhash" / "sigs" / "bucket_000").glob("*.minhash.sig"))) == 4
    for stage, tasks in (
        ("0_partition", 4),
        ("1_filter", 4),
        ("2_buckets", 14),
        ("2_verify", 14),
        ("3_cluster", 1),
    ):
        assert len(list((work / "logs" / stage / "completions").iterdir())) == tasks, stage
    assert list((work / "minhash" / "clusters").glob("*.clusters"))
    assert sorted(p.name for p in (work / "minhash" / "remove").iterdir()) == [
        f"{r:06d}.remove" for r in range(4)
    ]


# -- memory that does not grow with the document count --------------------------------------------------------


def test_minhash_buckets_are_sorted_as_datatrove_sorts_them_in_bounded_memory(tmp_path):
    """Stage 1 sorts each MinHash bucket file by every field in order, as datatrove does, but from runs of a chunk
    each: the same bytes, in the memory of about one chunk (datatrove's sort read the whole file)."""
    dtype = np.dtype([(f"field{i + 1}", "<u8") for i in range(8)] + [("field9", "<u4")])
    rng = np.random.default_rng(0)
    rows = np.zeros(100_000, dtype=dtype)
    for i in range(8):  # few values in the first fields: runs of equal prefixes that span chunks
        rows[f"field{i + 1}"] = rng.integers(0, 3 if i < 2 else 2**63, len(rows), dtype=np.uint64)
    rows["field9"] = rng.permutation(len(rows))
    path = tmp_path / "00000.minhash.sig"
    rows.tofile(path)
    tracemalloc.start()
    try:
        sort_records(str(path), dtype, chunk=16384)  # 7 runs
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.fromfile(path, dtype=dtype).tobytes() == np.sort(rows, order=dtype.names).tobytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the runs are gone
    assert peak < 1.5 * 16384 * dtype.itemsize < rows.nbytes / 4, (peak, rows.nbytes)  # about one chunk


def test_pipeline_minhash_files_do_not_depend_on_the_sort_chunk(tmp_path, monkeypatch):
    """A run whose bucket files are merged from many sorted runs writes the files an in-memory sort writes."""
    import danlu.data.dedup as dedup

    cfg = {
        "inputs": [{"path": str(write_posts(tmp_path / "in" / "Posts.xml", 300)), "type": "stackexchange"}]
    }

    def minhash_files(out: Path) -> dict[str, bytes]:
        run_data({**cfg, "keep_work": True}, out)
        found = (out / ".work" / "minhash").rglob("*")
        return {
            str(f.relative_to(out)): f.read_bytes() for f in found if f.suffix in (".sig", ".dups", ".remove")
        }

    whole = minhash_files(tmp_path / "whole")
    monkeypatch.setattr(dedup, "SORT_CHUNK", 16)
    merged = minhash_files(tmp_path / "merged")
    assert len(whole) > 14 and whole == merged
    buckets = (tmp_path / "merged" / ".work" / "minhash" / "sigs").glob("bucket_*/*")
    assert {f.name for f in buckets} == {"00000.minhash.sig"}  # the next stage reads every file there


def write_meta(folder: Path, rank: int, rows: list[tuple], vocab: dict[str, list[str]]) -> None:
    """A rank's DedupSignatures output: rows of (exact, url, tokens, order, domain, lang) with names, as codes."""
    from danlu.data.dedup import META_DTYPE

    folder.mkdir(parents=True, exist_ok=True)
    meta = np.zeros(len(rows), dtype=META_DTYPE)
    for k, (exact, url, tokens, order, domain, lang) in enumerate(rows):
        d, lg = vocab["domain"].index(domain), vocab["lang"].index(lang)
        meta[k] = (exact, url, tokens, 4 * tokens, k % 7, order, d, lg)
    meta.tofile(folder / f"{rank:05d}.meta")
    (folder / f"{rank:05d}.vocab.json").write_text(json.dumps(vocab))


def test_dedup_plan_keeps_the_first_twin_in_reading_order_in_few_bytes_per_document(tmp_path):
    """DedupPlan, the one task that sees every document, on 200,000 documents in two ranks whose vocabularies
    differ: the twins it drops are those a dict-based union-find drops, the per-domain tokens are right, and its
    peak Python memory is a few dozen bytes per document (a row, strings and sort copies per document before)."""
    from danlu.data.dedup import DedupConfig, DedupPlan
    from danlu.data.mix import MixConfig

    rng = np.random.default_rng(1)
    n = 200_000
    exact = rng.integers(1 << 20, 2**63, n, dtype=np.uint64)
    twins = rng.random(n) < 0.02
    exact[twins] = rng.integers(1, 500, int(twins.sum()))  # 2% share 499 texts
    exact[rng.random(n) < 0.01] = 0  # no text hash: never an exact twin
    url = np.where(rng.random(n) < 0.02, rng.integers(1, 800, n), 0).astype(np.uint64)
    tokens = rng.integers(1, 500, n)
    order = rng.permutation(n).astype(np.uint64)  # reading order is not the ranks' order
    domains, langs = ["encyclopedia", "news", "qa"], ["en", "zh"]
    dom, lang = rng.integers(0, 3, n), rng.integers(0, 2, n)
    half = n // 2
    vocabs = ({"domain": ["qa", "encyclopedia", "news"], "lang": ["zh", "en"]}, {"domain": ["news", "encyclopedia", "qa"], "lang": ["en", "zh"]})  # fmt: skip
    for rank, docs in enumerate((range(half), range(half, n))):
        rows = [(exact[i], url[i], tokens[i], order[i], domains[dom[i]], langs[lang[i]]) for i in docs]
        write_meta(tmp_path / "meta", rank, rows, vocabs[rank])
    plan = DedupPlan(str(tmp_path / "meta"), None, str(tmp_path / "plan"), str(tmp_path / "remove"), DedupConfig(), MixConfig())  # fmt: skip
    tracemalloc.start()
    try:
        for _ in plan.run():
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the reference: a dict union-find over reading order, the earliest document of each group kept
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    first: dict[tuple[str, int], int] = {}
    repeats = np.zeros((n, 2), dtype=bool)  # the document's text hash / URL hash was seen earlier
    for i in np.argsort(order, kind="stable").tolist():
        for j, key in enumerate((("exact", int(exact[i])), ("url", int(url[i])))):
            if key[1]:
                repeats[i, j] = key in first
                r, i_root = find(first.setdefault(key, i)), find(i)
                if r != i_root:
                    parent[max(r, i_root, key=lambda d: order[d])] = min(r, i_root, key=lambda d: order[d])
    removed = np.array([find(i) != i for i in range(n)])
    # a removed document that repeats neither hash was joined through others (A ~text~ B ~url~ C): "near"
    want = np.where(repeats[:, 0], 1, np.where(repeats[:, 1], 2, 3)).astype(np.uint8) * removed
    got = np.concatenate([np.load(tmp_path / "plan" / f"{r:05d}.npz")["reason"] for r in (0, 1)])
    assert (got == 1).sum() > 1000 and (got == 2).sum() > 1000
    np.testing.assert_array_equal(got, want)
    summary = json.loads((tmp_path / "plan" / "summary.json").read_text())
    kept = want == 0
    for d, name in enumerate(domains):
        assert summary["mix"]["domains"][name]["tokens_in"] == int(tokens[kept & (dom == d)].sum())
    assert peak / n < 80, f"{peak / n:.0f} bytes per document"


# -- bad input -----------------------------------------------------------------------------------------------


def test_dump_that_is_not_what_its_name_says_stops_the_run(tmp_path):
    fake = tmp_path / "zhwiki.xml.bz2"
    fake.write_bytes(bz2.decompress(write_wikipedia(tmp_path / "w", compress=True).read_bytes()))
    with pytest.raises(DanluError, match=r"zhwiki\.xml\.bz2: named \.bz2 but not bzip2-compressed"):
        run_data({"inputs": [{"path": str(fake), "type": "wikipedia"}]}, tmp_path / "out")
    html = tmp_path / "Posts.xml"
    html.write_text("<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>")
    with pytest.raises(DanluError, match=r"Posts\.xml: an HTML page, not a Stack Exchange Posts\.xml dump"):
        run_data({"inputs": [{"path": str(html), "type": "stackexchange"}]}, tmp_path / "out2")
