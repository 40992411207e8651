"""Zero-shot detectors: scores from one or two language models' token distributions, with no training.

- **Fast-DetectGPT** (Bao et al., ICLR 2024), analytic sampling discrepancy: with a scoring model p and a reference
  (sampling) model q, for tokens x_1..x_n,
      d = (Σ_t log p_t(x_t) − Σ_t μ_t) / sqrt(Σ_t σ²_t),  μ_t = Σ_v q_t(v) log p_t(v),
      σ²_t = Σ_v q_t(v) (log p_t(v))² − μ_t²
  Machine text sits near the mode of the model (d large); human text is more surprising than the model's own
  samples. The white-box setting uses one model as both p and q.
- **Binoculars** (Hans et al., ICML 2024): B = log PPL_performer(x) / X-PPL(observer, performer), where
  log PPL is the mean token cross-entropy of the text under the performer and X-PPL the mean over positions of
  −Σ_v observer_t(v) log performer_t(v). Machine text has a low B; its machine score here is −B.

Both follow the reference implementations (the papers' repositories) term for term; a test checks them against a
plain per-token loop. Every score is oriented "higher = more likely machine", as danlu.detect.metrics expects. Two
models must share a tokenizer (token ids must mean the same thing); texts keep their first tokens up to the
smaller context, the classifier's truncation policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from danlu import DanluError
from danlu.detect.texts import encode

METHODS = ("fast-detectgpt", "binoculars")


def fast_detectgpt(
    score_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Analytic sampling discrepancy per row. logits (B, T, V) predict labels (B, T); label -100 is padding."""
    mask = (labels != -100).to(score_logits.dtype)
    lp = F.log_softmax(score_logits.float(), -1)
    q = F.softmax(ref_logits.float(), -1)
    ll = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mean = (q * lp).sum(-1)
    var = (q * lp.square()).sum(-1) - mean.square()
    return ((ll - mean) * mask).sum(-1) / (var * mask).sum(-1).clamp(min=1e-12).sqrt()


def binoculars(
    observer_logits: torch.Tensor, performer_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Binoculars score per row (lower = more machine-like); shapes as in `fast_detectgpt`."""
    mask = (labels != -100).float()
    n = mask.sum(-1).clamp(min=1)
    lp_perf = F.log_softmax(performer_logits.float(), -1)
    nll = -lp_perf.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_ppl = (nll * mask).sum(-1) / n
    x_ent = -(F.softmax(observer_logits.float(), -1) * lp_perf).sum(-1)
    x_ppl = (x_ent * mask).sum(-1) / n
    return log_ppl / x_ppl


class ZeroShot:
    """A zero-shot detector over one or two loaded checkpoints (danlu.io.Checkpoint).

    fast-detectgpt: `model` scores, `second` (default: `model`) is the reference that "samples".
    binoculars: `model` is the observer, `second` (default: `model`) the performer."""

    def __init__(self, method: str, model: Any, second: Any | None = None, max_tokens: int = 256,
                 batch_size: int = 8) -> None:  # fmt: skip
        if method not in METHODS:
            raise DanluError(f"--zero-shot {method!r}: known methods are {', '.join(METHODS)}")
        from danlu.rewards import check_same_tokenizer

        second = second or model
        if second is not model:
            check_same_tokenizer(model.tokenizer, second.tokenizer, f"zero-shot {method}", str(model.path),
                                 str(second.path))  # fmt: skip
        if model.tokenizer.bos_id is None:
            raise DanluError(f"{model.path}: its tokenizer has no bos/eos token to start a text with")
        self.method, self.model, self.second, self.batch_size = method, model, second, batch_size
        contexts = [int(c.config.max_position_embeddings) for c in (model, second)]
        self.max_tokens = min([max_tokens, *contexts])
        self.truncated = 0
        self.name = f"{method}({Path(model.path).name}" + (
            f", {Path(second.path).name})" if second is not model else ")"
        )

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def _ids(self, text: str) -> list[int]:
        ids = encode(self.model.tokenizer, text)
        bos = self.model.tokenizer.bos_id
        if not ids or ids[0] != bos:
            ids = [bos, *ids]  # the first token of the text is scored too, as after a document boundary
        if len(ids) > self.max_tokens:
            ids, self.truncated = ids[: self.max_tokens], self.truncated + 1
        if len(ids) < 2:
            raise DanluError(f"zero-shot: the text {text[:40]!r} has no token to score")
        return ids

    @torch.no_grad()
    def _logits(self, ckpt: Any, ids: torch.Tensor) -> torch.Tensor:
        device = next(ckpt.model.parameters()).device
        return ckpt.model(ids.to(device)).float().cpu()

    @torch.no_grad()
    def raw_scores(self, texts: list[str]) -> list[float]:
        """The method's own number (Fast-DetectGPT's d; the Binoculars ratio B)."""
        self.truncated = 0
        rows = [self._ids(t) for t in texts]
        out = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            longest = max(len(rows[i]) for i in idx)
            pad = self.model.tokenizer.pad_id or 0
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            labels = torch.full((len(idx), longest - 1), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                labels[j, : len(rows[i]) - 1] = torch.tensor(rows[i][1:])
            first = self._logits(self.model, ids)[:, :-1]
            other = first if self.second is self.model else self._logits(self.second, ids)[:, :-1]
            fn = fast_detectgpt if self.method == "fast-detectgpt" else binoculars
            for i, v in zip(idx, fn(first, other, labels).tolist()):
                out[i] = v
        return out

    def scores(self, texts: list[str]) -> list[float]:
        """Machine scores: higher = more likely machine (−B for Binoculars)."""
        raw = self.raw_scores(texts)
        return raw if self.method == "fast-detectgpt" else [-v for v in raw]


def open_zero_shot(method: str, model: str | Path, second: str | Path | None = None, max_tokens: int = 256,
                   device: str = "cpu") -> ZeroShot:  # fmt: skip
    from danlu.io import load_checkpoint

    first = load_checkpoint(model, device=device, quiet=True)
    other = load_checkpoint(second, device=device, quiet=True) if second else None
    return ZeroShot(method, first, other, max_tokens)
