"""Generative evaluation: greedy, batched completions scored by whether they contain an accepted answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from danlu.generate import Generator, SamplingParams


def fit_prompts(prompts: list[list[int]], window: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """Prompts cut from the left to leave room for generation in the model's window, and the tokens that fit.

    Long held-out items (a news summary) must not crash a small-context model's evaluation; they lose their oldest
    tokens, as lm-evaluation-harness does.
    """
    room = max(1, min(max_tokens, window // 2))
    keep = window - room
    cut = [p[-keep:] for p in prompts]
    return cut, max(1, min(max_tokens, window - max(map(len, cut))))


def count_cut(prompts: list[list[int]], window: int, max_tokens: int) -> int:
    """How many prompts fit_prompts would cut (they lose their beginning: the question, or the first shots)."""
    keep = window - max(1, min(max_tokens, window // 2))
    return sum(len(p) > keep for p in prompts)


def warn_cut(task: str, cut: int, total: int, window: int, hint: str = "") -> None:
    """One warning per task when prompts were cut from the left, saying how many: a score on cut prompts measures
    something else than the task."""
    import sys

    if cut:
        print(f"[danlu] eval {task}: WARNING: {cut} of {total} prompts ({cut / max(1, total):.0%}) were longer than "
              f"the model's window of {window} tokens leaves for them and lost their beginning"
              + (f"; {hint}" if hint else ""), file=sys.stderr)  # fmt: skip


def normalize(text: str) -> str:
    return "".join(text.lower().split())


def contains_answer(completion: str, answers: list[str]) -> bool:
    """True if an accepted answer occurs in the completion. Short answers (numbers, symbols like "H") must stand
    alone — not inside a longer number or word — so that "1" does not match "12" nor "S" match "Sun"; they are
    looked for with the spaces kept, since removing them would glue "S is" into one word."""
    got = normalize(completion)
    spaced = " ".join(completion.lower().split())
    for a in answers:
        want = normalize(a)
        if not want:
            continue
        if len(want) > 3 and not want.isdigit():
            if want in got:
                return True
        elif re.search(
            rf"(?<![0-9a-z.]){re.escape(' '.join(a.lower().split()))}(?![0-9a-z]|\.[0-9])", spaced
        ):
            return True
    return False


def final_number_matches(completion: str, answers: list[str]) -> bool:
    """Arithmetic: the LAST number must be right, so a worked solution is judged by its conclusion, not by a
    step that happens to contain the answer (the same rule as the arithmetic reward)."""
    from danlu.rewards import arithmetic_reward

    return bool(arithmetic_reward(completion, answers))


def prompt_ids(tok: Any, row: dict[str, Any], chat: bool) -> list[int]:
    """A held-out row as the model sees it: its `messages` rendered as a dialog (chat), or BOS + its `prompt`."""
    if chat:
        return tok.render_chat(row["messages"], add_generation_prompt=True)[0]
    return [tok.bos_id, *tok.encode(row["prompt"])]


def greedy_texts(
    generator: Generator, prompts: list[list[int]], *, max_tokens: int, batch_size: int = 32,
    stop: list[str] | None = None,
) -> tuple[list[str], int]:  # fmt: skip
    """Greedy completions of `prompts` in batches (cut from the left to fit the window), and how many were cut."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop or []))
    window = generator.model.config.max_position_embeddings
    texts: list[str] = []
    n_cut = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n_cut += count_cut(chunk, window, max_tokens)
        chunk, params.max_tokens = fit_prompts(chunk, window, max_tokens)
        texts += [c.text for c in generator.generate(chunk, params)]
    return texts, n_cut


def completion_flags(
    generator: Generator, rows: list[dict[str, Any]], *, chat: bool, max_tokens: int, batch_size: int = 32,
    match: Callable[[str, list[str]], bool] = contains_answer, task: str = "completion",
) -> tuple[list[bool], list[str], int]:  # fmt: skip
    """Per row: does the greedy completion `match` one of its `answers` (or `answer`)? And the completions, and how
    many prompts were cut to fit the window.

    Base rows continue `prompt` and stop at the end of the line; chat rows answer `messages`."""
    prompts = [prompt_ids(generator.tokenizer, r, chat) for r in rows]
    texts, n_cut = greedy_texts(generator, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                stop=None if chat else ["\n"])  # fmt: skip
    warn_cut(task, n_cut, len(rows), generator.model.config.max_position_embeddings)
    return [bool(match(t, r.get("answers") or [r["answer"]])) for t, r in zip(texts, rows)], texts, n_cut


def completion_accuracy(
    generator: Generator, rows: list[dict[str, Any]], *, chat: bool = False, max_tokens: int = 24,
    batch_size: int = 32, keep_examples: int = 6,
    match: Callable[[str, list[str]], bool] = contains_answer, task: str = "completion",
) -> dict[str, Any]:  # fmt: skip
    """Share of rows whose greedy completion `match`es one of `answers` (or `answer`); per language too.

    Rows are {prompt, answer(s), lang} for a base model, or {messages, answer(s), lang} with chat=True. The world's
    held-out quantities go through danlu.eval.world (one figure each, with n and a confidence interval); this plain
    share is for callers scoring their own rows.
    """
    flags, texts, n_cut = completion_flags(generator, rows, chat=chat, max_tokens=max_tokens, batch_size=batch_size,
                                           match=match, task=task)  # fmt: skip
    by_lang: dict[str, list[int]] = {}
    for ok, row in zip(flags, rows):
        by_lang.setdefault(row.get("lang", "all"), []).append(int(ok))
    examples = [{"prompt": r["messages"][-1]["content"] if chat else r["prompt"], "completion": t,
                 "answer": (r.get("answers") or [r["answer"]])[0], "correct": ok}
                for r, t, ok in list(zip(rows, texts, flags))[:keep_examples]]  # fmt: skip
    out: dict[str, Any] = {"accuracy": round(sum(flags) / max(1, len(rows)), 4), "n": len(rows),
                           "prompts_truncated": n_cut, "examples": examples}  # fmt: skip
    for lang, v in sorted(by_lang.items()):
        out[f"accuracy_{lang}"] = round(sum(v) / max(1, len(v)), 4)
    return out


# ───────────────────────── GSM8K-style exact match ─────────────────────────

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def canonical_number(text: str) -> str:
    """'1,234.50' → '1234.5': answers compare as numbers, not strings."""
    s = text.replace(",", "").strip().rstrip(".")
    try:
        value = Decimal(s)  # exact: a float turns 555555555555555555555 into ...540992
    except InvalidOperation:
        return s
    if not value.is_finite():
        return s
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def extract_reference(answer: str) -> str:
    """GSM8K's reference: the number after `#### `; a bare number as it is."""
    m = FINAL.search(answer)
    if m:
        return canonical_number(m.group(1))
    found = NUMBER.findall(answer)
    return canonical_number(found[-1]) if found else answer.strip()


def extract_prediction(completion: str) -> str | None:
    """The model's answer: after `####` when it wrote one (the format its shots teach), else its last number."""
    m = FINAL.search(completion)
    if m:
        return canonical_number(m.group(1))
    found = NUMBER.findall(completion)
    return canonical_number(found[-1]) if found else None


def gsm8k_prompt(question: str, shots: list[dict[str, Any]]) -> str:
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def gsm8k_accuracy(
    generator: Generator, rows: list[dict[str, Any]], *, shots: list[dict[str, Any]] | None = None,
    chat: bool = False, max_tokens: int = 256, batch_size: int = 16, keep_examples: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Exact match of the extracted final number, greedy and batched (GSM8K: {question, answer ending `#### N`})."""
    tok = generator.tokenizer
    shots = shots or []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if not chat:
        params.stop = ["\n\nQuestion:", "Question:"]
    window = generator.model.config.max_position_embeddings
    correct, examples, n_cut = 0, [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = []
        for r in chunk:
            if chat:
                msgs: list[dict[str, str]] = []
                for s in shots:
                    msgs += [
                        {"role": "user", "content": s["question"]},
                        {"role": "assistant", "content": s["answer"]},
                    ]
                msgs.append({"role": "user", "content": r["question"]})
                ids = tok.render_chat(msgs, add_generation_prompt=True)[0]
            else:
                ids = [tok.bos_id, *tok.encode(gsm8k_prompt(r["question"], shots))]
            prompts.append(ids)
        n_cut += count_cut(prompts, window, max_tokens)
        prompts, params.max_tokens = fit_prompts(prompts, window, max_tokens)
        for row, comp in zip(chunk, generator.generate(prompts, params)):
            ref = extract_reference(str(row["answer"]))
            pred = extract_prediction(comp.text)
            ok = pred is not None and pred == ref
            correct += ok
            if len(examples) < keep_examples:
                examples.append({"prompt": row["question"], "completion": comp.text, "answer": ref,
                                 "prediction": pred, "correct": ok})  # fmt: skip
    warn_cut(
        "gsm8k",
        n_cut,
        len(rows),
        window,
        "use fewer --shots, a smaller --max-tokens or a longer-context model",
    )
    return {"accuracy": round(correct / max(1, len(rows)), 4), "n": len(rows), "shots": len(shots),
            "prompts_truncated": n_cut, "examples": examples}  # fmt: skip
