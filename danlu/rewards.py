"""Reward functions that check answers, a reward-model wrapper, and the guard that keeps bad rewards out.

A reward function is `fn(completion: str, answers: list[str]) -> float`. Checkable rewards are what GRPO
needs (no reward model to fool): world arithmetic (the last number of the answer must be right), GSM8K
(`#### N`, else the last number), exact and contains match. `compute_rewards` calls them and turns an
exception or a NaN into one clear DanluError, so training never continues on garbage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.model import Decoder, Transformer, rope_tables

RewardFn = Callable[[str, list[str]], float]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(text: str) -> str:
    return "".join(text.lower().split()).rstrip("。.!！")


def numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


def arithmetic_reward(completion: str, answers: list[str]) -> float:
    """1 when the last number in the completion equals the answer (the question's own numbers come first)."""
    found = numbers(completion)
    return float(bool(found) and any(_same_number(found[-1], a) for a in answers))


def gsm8k_reward(completion: str, answers: list[str]) -> float:
    """GSM8K: the number after `####`, or else the last number, must equal the answer."""
    m = re.search(r"####\s*(-?[\d,]+(?:\.\d+)?)", completion)
    got = m.group(1).replace(",", "") if m else (numbers(completion) or [""])[-1]
    return float(any(_same_number(got, a.replace(",", "")) for a in answers))


def exact_match_reward(completion: str, answers: list[str]) -> float:
    return float(any(_norm(completion) == _norm(a) for a in answers))


def contains_reward(completion: str, answers: list[str]) -> float:
    got = _norm(completion)
    return float(any(_norm(a) and _norm(a) in got for a in answers))


def world_reward(completion: str, answers: list[str]) -> float:
    """The world corpus's RL prompts: numeric answers are checked as arithmetic, others as contained facts."""
    if answers and all(NUMBER.fullmatch(a.strip()) for a in answers):
        return arithmetic_reward(completion, answers)
    return contains_reward(completion, answers)


def step_credit(completion: str, steps: list[str]) -> float:
    """Share of a worked solution's intermediate results ("6+8=14") written in the completion (spaces ignored).

    A dense, still checkable signal: a small model rarely gets a whole two-digit sum right at first, so a reward on
    the final number alone is 0 for most samples and GRPO has nothing to compare; right steps are what it must learn.
    """
    if not steps:
        return 0.0
    text = "".join(completion.split())
    found = sum(bool(re.search(rf"(?<![0-9]){re.escape(s)}(?![0-9])", text)) for s in steps)
    return found / len(steps)


_EQUATION = re.compile(r"(?<![0-9])[0-9]+(?:[-+×÷*/][0-9]+)+=[0-9]+")


def step_marks(completion: str, steps: list[str]) -> list[tuple[int, float]]:
    """Where each expected step was written and whether it is right: for the k-th of `steps`, the character offset
    just past the k-th equation of the completion and 1.0 when that equation is the step ("9-8=1"; spaces
    ignored), 0.0 when it is not ("9-8=0", or a misread "0+2=2"); a step never written scores 0.0 at the end.

    This is the process supervision of GRPO (DeepSeekMath §4.1.3) with checked steps instead of a learned process
    reward model: credit lands on the column that went wrong, not spread over the whole answer."""
    kept = [i for i, ch in enumerate(completion) if not ch.isspace()]
    squeezed = "".join(completion[i] for i in kept)
    written = [(kept[m.end() - 1] + 1, m.group(0)) for m in _EQUATION.finditer(squeezed)]
    marks = []
    for k, step in enumerate(steps):
        if k < len(written):
            marks.append((written[k][0], float(written[k][1] == step)))
        else:
            marks.append((len(completion), 0.0))
    return marks


def tool_use_reward(
    needed: str | None, calls: list[tuple[str, str]], malformed: bool, answer_score: float, answers: list[str]
) -> float:
    """The reward of an episode whose tool calls were executed: `calls` are (tool name, result) in order,
    `answer_score` is the checking reward of the final answer written after the results came back.

    Pays for tools only where they are needed: a malformed call (a `<tool_call>` that does not parse) earns 0; a
    call on a prompt that needs none (by-hand arithmetic, a fact) earns 0, because the held-out evals and users
    expect those answered directly; on a prompt that needs a tool, the final answer counts only after a call to
    that tool, and for the calculator only when one of its results is the right number (the answer was computed,
    not guessed). A date cannot be guessed right except by luck, so get_date's check is the final answer's."""
    if malformed:
        return 0.0
    if needed is None:
        return 0.0 if calls else answer_score
    results = [result for name, result in calls if name == needed]
    if not results:
        return 0.0
    if needed == "calculator" and not any(_same_number(r, a) for r in results for a in answers):
        return 0.0
    return answer_score


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "world": world_reward,
    "arithmetic": arithmetic_reward,
    "gsm8k": gsm8k_reward,
    "exact": exact_match_reward,
    "contains": contains_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FUNCTIONS:
        raise DanluError(
            f"unknown reward function {name!r}; known: {', '.join(REWARD_FUNCTIONS)} (or a reward model folder)"
        )
    return REWARD_FUNCTIONS[name]


def compute_rewards(
    fns: list[RewardFn], completions: list[str], answers: list[list[str]], where: list[str], names: list[str]
) -> list[float]:
    """Calls each row's reward function; an exception or a non-finite reward stops training with its row."""
    out = []
    for fn, text, ans, w, name in zip(fns, completions, answers, where, names):
        try:
            value = float(fn(text, ans))
        except Exception as e:
            raise DanluError(
                f"reward function {name!r} raised {type(e).__name__}: {e} (prompt {w}, completion {text[:80]!r}); "
                "training stopped rather than continue on a broken reward"
            ) from None
        if not math.isfinite(value):
            raise DanluError(
                f"reward function {name!r} returned {value} (prompt {w}, completion {text[:80]!r}); "
                "training stopped rather than continue on a broken reward"
            )
        out.append(value)
    return out


# ── the reward model ─────────────────────────────────────────────────────────────────────────────────────


class RewardModel(nn.Module):
    """A Llama backbone plus a scalar head: transformers' `LlamaForSequenceClassification` with one label.

    Parameter names are exactly HF's (`model.*`, `score.weight`), so a checkpoint is a plain state dict. The
    score of a sequence is the head's output at its last token (HF takes the last non-pad token).
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.hidden_size + 1))
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    hidden_states = Transformer.hidden_states  # the same code path as the policy: positions, masks, norm
    _rope = Transformer._rope

    @classmethod
    def from_policy(cls, policy: nn.Module) -> RewardModel:
        rm = cls(policy.config)
        rm.model.load_state_dict(policy.model.state_dict())
        return rm.to(policy.lm_head.weight.device)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of right-padded rows; `lengths` (B,) are the real lengths."""
        h = self.hidden_states(input_ids)
        last = h[torch.arange(h.size(0), device=h.device), lengths - 1]
        return self.score(last).squeeze(-1).float()


def save_reward_model(
    folder: Path, state_dict: dict[str, torch.Tensor], cfg: Any, tokenizer: Any, meta: dict
) -> None:
    """An HF folder that transformers loads as LlamaForSequenceClassification (num_labels 1, pad_token_id set)."""
    from danlu.families import hf_config
    from danlu.io import save_model_dir

    save_model_dir(folder, state_dict, cfg, tokenizer, {**meta, "reward_model": True}, chat=True)
    config = hf_config(cfg, tokenizer, chat=True)
    config.update(
        architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0}, pad_token_id=tokenizer.pad_id, problem_type="regression",
    )  # fmt: skip
    (folder / "config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def is_reward_model(path: str | Path) -> bool:
    """A full reward model folder, or a reward adapter (LoRA + score head) that `danlu reward --peft` wrote."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return _is_reward_adapter(Path(path))
    try:
        return "LlamaForSequenceClassification" in json.loads(cfg.read_text()).get("architectures", [])
    except json.JSONDecodeError:
        return False


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    from danlu.families import model_config_from_hf
    from danlu.io import load_weights
    from danlu.tokenizer import Tokenizer

    path = Path(path)
    if _is_reward_adapter(path):
        return _load_reward_adapter(path, device)
    if not is_reward_model(path):
        raise DanluError(
            f"{path}: not a reward model folder (config.json architectures lacks LlamaForSequenceClassification)"
        )
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()), path)
    tokenizer = Tokenizer.load(path)
    tokenizer.check_fits(cfg.vocab_size, str(path))
    rm = RewardModel(cfg)
    missing, unexpected = rm.load_state_dict(load_weights(path), strict=False)
    if missing or unexpected:
        raise DanluError(
            f"{path}: tensors do not fit a reward model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return rm.to(device).eval(), tokenizer


def check_same_tokenizer(a: Any, b: Any, what: str, where_a: str, where_b: str) -> None:
    """Raises, naming the first difference, unless the two tokenizers give token ids the same meaning."""
    from danlu.tokenizer import tokenizer_difference

    diff = tokenizer_difference(a, b, where_a, where_b)
    if diff:
        raise DanluError(
            f"{what}: the tokenizer of {where_b} differs from that of {where_a} ({diff}); token ids would not mean "
            "the same thing (use models trained with the same tokenizer)"
        )


def _is_reward_adapter(path: Path) -> bool:
    from danlu.adapters import is_adapter_folder
    from danlu.io import read_meta

    return is_adapter_folder(path) and bool(read_meta(path).get("reward_model"))


def _load_reward_adapter(path: Path, device: str | torch.device) -> tuple[RewardModel, Any]:
    """Base (the SFT model the adapter names) as a reward model, with the adapter's LoRA and score head on it."""
    from danlu.adapters.folder import attach_saved, read_adapter_config, read_adapter_tensors
    from danlu.adapters.identity import check_base
    from danlu.io import load_checkpoint, read_meta

    meta, config = read_meta(path), read_adapter_config(path)
    base = (meta.get("base") or {}).get("name") or config.base_model_name_or_path
    if not base:
        raise DanluError(f"{path}: the reward adapter names no base model (base_model_name_or_path)")
    ckpt = load_checkpoint(base, quiet=True)
    if (ckpt.meta or {}).get(
        "adapter"
    ):  # trained from an SFT adapter, which the stage merged into its base first
        from danlu.adapters import merge

        merge(ckpt)
    check_base(path, meta.get("base"), ckpt.path, ckpt.config, ckpt.tokenizer, quiet=True)
    ckpt.model = RewardModel.from_policy(ckpt.model)
    attach_saved(ckpt, config, read_adapter_tensors(path), str(path))
    return ckpt.model.to(device).eval(), ckpt.tokenizer


class RewardModelScorer:
    """A reward model as a reward function over whole conversations (prompt messages + completion)."""

    def __init__(self, model: RewardModel, tokenizer: Any, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, Any]]]) -> list[float]:
        device = self.model.score.weight.device
        limit = self.model.config.max_position_embeddings
        out: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            rows = [
                self.tokenizer.render_chat(c)[0][-limit:]
                for c in conversations[start : start + self.batch_size]
            ]
            ids, lengths = pad_right(rows, self.tokenizer.pad_id)
            out.extend(self.model(ids.to(device), lengths.to(device)).tolist())
        return out


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and their lengths."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)
