"""Ensembles at generation time: several models that share a tokenizer, answering as one.

The ensemble's next-token scores are the weighted average of its members' log-probabilities,
s(x) = Σ_i w_i · log p_i(x) with Σ w_i = 1 (the issue's definition). Sampled through a softmax, that is the
normalized weighted geometric mean of the members' distributions (a product of experts): a token wins only where
every member finds it plausible, which is what keeps an ensemble from inheriting one member's confident mistakes.
`mode="prob"` gives the mixture log Σ_i w_i p_i(x) instead (already normalized). An ensemble of one model, or of a
model with itself, is exactly that model.

`EnsembleModel` has the surface the Generator and the evaluators drive (`config.max_position_embeddings`,
`new_cache`, `hidden_states`, `lm_head`, `model(ids)`, `model(ids, targets)`), so streaming, batching, stop strings,
serving and evaluation work unchanged. An ensemble has no shared hidden space: its `hidden_states` returns the
next-token scores of the last position and its `lm_head` is the identity. Members may be danlu checkpoints or
imported Hugging Face models (native or transformers-backed); their embeddings may be padded differently (scores are
cut to the shared vocabulary), but their vocabularies must be the same token for token (danlu.merge checks them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu import DanluError
from danlu.model import IGNORE_INDEX


@dataclass
class EnsembleConfig:
    """The part of a model config that generation and evaluation read."""

    max_position_embeddings: int
    vocab_size: int
    members: list[str]
    weights: list[float]
    mode: str


class EnsembleCache:
    """One KV cache per member, advanced and reordered together."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    @property
    def pos(self) -> int:
        return self.caches[0].pos

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.caches:
            c.reorder(index)


class _Device(nn.Module):
    """The identity head: the ensemble's 'hidden states' are already scores. `weight` tells callers the device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EnsembleModel(nn.Module):
    """Weighted average of next-token log-probabilities of models sharing a tokenizer (see the module docstring)."""

    supports_compiled_decode = False

    def __init__(
        self,
        models: Sequence[nn.Module],
        vocab_size: int,
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
        mode: str = "logprob",
    ) -> None:
        super().__init__()
        if not models:
            raise DanluError("an ensemble needs at least one model")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        names = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
        if len(weights) != len(models):
            raise DanluError(
                f"ensemble: {len(weights)} weight(s) for {len(models)} models ({', '.join(names)})"
            )
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise DanluError(f"ensemble weights {weights}: each must be >= 0 and their sum > 0")
        if mode not in ("logprob", "prob"):
            raise DanluError(f"ensemble mode {mode!r}: choose logprob (average log-probs) or prob (mixture)")
        for name, m in zip(names, models):
            if m.config.vocab_size < vocab_size:
                raise DanluError(f"ensemble: {name} has {m.config.vocab_size} embedding rows, fewer than the "
                                 f"tokenizer's {vocab_size} tokens")  # fmt: skip
        total = sum(weights)
        self.members = nn.ModuleList(models)
        self.weights = [w / total for w in weights]
        self.vocab_size = vocab_size
        self.width = int(models[0].config.vocab_size)  # embedding rows, padding included
        self.mode = mode
        self.config = EnsembleConfig(
            min(int(m.config.max_position_embeddings) for m in models), self.width, names, self.weights, mode
        )
        self.lm_head = _Device()
        self.lm_head.to(next(models[0].parameters()).device)

    def combine(self, member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Members' logits (…, V_i) → the ensemble's scores (…, width) in float32: entries past the shared vocabulary
        are -inf, and the width is the first member's, so sampling draws exactly as that member alone would."""
        logps = [F.log_softmax(x[..., : self.vocab_size].float(), dim=-1) for x in member_logits]
        if self.mode == "prob":
            logs = [math.log(w) if w > 0 else -math.inf for w in self.weights]
            out = torch.logsumexp(torch.stack([lp + lw for lp, lw in zip(logps, logs)]), dim=0)
        else:
            out = logps[0] * self.weights[0]
            for lp, w in zip(logps[1:], self.weights[1:]):
                out = out + w * lp
        if self.width > self.vocab_size:
            out = F.pad(out, (0, self.width - self.vocab_size), value=-math.inf)
        return out

    def new_cache(
        self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None
    ) -> EnsembleCache:
        return EnsembleCache([m.new_cache(batch, max_len, pad=pad) for m in self.members])

    def hidden_states(
        self, ids: torch.Tensor, cache: EnsembleCache | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """(B, 1, V): the ensemble's scores for the token after the last position (what the Generator reads)."""
        outs = []
        for i, m in enumerate(self.members):
            h = m.hidden_states(ids, cache=cache.caches[i] if cache is not None else None, **kwargs)
            outs.append(m.lm_head(h[:, -1:]))
        return self.combine(outs)

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Scores for every position (B, T, V); with `targets`, the cross-entropy of the renormalized scores."""
        scores = self.combine([m(ids) for m in self.members])
        if targets is None:
            return scores
        return F.cross_entropy(
            scores.reshape(-1, scores.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        ).reshape(targets.shape if reduction == "none" else ())


def parse_members(spec: str, weights: str | None = None) -> tuple[list[str], list[float] | None]:
    """`A,B[,C]` and `0.7,0.3` → ([paths], [weights] or None), with counts and numbers checked."""
    members = [m.strip() for m in spec.split(",") if m.strip()]
    if len(members) < 2:
        raise DanluError(f"--ensemble {spec!r}: expected two or more checkpoints separated by commas")
    if weights is None:
        return members, None
    try:
        ws = [float(w) for w in weights.split(",")]
    except ValueError:
        raise DanluError(f"--weights {weights!r}: expected numbers separated by commas") from None
    if len(ws) != len(members):
        raise DanluError(f"--weights {weights!r}: {len(ws)} weight(s) for {len(members)} models ({spec})")
    return members, ws


def load_ensemble(
    paths: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    *,
    device: str | torch.device = "cpu",
    mode: str = "logprob",
) -> Any:
    """Loads the members (danlu.io.load_checkpoint), checks that they share a tokenizer, and returns a
    danlu.io.Checkpoint whose model is the ensemble (tokenizer and path: the first member's)."""
    from danlu.io import Checkpoint, load_checkpoint
    from danlu.merge.merger import check_same_tokenizer

    ckpts = [load_checkpoint(p, device=device, quiet=True) for p in paths]
    first = _Named(str(paths[0]), ckpts[0].tokenizer)
    for p, c in zip(paths[1:], ckpts[1:]):
        check_same_tokenizer(first, _Named(str(p), c.tokenizer))
    names = [str(p) for p in paths]
    model = EnsembleModel(
        [c.model for c in ckpts], ckpts[0].tokenizer.vocab_size, weights, names=names, mode=mode
    )
    meta = {"chat": all(c.is_chat for c in ckpts), "stage": "ensemble",
            "ensemble": {"members": names, "weights": model.weights, "mode": mode}}  # fmt: skip
    return Checkpoint(model=model, tokenizer=ckpts[0].tokenizer, config=model.config, meta=meta,
                      path=ckpts[0].path, backend="ensemble")  # fmt: skip


@dataclass
class _Named:
    """What check_same_tokenizer reads of a model: a name for messages and the tokenizer."""

    ref: str
    tokenizer: Any


@dataclass
class Candidate:
    member: int  # index of the model that wrote it
    completion: Any  # danlu.generate.Completion
    score: float  # the reward model's score of the conversation with this answer


def best_of_n(
    members: Sequence[Any], scorer: Any, messages: list[dict[str, Any]], params: Any, n: int = 1
) -> tuple[Candidate, list[Candidate]]:
    """Best-of-n across models: `n` sampled answers from every member (danlu.io.Checkpoint) to one conversation, each
    scored by a reward model (danlu.rewards.RewardModelScorer) on the whole conversation; returns the best and all
    candidates. LLM-Blender's rank-then-pick with a reward model as the ranker: unlike averaging log-probs, members
    need not share a tokenizer, and one member's strength is kept whole instead of diluted."""
    from danlu.generate import Generator

    if n < 1:
        raise DanluError(f"best-of-n: n must be at least 1, got {n}")
    candidates: list[Candidate] = []
    for i, ckpt in enumerate(members):
        ids = ckpt.tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        for completion in Generator(ckpt.model, ckpt.tokenizer).generate([ids] * n, params):
            candidates.append(Candidate(i, completion, 0.0))
    scores = scorer.score(
        [[*messages, {"role": "assistant", "content": c.completion.text}] for c in candidates]
    )
    for c, s in zip(candidates, scores):
        c.score = float(s)
    return max(candidates, key=lambda c: c.score), candidates
