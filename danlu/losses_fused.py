"""Output projection + cross-entropy in row chunks, without the whole batch's fp32 logits.

The plain path, `cross_entropy(lm_head(x).float(), y)`, holds B·T·V logits in the compute dtype, again in fp32, and
their gradient: at a 1024-token context, batch 8 and Qwen's 151k vocabulary that is 5 GB per copy. Here each chunk of
rows is projected, scored and differentiated at once, and only the chunk's logits ever exist.

Two backward strategies, chosen by what the loss's gradient can be:
- `mean`/`sum` give a scalar, so the upstream gradient is one number. The forward pass already computes the gradient
  of each chunk (softmax − one-hot, times W and xᵀ) and backward only scales it: the same three matmuls as the plain
  path (logits, grad of x, grad of W), none repeated. This is Liger-Kernel's fused linear cross-entropy.
- `none` gives one loss per token, so each row's upstream gradient is known only in backward: the forward keeps the
  log-sum-exp per row and backward recomputes each chunk's logits (one matmul more, still no full logits).

Matmuls run in the autocast dtype when autocast is on (as `lm_head` would under autocast), softmax and the loss in
fp32 (as the plain path's `.float()` does), weight-gradient accumulation in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = (
    -100
)  # targets with this value carry no loss (transformers' labels convention); danlu.model re-exports it

# Rows per chunk: enough that each matmul is large and efficient, few enough that a chunk's fp32 logits stay small
# (2^22 floats = 16 MiB). The chunk count is a Python number, so torch.compile unrolls the loop.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 256


def chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk for a (rows × vocab) logits matrix."""
    return min(rows, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocab)))


def _chunk_starts(n: int, rows: int) -> range:
    """First row of each chunk of `rows` rows. Ranged over the chunk count, not over n: under torch.compile with
    dynamic shapes (RL's batches change length every step) the graph then holds for every n with that many chunks,
    where `range(0, n, rows)` pinned n itself and compiled again for each new batch length."""
    return range(0, rows * (-(-n // rows)), rows)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `lm_head` would multiply in: autocast's where autocast is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _chunk_logits(xc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk; `w` is already in the compute dtype."""
    return (xc.to(w.dtype) @ w.t()).float()


def _softmax_minus_onehot(logits: torch.Tensor, lse: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
    """d loss_i / d logits_i for each row: softmax − one-hot, zero on ignored rows.

    Compiled, one functional expression that inductor fuses into a single pass over the chunk (its scatter is a slow
    serial loop); eager, in place on `logits`, so no further chunk-sized temporaries are made."""
    keep = tc != IGNORE_INDEX
    if torch.compiler.is_compiling():
        onehot = torch.arange(logits.size(1), device=logits.device) == tc.unsqueeze(1)
        grad = (logits - lse.unsqueeze(1)).exp() - onehot.to(logits.dtype)
        return torch.where(keep.unsqueeze(1), grad, 0.0)
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
    return grad.mul_(keep.unsqueeze(1))


def _accumulate_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, xc: torch.Tensor) -> None:
    """grad_w (fp32) += gᵀ · xc, the product in g's dtype (bf16 under autocast, as the plain path's backward)."""
    if g.dtype == torch.float32:
        grad_w.addmm_(g.t(), xc.float())
    else:
        grad_w.add_((g.t() @ xc.to(g.dtype)).float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205 (autograd.Function's own signature)
        ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str, rows: int,
        dtype: torch.dtype, grad_now: bool,
    ):  # fmt: skip
        n = x.size(0)
        w = weight.to(dtype)
        losses = []
        lses = []
        grad_x = torch.empty_like(x) if grad_now else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grad_now else None
        for start in _chunk_starts(n, rows):
            xc, tc = x[start : start + rows], targets[start : start + rows]
            logits = _chunk_logits(xc, w)
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses.append((lse - picked) * (tc != IGNORE_INDEX))
            if grad_now:
                g = _softmax_minus_onehot(logits, lse, tc).to(dtype)
                grad_x[start : start + rows] = (g @ w).to(x.dtype)
                _accumulate_weight_grad(grad_w, g, xc)
            else:
                lses.append(lse)
        loss = torch.cat(losses)
        if reduction == "none":
            ctx.save_for_backward(x, weight, targets, torch.cat(lses))
        else:
            if reduction == "mean":
                scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).float()
                loss = loss.sum() * scale
                if grad_now:
                    grad_x = grad_x * scale.to(x.dtype)
                    grad_w = grad_w * scale
            else:
                loss = loss.sum()
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.reduction, ctx.rows, ctx.dtype = reduction, rows, dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        if ctx.reduction != "none":
            grad_x, grad_w = ctx.saved_tensors
            if grad_x is None:
                raise RuntimeError("linear_cross_entropy: gradients were not prepared in the forward pass")
            return (grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out.to(grad_w.dtype), *(None,) * 5)
        x, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in _chunk_starts(x.size(0), ctx.rows):
            xc, tc = x[start : start + ctx.rows], targets[start : start + ctx.rows]
            g = _softmax_minus_onehot(_chunk_logits(xc, w), lse[start : start + ctx.rows], tc)
            g = g.mul_(grad_out[start : start + ctx.rows].float().unsqueeze(1)).to(ctx.dtype)
            grad_x[start : start + ctx.rows] = (g @ w).to(x.dtype)
            _accumulate_weight_grad(grad_w, g, xc)
        return (grad_x, grad_w.to(weight.dtype), *(None,) * 5)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
    rows: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """cross_entropy(x @ weightᵀ, targets) with targets == IGNORE_INDEX scoring nothing, computed in row chunks.

    x (..., H), weight (V, H), targets (...). `reduction`: "mean" (over scored tokens, 0 when none is scored),
    "sum", or "none" (a loss per token, shaped like targets, 0 at ignored ones). Works for tied and untied heads
    (the weight's gradient flows to whichever parameter it is) and under torch.compile."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    x2, t1 = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    rows = rows or chunk_rows(x2.size(0), weight.size(0))
    grad_now = reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss = _LinearCrossEntropy.apply(x2, weight, t1, reduction, rows, _compute_dtype(x), grad_now)
    return loss.view(targets.shape) if reduction == "none" else loss


def logits_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of whole logits in fp32 (mean over scored tokens, or per token with reduction="none" in the
    shape of `targets`): the path of heads the chunked one cannot take (wrapped by LoRA, biased, foreign)."""
    logits = logits.float()
    loss = F.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    return loss.view(targets.shape) if reduction == "none" else loss


def plain_linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The reference: whole fp32 logits, then cross-entropy (what the model did before chunking)."""
    return logits_cross_entropy(F.linear(x, weight), targets, reduction)
