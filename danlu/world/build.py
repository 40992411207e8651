"""Builds the world corpus folder from a seed: facts, pretraining text, dialogs, preferences, RL prompts, evals.

Same seed and scale → byte-identical files: every random choice comes from a `random.Random` seeded by a string
(`"{seed}:pretrain"` …), which Python hashes the same way in every process, and nothing iterates over a set.
Each file is written atomically; stats.json is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import write_json_atomic, write_jsonl_atomic
from danlu.world.dialogs import PREFERENCE_MIX, SFT_MIX, DialogWriter
from danlu.world.documents import Doc, DocWriter
from danlu.world.facts import RELATIONS
from danlu.world.heldout import SPLITS, EvalWriter
from danlu.world.index import World
from danlu.world.numbers import written_table_problems
from danlu.world.sentences import record_strings, sentence_keys
from danlu.world.validation import ValText, draft_val_text

LANGS = ("zh", "en")
# Documents per generator at scale 1.0: about 8 MB of UTF-8 text in all (≈2M tokens with a 4096-token BPE:
# templated text compresses well).
PRETRAIN_PLAN = {
    "news": 4200,
    "science_news": 800,
    "qa": 8400,
    "faq": 1400,
    "forum": 5800,
    "arithmetic_sheet": 1100,
    "arithmetic_qa": 1100,
    "arithmetic_forum": 650,
    "times_table": 200,
}
ENCYCLOPEDIA_EDITIONS = 10  # articles per subject and language at scale 1.0; at least one at any scale
LIST_EDITIONS = 6  # list articles per relation and language at scale 1.0; at least one
VAL_SHARE = 0.02
MIN_VAL_DOCS = 60
SFT_DIALOGS = 15000
PREFERENCE_PAIRS = 3000
RL_PROMPTS = 3000
# By-hand arithmetic (GRPO's target), facts (already answered), and prompts that need a tool (get_date,
# calculator), so that RL keeps paying for the tool calls SFT taught.
RL_MIX = {"arithmetic": 0.45, "fact": 0.25, "calculator": 0.15, "date": 0.15}
MAX_SCALE = 100.0
POST_TRAINING = ("sft.jsonl", "preference.jsonl", "rl.jsonl")


def scaled(n: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def _make(writer: DocWriter, kind: str, lang: str, seed: int, world: World) -> Doc:
    r = writer.r
    if kind == "encyclopedia":
        return writer.encyclopedia(r.choice(world.subjects), lang)
    if kind == "list_article":
        return writer.list_article(r.choice(RELATIONS), lang)
    if kind.startswith("arithmetic_"):
        return getattr(writer, kind)(lang, seed)
    return getattr(writer, kind)(lang)


def pretrain_docs(world: World, seed: int, scale: float) -> list[Doc]:
    """Training documents: every subject's encyclopedia article in both languages, then the scaled mix."""
    rng = random.Random(f"{seed}:pretrain")
    writer = DocWriter(world, rng)
    docs = []
    for subject in world.subjects:
        for lang in LANGS:
            docs += [writer.encyclopedia(subject, lang) for _ in range(scaled(ENCYCLOPEDIA_EDITIONS, scale))]
    for relation in RELATIONS:
        for lang in LANGS:
            docs += [writer.list_article(relation, lang) for _ in range(scaled(LIST_EDITIONS, scale))]
    for kind, n in PRETRAIN_PLAN.items():
        docs += [_make(writer, kind, rng.choice(LANGS), seed, world) for _ in range(scaled(n, scale))]
    rng.shuffle(docs)
    return docs


def val_text(world: World, seed: int, train: list[dict[str, Any]], train_keys: set[str]) -> ValText:
    """Validation documents of the training kinds and mix with every sentence pretraining text holds cut out
    (`danlu.world.validation`): as many characters as max(MIN_VAL_DOCS, VAL_SHARE of the training documents)
    training documents hold on average, and at least that many documents."""
    weights = {
        **PRETRAIN_PLAN,
        "encyclopedia": ENCYCLOPEDIA_EDITIONS * len(world.subjects) * 2,
        "list_article": LIST_EDITIONS * len(RELATIONS) * 2,
    }
    n_docs = max(MIN_VAL_DOCS, round(len(train) * VAL_SHARE))
    return draft_val_text(
        world,
        seed,
        weights,
        lambda writer, kind, lang: _make(writer, kind, lang, seed, world),
        train_keys,
        min_docs=n_docs,
        min_chars=round(n_docs * sum(len(r["text"]) for r in train) / len(train)),
    )


def finish_docs(docs: list[Doc], prefix: str) -> list[dict[str, Any]]:
    """Adds source and id and makes every URL unique (URL dedup must not drop distinct documents)."""
    seen: set[str] = set()
    rows = []
    for i, d in enumerate(docs):
        url = d["url"]
        if url in seen:
            url = f"{url}{'&' if '?' in url else '?'}n={i}"
        seen.add(url)
        rows.append(
            {
                "text": d["text"],
                "source": "world",
                "domain": d["domain"],
                "lang": d["lang"],
                "id": f"{prefix}-{i:06d}",
                "url": url,
            }
        )
    return rows


def _mix(total: int, shares: dict[str, float]) -> list[str]:
    kinds = []
    for kind, share in shares.items():
        kinds += [kind] * max(1, round(total * share))
    return kinds


def _written(world: World, seed: int, scale: float, part: str, count: int, minimum: int,
             mix: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """Rows from DialogWriter.<part> (sft, preference, rl), one per kind in the scaled mix, in a shuffled order;
    each part has its own random stream, so changing one part leaves the others byte-identical."""
    rng = random.Random(f"{seed}:{part}")
    write = getattr(DialogWriter(world.open(), rng, seed), part)
    rows = [write(kind, rng.choice(LANGS)) for kind in _mix(scaled(count, scale, minimum), mix)]
    rng.shuffle(rows)
    return rows


def sft_dialogs(world: World, seed: int, scale: float) -> list[dict[str, Any]]:
    return _written(world, seed, scale, "sft", SFT_DIALOGS, 50, SFT_MIX)


def preference_pairs(world: World, seed: int, scale: float) -> list[dict[str, Any]]:
    return _written(world, seed, scale, "preference", PREFERENCE_PAIRS, 20, PREFERENCE_MIX)


def rl_prompts(world: World, seed: int, scale: float) -> list[dict[str, Any]]:
    return _written(world, seed, scale, "rl", RL_PROMPTS, 20, RL_MIX)


def check_args(seed: Any, scale: Any) -> tuple[int, float]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DanluError(f"world: seed must be an integer, got {seed!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise DanluError(f"world: scale must be a number, got {scale!r}")
    if not 0 < scale <= MAX_SCALE:
        raise DanluError(
            f"world: scale must be above 0 and at most {MAX_SCALE:g} (1.0 ≈ 8 MB of text), got {scale!r}"
        )
    return seed, float(scale)


def _text_of(row: dict[str, Any]) -> int:
    return len(row["text"]) if "text" in row else 0


def build_world(out: str | Path, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Generates the world corpus into `out` and returns its statistics (those of out/stats.json + `seconds`)."""
    seed, scale = check_args(seed, scale)
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DanluError(f"{out}: exists and is not a folder")
    world = World.create(seed)
    train = finish_docs(pretrain_docs(world, seed, scale), "world")
    pretrain_keys = sentence_keys(r["text"] for r in train)
    val = val_text(world, seed, train, pretrain_keys)
    splits: dict[str, list[dict[str, Any]]] = {
        "facts.jsonl": [f.record() for f in world.facts],
        "pretrain.jsonl": train,
        "pretrain_val.jsonl": finish_docs(val.unseen, "world-val"),
        "pretrain_val_seen.jsonl": finish_docs(val.seen, "world-val-seen"),
        "sft.jsonl": sft_dialogs(world, seed, scale),
        "preference.jsonl": preference_pairs(world, seed, scale),
        "rl.jsonl": rl_prompts(world, seed, scale),
    }
    # no held-out row may hold a sentence of any training file (every string of a post-training record counts)
    post = [s for name in POST_TRAINING for r in splits[name] for s in record_strings(r)]
    seen = pretrain_keys | sentence_keys(post)
    table = written_table_problems([*(r["text"] for r in train), *post])
    writer = EvalWriter(world, random.Random(f"{seed}:eval"), seed, seen=seen, seen_problems=table)
    splits.update({f"eval/{name}.jsonl": rows for name, rows in writer.all().items()})
    files = {}
    for name, rows in splits.items():
        write_jsonl_atomic(out / name, rows)
        files[name] = {"rows": len(rows), "bytes": (out / name).stat().st_size}
    stats = make_stats(world, seed, scale, splits, files)
    stats["pretrain_val"].update(val.stats())
    stats["eval_refused_rows"] = sum(writer.refused.values())
    write_json_atomic(out / "stats.json", stats)  # no timings inside: same seed → same bytes
    return {**stats, "seconds": round(time.time() - t0, 2)}


def _counts(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(sorted(Counter(str(r.get(key)) for r in rows).items()))


def make_stats(
    world: World,
    seed: int,
    scale: float,
    splits: dict[str, list[dict[str, Any]]],
    files: dict[str, dict[str, int]],
) -> dict[str, Any]:
    def text_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "docs": len(rows),
            "chars": sum(_text_of(r) for r in rows),
            "bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
            "domain": _counts(rows, "domain"),
            "lang": _counts(rows, "lang"),
            "domain_lang": dict(sorted(Counter(f"{r['domain']}/{r['lang']}" for r in rows).items())),
        }

    sft = splits["sft.jsonl"]
    return {
        "seed": seed,
        "scale": scale,
        "facts": {
            "total": len(world.facts),
            "relations": len({f.relation for f in world.facts}),
            "reserved": len(world.reserved),
            "per_relation": {r: len(world.by_relation.get(r, [])) for r in RELATIONS},
        },
        "files": files,
        "pretrain": text_stats(splits["pretrain.jsonl"]),
        "pretrain_val": text_stats(splits["pretrain_val.jsonl"]),
        "pretrain_val_seen": text_stats(splits["pretrain_val_seen.jsonl"]),
        "sft": {
            "dialogs": len(sft),
            "kind": _counts(sft, "kind"),
            "lang": _counts(sft, "lang"),
            "with_system": sum(m["messages"][0]["role"] == "system" for m in sft),
            "with_tool_calls": sum(any("tool_calls" in m for m in d["messages"]) for d in sft),
            "messages": sum(len(d["messages"]) for d in sft),
        },
        "preference": {
            "pairs": len(splits["preference.jsonl"]),
            "kind": _counts(splits["preference.jsonl"], "kind"),
            "lang": _counts(splits["preference.jsonl"], "lang"),
        },
        "rl": {
            "prompts": len(splits["rl.jsonl"]),
            "kind": _counts(splits["rl.jsonl"], "kind"),
            "lang": _counts(splits["rl.jsonl"], "lang"),
        },
        "eval": {name[5:-6]: len(rows) for name, rows in splits.items() if name.startswith("eval/")},
        "eval_splits": {
            name[5:-6]: {split: sum(r["split"] == split for r in rows) for split in SPLITS}
            for name, rows in splits.items()
            if name.startswith("eval/")
        },
        "arithmetic_subsets": {
            split: _counts([r for r in splits["eval/arithmetic.jsonl"] if r["split"] == split], "subset")
            for split in SPLITS
        },
    }


def flat_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers a pipeline stage reports (flat, numeric)."""
    out: dict[str, float] = {
        "facts": stats["facts"]["total"],
        "relations": stats["facts"]["relations"],
        "reserved_facts": stats["facts"]["reserved"],
        "pretrain_docs": stats["pretrain"]["docs"],
        "pretrain_chars": stats["pretrain"]["chars"],
        "pretrain_mb": round(stats["pretrain"]["bytes"] / 1e6, 3),
        "val_docs": stats["pretrain_val"]["docs"],
        "val_kept_sentences": stats["pretrain_val"]["kept_sentences"],
        "val_dropped_seen_sentences": stats["pretrain_val"]["dropped_seen_sentences"],
        "sft_dialogs": stats["sft"]["dialogs"],
        "preference_pairs": stats["preference"]["pairs"],
        "rl_prompts": stats["rl"]["prompts"],
    }
    out.update({f"eval_{k}": v for k, v in stats["eval"].items()})
    out.update({f"eval_{k}_{split}": n for k, v in stats["eval_splits"].items() for split, n in v.items()})
    return out


def format_stats(stats: dict[str, Any], out: str | Path | None = None) -> str:
    """A readable table of the statistics, for the terminal."""
    f = stats["facts"]
    lines = [f"world corpus: seed {stats['seed']}, scale {stats['scale']:g}" + (f" → {out}" if out else "")]
    lines.append(
        f"facts: {f['total']} over {f['relations']} relations ({f['reserved']} reserved: pretraining only)"
    )
    rel = [f"{k} {v}" for k, v in f["per_relation"].items()]
    lines += ["  " + " · ".join(rel[i : i + 6]) for i in range(0, len(rel), 6)]
    lines += ["", f"{'file':<28}{'rows':>10}{'MB':>10}"]
    for name, info in stats["files"].items():
        lines.append(f"{name:<28}{info['rows']:>10,}{info['bytes'] / 1e6:>10.2f}")
    p = stats["pretrain"]
    lines += [
        "",
        f"pretrain: {p['docs']:,} documents, {p['chars']:,} characters, {p['bytes'] / 1e6:.2f} MB of UTF-8 text",
        f"  {'domain':<14}{'zh':>8}{'en':>8}",
    ]
    for domain in p["domain"]:
        zh, en = p["domain_lang"].get(f"{domain}/zh", 0), p["domain_lang"].get(f"{domain}/en", 0)
        lines.append(f"  {domain:<14}{zh:>8,}{en:>8,}")
    s = stats["sft"]
    lines += [
        "",
        f"sft: {s['dialogs']:,} dialogs ({s['with_tool_calls']:,} with tool calls, {s['with_system']:,} "
        f"with a system prompt); " + " · ".join(f"{k} {v}" for k, v in s["kind"].items()),
    ]
    lines.append("preference: " + " · ".join(f"{k} {v}" for k, v in stats["preference"]["kind"].items()))
    lines.append("rl: " + " · ".join(f"{k} {v}" for k, v in stats["rl"]["kind"].items()))
    v = stats["pretrain_val"]
    lines.append(
        f"pretrain_val: {v['docs']:,} documents, {v['chars']:,} characters, no sentence of pretrain.jsonl "
        f"({v['dropped_seen_sentences']:,} of {v['drafted_sentences']:,} drafted sentences were seen and moved to "
        "pretrain_val_seen.jsonl)"
    )
    lines.append(
        "eval (held-out, dev/test): "
        + " · ".join(f"{k} {v['dev']}/{v['test']}" for k, v in stats["eval_splits"].items())
    )
    a = stats["arithmetic_subsets"]
    lines.append(
        "  arithmetic subsets (dev/test): "
        + " · ".join(f"{k} {a['dev'].get(k, 0)}/{a['test'].get(k, 0)}" for k in ("unseen", "times_table"))
    )
    if "seconds" in stats:
        lines.append(f"generated in {stats['seconds']:.1f}s")
    return "\n".join(lines)
