"""The whole data pipeline on datatrove: dedup, rejected reasons, stats, mixing, resume, errors, the stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_data import (
    web_rows,
    world_like_rows,
    write_html,
    write_jsonl,
    write_reddit,
    write_stackexchange,
    write_wikipedia,
)

from danlu import DanluError
from danlu.data.pipeline import build_executors, parse_config, prepare_command, prepare_work, run_data


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.rglob("*.jsonl")) for line in f.read_text().splitlines()]


def web_cfg(tmp_path: Path, **extra) -> dict:
    path = write_jsonl(tmp_path / "in" / "web.jsonl", web_rows())
    return {"inputs": [{"path": str(path), "type": "jsonl"}], **extra}


def test_dedup_filters_and_rejected_reasons(tmp_path):
    out = tmp_path / "out"
    stats = run_data(web_cfg(tmp_path), out)
    kept = {r["id"] for r in rows_of(out / "text")}
    # each near-duplicate pair keeps exactly one twin (the first seen); exact and URL duplicates likewise
    assert "text:zh-art" in kept and "text:zh-art-near" not in kept
    assert "text:en-art" in kept and "text:en-art-near" not in kept
    assert "text:en-news" in kept and "text:en-news-exact" not in kept
    assert "text:zh-news" in kept and "text:zh-news-url" not in kept
    rejected = {r["id"]: (r["step"], r["reason"]) for r in rows_of(out / "rejected")}
    assert rejected == {
        "text:zh-art-near": ("dedup", "near_duplicate"),
        "text:en-art-near": ("dedup", "near_duplicate"),
        "text:en-news-exact": ("dedup", "exact_duplicate"),
        "text:zh-news-url": ("dedup", "url_duplicate"),
        "text:zh-spam": ("filter:chinese", "zh_top_2gram"),
        "text:zh-spam-lines": ("filter:chinese", "zh_dup_lines"),
        "text:ja": ("filter:language", "language_ja"),
    }
    assert all(r["text"] for r in rows_of(out / "rejected"))  # the removed documents themselves are kept
    text_rows = rows_of(out / "text")
    assert set(text_rows[0]) == {"text", "id", "source", "domain", "lang", "url"}
    assert {p.name for p in (out / "text").iterdir()} == {"news", "encyclopedia"}
    # stats: counts per step, reasons, languages, domains, clusters
    assert stats["documents_in"] == 11 and stats["documents_out"] == 4
    steps = {s["step"]: s for s in stats["steps"]}
    assert steps["dedup"]["removed"] == {"near_duplicate": 2, "exact_duplicate": 1, "url_duplicate": 1}
    assert steps["filter:chinese"]["docs_in"] == 10 and steps["filter:chinese"]["docs_out"] == 8
    assert stats["removed_by_reason"]["filter:language/language_ja"] == 1
    assert stats["languages"]["zh"]["docs"] == 2 and stats["languages"]["en"]["docs"] == 2
    assert stats["tokens_out"] > 0 and "estimate" in stats["token_counter"]
    sizes = sorted(c["size"] for c in stats["largest_duplicate_clusters"])
    assert sizes == [2, 2, 2, 2] and all(c["preview"] for c in stats["largest_duplicate_clusters"])
    md = (out / "stats.md").read_text()
    assert "| dedup |" in md and "Largest duplicate clusters" in md
    assert not (out / ".work").exists()


def test_world_like_corpus_is_nearly_all_kept(tmp_path):
    """Templated text (same sentences, different facts) is not near-duplicate text: keep ≥ 90 %."""
    path = write_jsonl(tmp_path / "world" / "pretrain.jsonl", world_like_rows())
    stats = run_data({"inputs": [{"path": str(path)}]}, tmp_path / "out")
    assert stats["documents_in"] == 128
    assert stats["documents_out"] >= 0.9 * 128, stats["removed_by_reason"]


def test_all_sources_together_two_workers(tmp_path):
    d = tmp_path / "in"
    cfg = {
        "inputs": [
            {"path": str(write_wikipedia(d / "wiki", compress=True)), "type": "wikipedia"},
            {"path": str(write_stackexchange(d / "se")), "type": "stackexchange"},
            {"path": str(d / "rd"), "type": "reddit"},
            {"path": str(write_html(d / "news")), "type": "html"},
        ],
        "executor": {"workers": 2},
        "format": "parquet",
    }
    write_reddit(d / "rd", compress=True)
    stats = run_data(cfg, tmp_path / "out")
    assert stats["documents_in"] == 6 and stats["documents_out"] == 6
    assert set(stats["domains"]) == {"encyclopedia", "qa", "forum", "news"}
    dialogs = rows_of(tmp_path / "out" / "dialogs")
    assert len(dialogs) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in dialogs)
    import pyarrow.parquet as pq

    parts = list((tmp_path / "out" / "text").rglob("*.parquet"))
    assert sum(pq.read_table(p).num_rows for p in parts) == 6


def test_mix_weights_and_budget(tmp_path):
    path = write_jsonl(tmp_path / "world.jsonl", world_like_rows())
    mix = {"weights": {"encyclopedia": 0.5, "news": 0.5}, "token_budget": 3000, "max_repeat": 3}
    stats = run_data({"inputs": [{"path": str(path)}], "mix": mix}, tmp_path / "out")
    m = stats["mix"]["domains"]
    assert m["qa"]["tokens_out"] == 0 and m["forum"]["tokens_out"] == 0  # not in the weights: left out
    assert abs(m["encyclopedia"]["tokens_out"] - 1500) < 150 and m["encyclopedia"]["rate"] > 1  # up-sampled
    assert abs(m["news"]["tokens_out"] - 1500) < 150 and m["news"]["rate"] < 1  # down-sampled
    rows = rows_of(tmp_path / "out" / "text")
    assert {r["domain"] for r in rows} == {"encyclopedia", "news"}
    assert len({r["id"] for r in rows}) == len(rows)  # copies get their own ids
    news = [r for r in rows if r["domain"] == "news"]
    assert {r["lang"] for r in news} == {"zh", "en"}  # the subset is balanced across languages
    assert stats["removed_by_reason"]["mix/mix_downsampled"] > 0


def test_rerun_after_interruption_resumes_without_duplicates(tmp_path):
    rows = web_rows()
    a = write_jsonl(tmp_path / "in" / "a.jsonl", rows[:6])
    write_jsonl(tmp_path / "in" / "b.jsonl", rows[6:])
    cfg = {"inputs": [{"path": str(a.parent)}], "executor": {"workers": 1, "tasks": 2}, "keep_work": True}
    fresh = run_data(cfg, tmp_path / "fresh")
    out = tmp_path / "out"
    dc = parse_config(cfg)
    prepare_work(dc, out, None)
    last, _ = build_executors(dc, out, None)
    first = last
    while first.depends is not None:
        first = first.depends
    first._run_for_rank(0)  # the first run died after task 0 of the first stage…
    (out / ".work" / "filtered" / "00001.jsonl").write_text('{"text": "half a li')  # …mid-way through task 1
    done = out / ".work" / "filtered" / "00000.jsonl"
    mtime = done.stat().st_mtime_ns
    assert not (out / "text").exists() and not (out / "stats.json").exists()  # nothing half-written in out/
    stats = run_data(cfg, out)
    assert done.stat().st_mtime_ns == mtime  # task 0 was not redone
    ids = [r["id"] for r in rows_of(out / "text")]
    assert len(ids) == len(set(ids)) == fresh["documents_out"]
    assert stats["documents_in"] == fresh["documents_in"] == 11


def test_on_error_skip_counts_and_fail_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "The first line is fine and long enough to pass."}\n{oops\n', encoding="utf-8")
    cfg = {
        "inputs": [{"path": str(path)}],
        "filters": {"english": {"gopher_quality": False, "fineweb": False}},
    }
    with pytest.raises(DanluError, match=r"bad\.jsonl:2: malformed JSON"):
        run_data({**cfg, "on_error": "fail"}, tmp_path / "out")
    assert not (tmp_path / "out" / "text").exists() and not (tmp_path / "out" / "stats.json").exists()
    stats = run_data({**cfg, "on_error": "skip"}, tmp_path / "out")
    assert stats["read_errors"] == 1 and stats["documents_out"] == 1
    (err,) = rows_of(tmp_path / "out" / "rejected" / "read")
    assert err["position"] == "2" and err["file"] == str(path)


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(DanluError, match=r"data\.filters: unknown key 'lenght'"):
        run_data({"inputs": [{"path": "x"}], "filters": {"lenght": {}}}, tmp_path)
    with pytest.raises(DanluError, match=r"data\.inputs\[0\]\.path: .*nope.jsonl: no such file"):
        run_data({"inputs": [{"path": str(tmp_path / "nope.jsonl")}]}, tmp_path / "o")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DanluError, match=r"data\.inputs\[0\]: .*a\.csv is not a jsonl file"):
        run_data({"inputs": [{"path": str(tmp_path / "a.csv")}]}, tmp_path / "o")
    with pytest.raises(DanluError, match=r"data\.inputs.*type: 'pdf' is not one of"):
        run_data({"inputs": [{"path": "x", "type": "pdf"}]}, tmp_path / "o")


def test_stage_reads_the_world_corpus(tmp_path):
    from danlu.runner import StageContext
    from danlu.stages.data import run_stage

    world = tmp_path / "run" / "world"
    write_jsonl(world / "pretrain.jsonl", world_like_rows())
    (world / "stage.json").write_text("{}")
    ctx = StageContext(name="data", run_dir=tmp_path / "run", cfg={}, recipe={"data": {}})
    metrics = run_stage(ctx)
    assert metrics["documents_in"] == 128 and metrics["docs_kept_fraction"] >= 0.9
    files = list((ctx.out / "text").glob("**/*.jsonl"))
    assert {f.parent.name for f in files} == {"encyclopedia", "news", "qa", "forum"}
    assert (ctx.out / "stats.json").exists() and (ctx.out / "stats.md").exists()


def test_example_recipe_runs_on_fixture_like_inputs(tmp_path, capsys):
    d = tmp_path / "dumps"
    write_wikipedia(d / "wiki", compress=True)
    write_stackexchange(d / "se")
    write_reddit(d / "reddit", compress=True)
    write_html(d / "news")
    from fixtures_data import write_warc

    write_warc(d / "crawl")
    write_jsonl(d / "web" / "web.jsonl", web_rows())
    recipe = tmp_path / "data_example.yaml"
    shutil.copy(Path(__file__).parents[1] / "danlu" / "recipes" / "data_example.yaml", recipe)
    assert prepare_command(str(recipe), str(tmp_path / "out"), 1, ["data.on_error=fail"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["documents_in"] == 18 and stats["dialogs"] == 3
    assert "| dedup |" in capsys.readouterr().out


def test_empty_inputs_and_everything_rejected_are_errors(tmp_path):
    """An empty file, or filters that reject every record, stop with a message saying so (issue 16), never 0."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DanluError, match=r"empty\.jsonl\) hold no records"):
        run_data({"inputs": [{"path": str(empty)}]}, tmp_path / "out1")
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": f"ok {i}"}) for i in range(5)) + "\n", encoding="utf-8")
    with pytest.raises(DanluError, match=r"all 5 records were rejected \(.*stats\.md"):
        run_data({"inputs": [{"path": str(short)}]}, tmp_path / "out2")
