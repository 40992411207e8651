"""The world corpus' held-out sets, scored in base (completion) and chat form.

Base form continues a plain prompt ("提到智利，它的首都是" → "圣地亚哥"): what pretraining taught. Chat form asks in a
dialog: what SFT/RL made usable. Scoring both for every checkpoint shows whether a later stage kept what an
earlier one knew (forgetting) and whether training scores carry over to held-out phrasings (generalization).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from danlu import DanluError

# set name → (file in DIR/eval/, form, how it is scored)
WORLD_SETS: dict[str, tuple[str, str, str]] = {
    "facts_base": ("facts_base.jsonl", "base", "contains"),
    "arithmetic_base": ("arithmetic.jsonl", "base", "final_number"),
    "preference_base": ("preference.jsonl", "base", "loglik"),
    "facts_chat": ("facts_chat.jsonl", "chat", "contains"),
    "arithmetic_chat": ("arithmetic.jsonl", "chat", "final_number"),
    "translation": ("translation.jsonl", "chat", "contains"),
    "summary": ("summary.jsonl", "chat", "contains"),
    "tools": ("tools.jsonl", "chat", "tool_call"),
    "preference_chat": ("preference.jsonl", "chat", "loglik"),
}
BASE_SETS = [k for k, v in WORLD_SETS.items() if v[1] == "base"]
CHAT_SETS = [k for k, v in WORLD_SETS.items() if v[1] == "chat"]


def world_eval_dir(data: str | Path | None, seed: int = 0) -> Path:
    """The folder holding the held-out eval/*.jsonl: a world folder, a run folder, or (none given) a fresh one.

    Without a folder, the held-out sets of the default world (seed 0) are generated into a cache folder: they
    take well under a second and do not depend on the corpus scale.
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

    out = Path(tempfile.gettempdir()) / f"danlu_world_eval_seed{seed}"
    if not (out / "facts_base.jsonl").is_file():
        sets = EvalWriter(World.create(seed), random.Random(f"{seed}:eval"), seed).all()
        for name, rows in sets.items():
            write_jsonl_atomic(out / f"{name}.jsonl", rows)
    return out


def _rows(folder: Path, file: str, limit: int) -> list[dict[str, Any]]:
    from danlu.files import read_records

    rows = list(read_records(folder / file))
    return rows[:limit] if limit else rows


def preference_accuracy(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, chat: bool, batch_size: int = 16
) -> dict[str, Any]:
    """Share of pairs where the model gives the chosen answer a higher mean log-probability per token than the rejected."""
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
    by_kind: dict[str, list[int]] = {}  # which kinds of mistakes the model tells apart, and which not
    for i, r in enumerate(rows):
        (lc, _), (lr, _) = scores[2 * i], scores[2 * i + 1]
        nc, nr = len(requests[2 * i][1]), len(requests[2 * i + 1][1])
        by_kind.setdefault(str(r.get("kind", "all")), []).append(int(lc / max(1, nc) > lr / max(1, nr)))
    correct = sum(sum(v) for v in by_kind.values())
    out: dict[str, Any] = {"accuracy": round(correct / max(1, len(rows)), 4), "n": len(rows), "random": 0.5}
    if len(by_kind) > 1:
        out.update({f"accuracy_{k}": round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())})
    return out


def tool_call_accuracy(
    generator: Any, rows: list[dict[str, Any]], *, batch_size: int = 16, max_tokens: int = 48
) -> dict[str, Any]:
    """Share of requests answered with a call of the right tool (calculator, get_date), given the tool schemas."""
    from danlu.eval.generative import fit_prompts
    from danlu.generate import SamplingParams
    from danlu.tools import parse_tool_calls

    tok = generator.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    correct, examples = 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tok.render_chat(r["messages"], add_generation_prompt=True)[0] for r in chunk]
        window = generator.model.config.max_position_embeddings
        prompts, params.max_tokens = fit_prompts(prompts, window, max_tokens)
        for row, comp in zip(chunk, generator.generate(prompts, params)):
            _, calls = parse_tool_calls(comp.text)
            ok = bool(calls) and calls[0]["function"]["name"] == row["tool"]
            correct += ok
            if len(examples) < 3:
                examples.append({"prompt": row["messages"][-1]["content"], "completion": comp.text,
                                 "answer": row["tool"], "correct": ok})  # fmt: skip
    return {"accuracy": round(correct / max(1, len(rows)), 4), "n": len(rows), "examples": examples}


def evaluate_world(
    model: Any, tokenizer: Any, sets: list[str], *, data: str | Path | None = None, limit: int = 200,
    batch_size: int = 32, seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Scores each named held-out set; returns {set name: metrics}."""
    from danlu.eval.generative import completion_accuracy, contains_answer, final_number_matches
    from danlu.generate import Generator

    unknown = [s for s in sets if s not in WORLD_SETS]
    if unknown:
        raise DanluError(f"unknown world set {', '.join(unknown)}; valid: {', '.join(WORLD_SETS)}")
    folder = world_eval_dir(data, seed)
    gen = Generator(model, tokenizer)
    out: dict[str, dict[str, Any]] = {}
    for name in sets:
        file, form, how = WORLD_SETS[name]
        rows = _rows(folder, file, limit)
        chat = form == "chat"
        if how == "loglik":
            out[name] = preference_accuracy(model, tokenizer, rows, chat=chat, batch_size=batch_size)
        elif how == "tool_call":
            out[name] = tool_call_accuracy(gen, rows, batch_size=batch_size)
        else:
            tokens = 64 if name in ("translation", "summary", "arithmetic_chat") else 24
            match = final_number_matches if how == "final_number" else contains_answer
            out[name] = completion_accuracy(
                gen, rows, chat=chat, max_tokens=tokens, batch_size=batch_size, match=match
            )
    return out
