"""Preference pairs and RL prompts from the formats people already have, each turned into chat messages.

Preference records (one per line of JSONL, or rows of JSON/Parquet):
- danlu / TRL: `prompt` (string or messages), `chosen` / `rejected` (strings or assistant message lists; TRL's
  conversational format and danlu's feedback export). Without `prompt`, chosen and rejected are whole
  conversations and their common prefix is the prompt (TRL's implicit prompt).
- LLaMA-Factory DPO: `conversations` (ShareGPT from/value, optional `system`) + `chosen` / `rejected` messages;
  or its Alpaca form `instruction` (+ `input`) + `chosen` / `rejected` strings.
- HH-RLHF: `chosen` / `rejected` transcripts "\\n\\nHuman: … \\n\\nAssistant: …".
RL prompts: `messages` (or `prompt`, or GSM8K's `question`) plus `answer` / `answers` and optional `reward`.
Bad records raise a DanluError naming file and line.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.data.position import batch_state, resumed_position

Message = dict[str, Any]
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
           "observation": "tool", "tool": "tool", "function_call": "assistant"}  # fmt: skip


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]  # the preferred continuation (assistant messages)
    rejected: list[Message]
    margin: float | None = None  # optional label strength for the reward model's margin loss
    where: str = ""


@dataclass
class RLPrompt:
    messages: list[Message]
    answers: list[str] = field(default_factory=list)
    reward: str | None = None  # a reward function name; None = the stage default
    where: str = ""
    # checkable intermediate results ("6+8=14"), for GRPO's step credit
    steps: list[str] = field(default_factory=list)
    # the tool a right answer needs (get_date, calculator); None: answered without one (rollouts with tools on
    # pay nothing for a call on such a prompt)
    tool: str | None = None
    today: str | None = (
        None  # ISO date that get_date returns in this prompt's rollouts (the answer depends on it)
    )


def records_with_lines(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(\"file:line\", record) for JSONL/JSON/Parquet/CSV files, via danlu.files.located_records (over-long records
    skipped with a warning)."""
    import sys

    from danlu.files import Oversized, RecordProblem, located_records

    for where, rec in located_records(Path(path)):
        if isinstance(rec, Oversized):
            print(f"[danlu] warning: {rec}", file=sys.stderr)
            continue
        if isinstance(rec, RecordProblem):
            raise rec
        yield where, rec


def _messages(value: Any, where: str, key: str) -> list[Message]:
    """A string (one user turn), a message list (role/content or ShareGPT from/value) → role/content messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DanluError(f"{where}: `{key}` must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DanluError(f"{where}: `{key}`[{i}] is not a message object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_OF:
            raise DanluError(f"{where}: `{key}`[{i}] has unknown role {role!r}")
        if content is None and not m.get("tool_calls"):
            raise DanluError(f"{where}: `{key}`[{i}] has no content")
        msg = {"role": ROLE_OF[role], "content": content if content is not None else ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def _completion(value: Any, where: str, key: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, where, key)
    if isinstance(value, dict) and msgs[0]["role"] == "user":  # LLaMA-Factory: {"from": "gpt", ...}
        raise DanluError(f"{where}: `{key}` must be an assistant message")
    return msgs


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str, where: str, key: str) -> list[Message]:
    """An HH-RLHF transcript → messages; it must start with a Human turn and alternate."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        raise DanluError(f"{where}: `{key}` is not an HH-RLHF transcript (\\n\\nHuman: … \\n\\nAssistant: …)")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def _split_common(chosen: list[Message], rejected: list[Message], where: str) -> tuple[list[Message], ...]:
    """Whole conversations sharing a prompt → (prompt, chosen tail, rejected tail), cut before the last
    shared assistant turn so that both tails start with the differing assistant answer."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise DanluError(
            f"{where}: chosen and rejected share no prompt (expected the same conversation start)"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(rec: dict[str, Any], where: str) -> PreferencePair:
    """One preference record in any of the supported formats → a validated PreferencePair."""
    if "chosen" not in rec or "rejected" not in rec:
        raise DanluError(
            f"{where}: a preference record needs `chosen` and `rejected` (plus `prompt`, `conversations` or "
            f"`instruction`, or HH-RLHF transcripts); found keys {sorted(rec)}"
        )
    chosen_raw, rejected_raw = rec["chosen"], rec["rejected"]
    if "conversations" in rec:  # LLaMA-Factory ShareGPT-style DPO
        prompt = _messages(rec["conversations"], where, "conversations")
        if rec.get("system"):
            prompt = [{"role": "system", "content": rec["system"]}, *prompt]
        chosen, rejected = (
            _completion(chosen_raw, where, "chosen"),
            _completion(rejected_raw, where, "rejected"),
        )
    elif "instruction" in rec:  # LLaMA-Factory Alpaca-style DPO
        text = "\n".join(x for x in (rec["instruction"], rec.get("input") or "") if x)
        prompt = [{"role": "user", "content": text}]
        chosen, rejected = (
            _completion(chosen_raw, where, "chosen"),
            _completion(rejected_raw, where, "rejected"),
        )
    elif "prompt" in rec:
        prompt = _messages(rec["prompt"], where, "prompt")
        chosen, rejected = (
            _completion(chosen_raw, where, "chosen"),
            _completion(rejected_raw, where, "rejected"),
        )
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str):  # HH-RLHF
        prompt, chosen, rejected = _split_common(
            parse_hh(chosen_raw, where, "chosen"), parse_hh(rejected_raw, where, "rejected"), where
        )
    else:  # TRL implicit prompt: whole conversations
        prompt, chosen, rejected = _split_common(
            _messages(chosen_raw, where, "chosen"), _messages(rejected_raw, where, "rejected"), where
        )
    for key, comp in (("chosen", chosen), ("rejected", rejected)):
        if not comp or comp[0]["role"] != "assistant":
            raise DanluError(f"{where}: `{key}` must start with an assistant answer")
        if not any(str(m["content"]).strip() or m.get("tool_calls") for m in comp):
            raise DanluError(f"{where}: `{key}` is an empty completion")
    if chosen == rejected:
        raise DanluError(
            f"{where}: chosen and rejected are identical; such a pair teaches nothing (remove it)"
        )
    margin = rec.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise DanluError(f"{where}: `margin` must be a number, got {margin!r}")
    return PreferencePair(prompt, chosen, rejected, float(margin) if margin is not None else None, where)


def read_pairs(
    paths: str | Path | list[str | Path], limit: int | None = None, split: str | None = None
) -> list[PreferencePair]:
    """Preference pairs from files or folders; errors if none are found. `split` as in read_rl_prompts."""
    from danlu.files import expand_inputs

    files = expand_inputs([paths] if isinstance(paths, (str, Path)) else paths)
    out: list[PreferencePair] = []
    for f in files:
        for where, rec in records_with_lines(f):
            if split is not None and rec.get("split", "dev") != split:
                continue
            out.append(parse_pair(rec, where))
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DanluError(f"{', '.join(map(str, files))}: no preference pairs found")
    return out


GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def parse_rl_prompt(rec: dict[str, Any], where: str) -> RLPrompt:
    if "messages" in rec:
        msgs = _messages(rec["messages"], where, "messages")
    elif "prompt" in rec:
        msgs = _messages(rec["prompt"], where, "prompt")
    elif "question" in rec:
        msgs = _messages(rec["question"], where, "question")
    else:
        raise DanluError(
            f"{where}: an RL prompt needs `messages`, `prompt` or `question`; found keys {sorted(rec)}"
        )
    while msgs and msgs[-1]["role"] == "assistant" and "question" not in rec:
        msgs = msgs[:-1]  # a trailing answer is not part of the prompt
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        raise DanluError(f"{where}: the prompt must end with a user message")
    answers = rec.get("answers") or ([rec["answer"]] if rec.get("answer") is not None else [])
    if not isinstance(answers, list):
        raise DanluError(f"{where}: `answers` must be a list")
    answers = [str(a) for a in answers]
    reward = rec.get("reward")
    if (
        reward is None and answers and (m := GSM8K_ANSWER.search(answers[0]))
    ):  # GSM8K: reasoning then "#### 72"
        answers, reward = [m.group(1).replace(",", "")], "gsm8k"
    if not answers and reward is None:
        raise DanluError(
            f"{where}: an RL prompt needs an `answer` (or `answers`) or a `reward` function name"
        )
    steps = rec.get("steps") or []
    if not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
        raise DanluError(
            f'{where}: `steps` must be a list of strings (intermediate results such as "6+8=14")'
        )
    tool, today = rec.get("tool"), rec.get("today")
    if tool is not None:
        from danlu.tools import TOOL_NAMES

        if tool not in TOOL_NAMES:
            raise DanluError(
                f"{where}: `tool` is {tool!r}; expected one of {', '.join(TOOL_NAMES)} (or no field)"
            )
    if today is not None:
        import datetime as dt

        try:
            dt.date.fromisoformat(str(today))
        except ValueError:
            raise DanluError(
                f"{where}: `today` is {today!r}; expected an ISO date such as 2026-12-05"
            ) from None
    return RLPrompt(msgs, answers, reward, where, steps, tool, None if today is None else str(today))


def read_rl_prompts(
    paths: str | Path | list[str | Path], limit: int | None = None, split: str | None = None
) -> list[RLPrompt]:
    """RL prompts from files; with `split` ("dev"), only rows whose `split` field is that (rows without the field
    count as dev: held-out files written before splits existed), so a stage's own before/after never reads test."""
    from danlu.files import expand_inputs

    files = expand_inputs([paths] if isinstance(paths, (str, Path)) else paths)
    out: list[RLPrompt] = []
    for f in files:
        for where, rec in records_with_lines(f):
            if split is not None and rec.get("split", "dev") != split:
                continue
            out.append(parse_rl_prompt(rec, where))
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DanluError(f"{', '.join(map(str, files))}: no RL prompts found")
    return out


def pair_to_json(p: PreferencePair) -> str:
    """The pair in danlu's canonical form (TRL conversational): what `danlu feedback export` writes too."""
    return json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}, ensure_ascii=False)


def encode_completion(
    tokenizer: Any, prompt: list[Message], completion: list[Message]
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion and a mask that is 1 only on the completion's assistant tokens
    (its content and closing <|im_end|>), never on earlier assistant turns of a multi-turn prompt."""
    ids, mask = tokenizer.render_chat([*prompt, *completion])
    head = tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
    cut = len(head) if ids[: len(head)] == head else len(head) - 1  # a boundary token may merge differently
    return ids, [0] * cut + mask[cut:]


def rows_from_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """(ids, mask) sequences → right-padded `input_ids` (B, T-1) and `targets` with IGNORE_INDEX off the mask."""
    import torch

    from danlu.model import IGNORE_INDEX

    longest = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        t = torch.tensor(ids[1:])
        m = torch.tensor(mask[1:], dtype=torch.bool)
        y[i, :n] = torch.where(m, t, torch.full_like(t, IGNORE_INDEX))
    return {"input_ids": x, "targets": y}


def encode_pairs(pairs: list[Any], tokenizer: Any, context: int) -> tuple[list[tuple], int]:
    """[(chosen (ids, mask), rejected (ids, mask), margin)] of the pairs that fit the context; and the count dropped."""
    from danlu.data.preference import encode_completion

    out, dropped = [], 0
    for p in pairs:
        c = encode_completion(tokenizer, p.prompt, p.chosen)
        r = encode_completion(tokenizer, p.prompt, p.rejected)
        if max(len(c[0]), len(r[0])) > context:
            dropped += 1
            continue
        if c[0] == r[0]:
            raise DanluError(
                f"{p.where}: chosen and rejected give the same tokens; such a pair teaches nothing"
            )
        out.append((c, r, p.margin))
    return out, dropped


class PairBatches:
    """Shuffled micro-batches of pairs as one tensor of 2B rows; its position is part of the checkpoint.

    Under torchrun each of the `world_size` ranks takes its own B pairs of every global batch of B × world_size
    (rank r the r-th slice), so N processes see N times the pairs of one, and together exactly the pairs one process
    with batch B × world_size would see."""

    def __init__(
        self,
        encoded: list[tuple],
        batch_size: int,
        pad_id: int,
        seed: int,
        extra: dict[str, list] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.encoded, self.batch_size, self.pad_id, self.seed = encoded, batch_size, pad_id, seed
        self.extra = extra or {}  # per-pair values added to each batch (DPO's cached reference log-probs)
        self.rank, self.world_size = rank, world_size
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.encoded)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def indices(self, position: int) -> list[int]:
        """This rank's pairs of global batch `position`: a window of the epoch-shuffled order."""
        n = len(self.encoded)
        start = (position * self.world_size + self.rank) * self.batch_size
        out = []
        for k in range(start, start + self.batch_size):
            out.append(self._order(k // n)[k % n])
        return out

    def next_batch(self) -> dict[str, Any]:
        idx = self.indices(self.position)
        self.position += 1
        return self.batch(idx)

    def batch(self, idx: list[int]) -> dict[str, Any]:
        import torch  # lazily, as rows_from_sequences: data preparation never needs it

        seqs = [self.encoded[i][0] for i in idx] + [self.encoded[i][1] for i in idx]
        out = rows_from_sequences(seqs, self.pad_id)
        out["lengths"] = torch.tensor([len(s[0]) - 1 for s in seqs])
        margins = [self.encoded[i][2] for i in idx]
        out["margin"] = torch.tensor([m if m is not None else 0.0 for m in margins], dtype=torch.float32)
        for key, values in self.extra.items():
            out[key] = torch.tensor([values[i] for i in idx] + [values[i + len(self.encoded)] for i in idx])
        return out

    def sequential(self, batch_size: int) -> Any:
        for start in range(0, len(self.encoded), batch_size):
            yield self.batch(list(range(start, min(start + batch_size, len(self.encoded)))))

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "pairs": len(self.encoded),
            **batch_state(self.batch_size, self.world_size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = resumed_position(state, "pairs", len(self.encoded), self.world_size, "data",
                                         batch=self.batch_size, rank=self.rank)  # fmt: skip
