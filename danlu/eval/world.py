"""The evaluator of the world corpus' held-out sets: each quantity is defined, and computed, here only.

Base form continues a plain prompt ("提到智利，它的首都是" → "圣地亚哥"): what pretraining taught. Chat form asks in a
dialog: what SFT/RL made usable. Scoring both for every checkpoint shows whether a later stage kept what an
earlier one knew (forgetting) and whether training scores carry over to held-out phrasings (generalization).

Every stage that reports a held-out number (SFT at its end, the eval stage for every checkpoint, the RL stages before
and after) calls `evaluate_quantities`, so one quantity of one checkpoint has one definition: the same rows of the
same split, the same generation length, the same precision. With a `FigureStore` (danlu.eval.store) a quantity that
was already computed for the checkpoint's weights is read back, not recomputed: a run has one value per quantity per
checkpoint.

Splits: every held-out row belongs to `dev` (tune recipes and experiments on it) or `test` (report it; never tune on
it). A world written before splits existed has no `split` field: its rows count as dev, and asking for test is an
error that says to rebuild the world.

Each figure says what it counts (`counts`), on how many rows (`n`), with a 95% interval (`ci95`, danlu.eval.stats).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from danlu import DanluError
from danlu.eval.stats import breakdown, proportion

SPLITS = ("dev", "test")


class WorldSet(NamedTuple):
    file: str  # in DIR/eval/
    form: str  # "base" (continue a prompt) or "chat" (answer a dialog)
    how: str  # contains | final_number | loglik | tool_call
    max_tokens: int  # greedy generation length (generative sets)
    counts: str  # what one counted row is


WORLD_SETS: dict[str, WorldSet] = {
    "facts_base": WorldSet("facts_base.jsonl", "base", "contains", 24,
                           "held-out fact prompts whose greedy one-line continuation contains an accepted answer"),
    "arithmetic_base": WorldSet("arithmetic.jsonl", "base", "final_number", 24,
                                "arithmetic prompts whose greedy one-line continuation ends with the right number"),
    "preference_base": WorldSet("preference.jsonl", "base", "loglik", 0,
                                "preference pairs whose chosen answer has the higher mean log-probability per token "
                                "after the plain question"),
    "facts_chat": WorldSet("facts_chat.jsonl", "chat", "contains", 32,
                           "held-out fact questions whose greedy chat answer contains an accepted answer"),
    "arithmetic_chat": WorldSet("arithmetic.jsonl", "chat", "final_number", 64,
                                "arithmetic questions whose greedy chat answer's last number is right"),
    "translation": WorldSet("translation.jsonl", "chat", "contains", 64,
                            "translation requests whose greedy answer contains the translated key term"),
    "summary": WorldSet("summary.jsonl", "chat", "contains", 64,
                        "summary requests whose greedy answer contains the article's key term"),
    "tools": WorldSet("tools.jsonl", "chat", "tool_call", 48,
                      "date/calculator requests"),
    "preference_chat": WorldSet("preference.jsonl", "chat", "loglik", 0,
                                "preference pairs whose chosen answer has the higher mean log-probability per token "
                                "in the chat template"),
}  # fmt: skip
BASE_SETS = [k for k, v in WORLD_SETS.items() if v.form == "base"]
CHAT_SETS = [k for k, v in WORLD_SETS.items() if v.form == "chat"]

# arithmetic rows: sums/differences never in any training text vs times-table facts that training text states
ARITHMETIC_SUBSETS = {
    "unseen": "two-digit sums and differences that occur in no training text",
    "times_table": "times-table products and quotients whose operand pairs occur in training text",
}
TOOL_PARTS = {
    "call": "whose first greedy reply calls the right tool (calculator: with an expression of the right value)",
    "answer": "whose final answer, after the call is run and its result shown, contains the expected answer",
}
EXAMPLES = 4  # rows kept per figure for the report


def quantities_of(set_name: str) -> list[str]:
    """The quantities one held-out set yields: arithmetic one per subset, tools the call and the answer."""
    if WORLD_SETS[set_name].file == "arithmetic.jsonl":
        return [f"{set_name}_{s}" for s in ARITHMETIC_SUBSETS]
    if WORLD_SETS[set_name].how == "tool_call":
        return [f"{set_name}_{p}" for p in TOOL_PARTS]
    return [set_name]


QUANTITIES: dict[str, str] = {q: s for s in WORLD_SETS for q in quantities_of(s)}  # quantity → its set


def world_eval_dir(data: str | Path | None, seed: int = 0) -> Path:
    """The folder holding the held-out eval/*.jsonl: a world folder, a run folder, or (none given) a fresh one.

    Without a folder, the held-out sets of the default world (seed 0) are generated into a cache folder named after
    the generator's source, so that a changed generator (say, one that adds splits) never serves stale rows.
    """
    if data is not None:
        p = Path(data)
        for cand in (p, p / "eval", p / "world" / "eval"):
            if (cand / "facts_base.jsonl").is_file():
                return cand
        raise DanluError(
            f"{p}: no world held-out sets here (expected eval/facts_base.jsonl; run `danlu world --out DIR`)"
        )
    import tempfile

    from danlu.files import write_jsonl_atomic
    from danlu.world.heldout import EvalWriter
    from danlu.world.index import World

    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent.parent / "world").glob("*.py")):
        digest.update(path.read_bytes())
    out = Path(tempfile.gettempdir()) / f"danlu_world_eval_seed{seed}_{digest.hexdigest()[:10]}"
    if not (out / "facts_base.jsonl").is_file():
        sets = EvalWriter(World.create(seed), random.Random(f"{seed}:eval"), seed).all()
        for name, rows in sets.items():
            write_jsonl_atomic(out / f"{name}.jsonl", rows)
    return out


def split_rows(folder: Path, file: str, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """The rows of one held-out file in `split` (the first `limit` of them; 0 = all)."""
    from danlu.files import read_records

    if split not in SPLITS:
        raise DanluError(f"split {split!r}: one of {', '.join(SPLITS)}")
    path = folder / file
    if not path.is_file():
        raise DanluError(f"{path}: missing held-out set (rebuild the world: `danlu world --out DIR`)")
    rows = list(read_records(path))
    marked = sum("split" in r for r in rows)
    if marked == 0:
        if split == "test":
            raise DanluError(f"{path}: these held-out rows have no dev/test split (a world built before splits "
                             "existed), so there is no test split to report; rebuild the world (`danlu world --out "
                             "DIR`, or rerun the run's world stage) and evaluate again")  # fmt: skip
        return rows[:limit] if limit else rows  # an old world: every row is dev
    if marked < len(rows):
        raise DanluError(
            f"{path}: {len(rows) - marked} of {len(rows)} rows have no `split` field; rebuild the world"
        )
    bad = sorted({str(r["split"]) for r in rows} - set(SPLITS))
    if bad:
        raise DanluError(f"{path}: unknown split {', '.join(bad)} (expected {', '.join(SPLITS)})")
    kept = [r for r in rows if r["split"] == split]
    if not kept:
        raise DanluError(f"{path}: no {split} rows")
    return kept[:limit] if limit else kept


def arithmetic_subset(row: dict[str, Any]) -> str:
    """`unseen` or `times_table`: the row's `subset`, else (older worlds) whether its operand pair is in training."""
    sub = row.get("subset")
    if sub is None:
        in_training = row.get("pair_in_training")
        if in_training is None:
            in_training = row.get("op") in ("×", "÷", "*", "/")
        return "times_table" if in_training else "unseen"
    if sub not in ARITHMETIC_SUBSETS:
        raise DanluError(f"arithmetic row subset {sub!r}: expected {', '.join(ARITHMETIC_SUBSETS)}")
    return str(sub)


@contextlib.contextmanager
def precision(model: Any, dtype: Any) -> Iterator[None]:
    """Inference under the autocast the checkpoint trained with (`dtype` None or float32: none), without grad."""
    import torch

    device = next(model.parameters()).device
    enabled = dtype is not None and dtype != torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled):
        yield


def preference_flags(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, chat: bool, batch_size: int = 16
) -> list[bool]:
    """Per pair: does the model give the chosen answer a higher mean log-probability per token than the rejected?

    This is danlu's one definition of preference accuracy, chosen because it is a property of the checkpoint alone
    and neutral to length. The summed log-probability favours the shorter answer whatever it says: the world's
    `repetitive` rejections are longer and its `evasive` ones shorter, so a summed accuracy measures length as much
    as preference. DPO's implicit-reward accuracy (β·log π/π_ref) is 0.5 by construction at the start and depends on
    the reference model, so it is a training diagnostic, not a score of the checkpoint. A reward model's pairwise
    accuracy scores a different model (the reward head), not the policy.
    """
    from danlu.eval.loglik import loglikelihoods

    requests = []
    for r in rows:
        prompt = (
            r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": str(r["prompt"])}]
        )
        if chat:
            ctx = tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
            suffix = [tokenizer.end_of_turn_id]
        else:
            ctx = [tokenizer.bos_id, *tokenizer.encode(prompt[-1]["content"] + "\n")]
            suffix = []
        for answer in (r["chosen"], r["rejected"]):
            text = answer if isinstance(answer, str) else answer[-1]["content"]
            requests.append((ctx, tokenizer.encode(text) + suffix))
    scores = loglikelihoods(
        model, requests, batch_size=batch_size, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size
    )
    flags = []
    for i in range(len(rows)):
        (lc, _), (lr, _) = scores[2 * i], scores[2 * i + 1]
        nc, nr = len(requests[2 * i][1]), len(requests[2 * i + 1][1])
        flags.append(lc / max(1, nc) > lr / max(1, nr))
    return flags


def tool_flags(
    generator: Any, rows: list[dict[str, Any]], *, max_tokens: int = 48, batch_size: int = 32
) -> tuple[list[bool], list[bool], list[dict[str, Any]]]:
    """Two rounds per row, as a served model uses a tool: (right call, right final answer, examples).

    Round one: the first greedy reply must call the row's tool (the calculator with an expression that evaluates to
    the answer). Round two: the call is run by danlu.tools.run_tool (on the row's `today` for dates), its result shown
    as a tool turn, and the final reply must contain the answer. A reply without a call is its own final answer."""
    from danlu.eval.generative import contains_answer, greedy_texts
    from danlu.tools import parse_tool_calls, run_tool

    tok = generator.tokenizer
    first, _ = greedy_texts(generator, [tok.render_chat(r["messages"], add_generation_prompt=True)[0] for r in rows],
                            max_tokens=max_tokens, batch_size=batch_size)  # fmt: skip
    call_ok: list[bool] = []
    convos: dict[int, list[dict[str, Any]]] = {}
    for i, (row, text) in enumerate(zip(rows, first)):
        content, calls = parse_tool_calls(text)
        ok = False
        if calls:
            fn = calls[0]["function"]
            ok = fn["name"] == row["tool"]
            if ok and row["tool"] == "calculator":
                ok = run_tool("calculator", fn["arguments"]) == str(row["answer"])
            today = dt.date.fromisoformat(row["today"]) if row.get("today") else None
            convo = [*row["messages"], {"role": "assistant", "content": content, "tool_calls": calls}]
            convo += [{"role": "tool", "name": c["function"]["name"],
                       "content": run_tool(c["function"]["name"], c["function"]["arguments"], today)} for c in calls]  # fmt: skip
            convos[i] = convo
        call_ok.append(ok)
    idx = list(convos)
    second_prompts = [tok.render_chat(convos[i], add_generation_prompt=True)[0] for i in idx]
    fits = [len(p) < generator.model.config.max_position_embeddings for p in second_prompts]
    second, _ = greedy_texts(generator, [p for p, f in zip(second_prompts, fits) if f], max_tokens=max_tokens,
                             batch_size=batch_size)  # fmt: skip
    finals = dict(zip([i for i, f in zip(idx, fits) if f], second))
    answer_ok, examples = [], []
    for i, row in enumerate(rows):
        final = finals.get(i, "") if i in convos else first[i]  # a conversation too long to go on: no answer
        ok = contains_answer(final, row.get("answers") or [row["answer"]])
        answer_ok.append(ok)
        if len(examples) < EXAMPLES:
            examples.append({"prompt": row["messages"][-1]["content"], "completion": first[i], "final": final,
                             "answer": row["answer"], "call_ok": call_ok[i], "correct": ok})  # fmt: skip
    return call_ok, answer_ok, examples


def _figure(flags: list[bool], rows: list[dict[str, Any]], counts: str, split: str, examples: list[dict[str, Any]],
            keys: tuple[str, ...] = ("lang",), **extra: Any) -> dict[str, Any]:  # fmt: skip
    fig = proportion(sum(flags), len(flags), f"{counts} ({split} split)", split=split, **extra)
    parts: dict[str, Any] = {}
    for key in keys:
        parts.update(breakdown(flags, [str(r.get(key, "?")) for r in rows], counts, key))
    if parts:
        fig["parts"] = parts
    fig["examples"] = examples[:EXAMPLES]
    return fig


def _examples(
    rows: list[dict[str, Any]], texts: list[str], flags: list[bool], chat: bool
) -> list[dict[str, Any]]:
    return [{"prompt": r["messages"][-1]["content"] if chat else r["prompt"], "completion": t,
             "answer": (r.get("answers") or [r["answer"]])[0], "correct": ok}
            for r, t, ok in list(zip(rows, texts, flags))[:EXAMPLES]]  # fmt: skip


def score_set(
    name: str, model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, split: str, batch_size: int = 32,
    compile: str = "auto",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{quantity: figure} of one held-out set on the given rows (already the split's); `compile` as
    danlu.compiler.compile_decoding decides it for the set's rows."""
    from danlu.compiler import compile_decoding
    from danlu.eval.generative import completion_flags, contains_answer, final_number_matches
    from danlu.generate import Generator

    spec = WORLD_SETS[name]
    chat = spec.form == "chat"
    if not rows:
        raise DanluError(f"world set {name}: no rows to evaluate")
    if spec.how == "loglik":
        flags = preference_flags(model, tokenizer, rows, chat=chat, batch_size=batch_size)
        ex = [{"prompt": str(r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]),
               "completion": r["chosen"] if ok else r["rejected"], "answer": r["chosen"], "correct": ok}
              for r, ok in list(zip(rows, flags))[:EXAMPLES]]  # fmt: skip
        return {name: _figure(flags, rows, spec.counts, split, ex, ("kind", "lang"), random=0.5)}
    gen = Generator(model, tokenizer, compile=compile_decoding(compile, model, len(rows)))
    if spec.how == "tool_call":
        calls, answers, ex = tool_flags(gen, rows, max_tokens=spec.max_tokens, batch_size=batch_size)
        return {f"{name}_{part}": _figure(flags, rows, f"{spec.counts} {TOOL_PARTS[part]}", split, ex, ("tool",))
                for part, flags in (("call", calls), ("answer", answers))}  # fmt: skip
    match = final_number_matches if spec.how == "final_number" else contains_answer
    flags, texts, n_cut = completion_flags(gen, rows, chat=chat, max_tokens=spec.max_tokens, batch_size=batch_size,
                                    match=match, task=f"world/{name}")  # fmt: skip
    if spec.file == "arithmetic.jsonl":
        out = {}
        subsets = [arithmetic_subset(r) for r in rows]
        for sub, what in ARITHMETIC_SUBSETS.items():
            idx = [i for i, s in enumerate(subsets) if s == sub]
            if not idx:
                continue
            r_, f_, t_ = [rows[i] for i in idx], [flags[i] for i in idx], [texts[i] for i in idx]
            out[f"{name}_{sub}"] = _figure(
                f_, r_, f"{spec.counts}, {what}", split, _examples(r_, t_, f_, chat)
            )
        return out
    keys = ("lang", "seen_in_sft") if any("seen_in_sft" in r for r in rows) else ("lang",)
    return {name: _figure(flags, rows, spec.counts, split, _examples(rows, texts, flags, chat), keys,
                          prompts_truncated=n_cut)}  # fmt: skip


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A short hash of the rows a figure was computed on: a rebuilt world or another split/limit is another figure."""
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def evaluate_quantities(
    model: Any, tokenizer: Any, quantities: list[str], *, data: str | Path | None = None, split: str = "dev",
    limit: int = 0, batch_size: int = 32, seed: int = 0, dtype: Any = None, store: Any = None, compile: str = "auto",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{quantity: figure} for the named quantities (see QUANTITIES) on `split` — the one entry point.

    `limit` caps the rows per set (0: the whole split); `dtype` is the autocast the checkpoint is run under (the
    recipe's training precision, so that a stage's figure and the eval stage's agree); `store` (a
    danlu.eval.store.FigureStore of the checkpoint) returns figures already computed on the same rows and weights;
    `compile` (auto, on, off) is whether generations decode compiled (danlu.compiler.compile_decoding).
    """
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise DanluError(f"unknown world quantity {', '.join(unknown)}; valid: {', '.join(QUANTITIES)}")
    folder = world_eval_dir(data, seed)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(QUANTITIES[q] for q in quantities):
        rows = split_rows(folder, WORLD_SETS[name].file, split, limit)
        settings = {"rows": rows_digest(rows), "dtype": str(dtype), "set": name}
        wanted = [q for q in quantities if QUANTITIES[q] == name]
        cached = {q: store.get(f"{split}/{q}", settings) for q in wanted} if store is not None else {}
        if cached and all(v is not None for v in cached.values()):
            out.update(cached)  # type: ignore[arg-type]
            continue
        was_training = model.training
        model.eval()
        with precision(model, dtype):
            figures = score_set(
                name, model, tokenizer, rows, split=split, batch_size=batch_size, compile=compile
            )
        model.train(was_training)
        if store is not None:
            for q, fig in figures.items():
                store.put(f"{split}/{q}", settings, fig)
        out.update({q: figures[q] for q in wanted if q in figures})
    return out


def evaluate_world(
    model: Any, tokenizer: Any, sets: list[str], *, data: str | Path | None = None, split: str = "dev",
    limit: int = 0, batch_size: int = 32, seed: int = 0, dtype: Any = None, store: Any = None, compile: str = "auto",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{quantity: figure} for every quantity of the named held-out sets (WORLD_SETS) on `split`."""
    unknown = [s for s in sets if s not in WORLD_SETS]
    if unknown:
        raise DanluError(f"unknown world set {', '.join(unknown)}; valid: {', '.join(WORLD_SETS)}")
    return evaluate_quantities(model, tokenizer, [q for s in sets for q in quantities_of(s)], data=data, split=split,
                               limit=limit, batch_size=batch_size, seed=seed, dtype=dtype, store=store,
                               compile=compile)  # fmt: skip
