"""Generative evaluation: greedy, batched completions scored by whether they contain an accepted answer."""

from __future__ import annotations

import re
from collections.abc import Callable
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


def completion_accuracy(
    generator: Generator, rows: list[dict[str, Any]], *, chat: bool = False, max_tokens: int = 24,
    batch_size: int = 32, keep_examples: int = 6,
    match: Callable[[str, list[str]], bool] = contains_answer, task: str = "completion",
) -> dict[str, Any]:  # fmt: skip
    """Share of rows whose greedy completion `match`es one of `answers` (or `answer`); per language too.

    Rows are {prompt, answer(s), lang} for a base model, or {messages, answer(s), lang} with chat=True.
    """
    tok = generator.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if not chat:
        params.stop = ["\n"]
    correct = n_cut = 0
    by_lang: dict[str, list[int]] = {}
    examples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if chat:
            prompts = [tok.render_chat(r["messages"], add_generation_prompt=True)[0] for r in chunk]
        else:
            prompts = [[tok.bos_id, *tok.encode(r["prompt"])] for r in chunk]
        window = generator.model.config.max_position_embeddings
        n_cut += count_cut(prompts, window, max_tokens)
        prompts, room = fit_prompts(prompts, window, max_tokens)
        params.max_tokens = room
        for row, comp in zip(chunk, generator.generate(prompts, params)):
            answers = row.get("answers") or [row["answer"]]
            ok = match(comp.text, answers)
            correct += ok
            lang = row.get("lang", "all")
            by_lang.setdefault(lang, [0, 0])
            by_lang[lang][0] += ok
            by_lang[lang][1] += 1
            if len(examples) < keep_examples:
                shown = row["messages"][-1]["content"] if chat else row["prompt"]
                examples.append(
                    {"prompt": shown, "completion": comp.text, "answer": answers[0], "correct": bool(ok)}
                )
    n = max(1, len(rows))
    out: dict[str, Any] = {"accuracy": round(correct / n, 4), "n": len(rows), "prompts_truncated": n_cut,
                           "examples": examples}  # fmt: skip
    warn_cut(task, n_cut, len(rows), generator.model.config.max_position_embeddings)
    for lang, (c, t) in sorted(by_lang.items()):
        out[f"accuracy_{lang}"] = round(c / max(1, t), 4)
    return out


# ───────────────────────── GSM8K-style exact match ─────────────────────────

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def canonical_number(text: str) -> str:
    """'1,234.50' → '1234.5': answers compare as numbers, not strings."""
    s = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


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
