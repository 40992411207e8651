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

from typing import Any

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


def _chunk_losses(logits: torch.Tensor, tc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, loss) of each row of a chunk's fp32 logits; the loss is 0 at ignored targets."""
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)
    return lse, (lse - picked) * (tc != IGNORE_INDEX)


def _rows_losses(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and log-sum-exp of every row (fp32), chunk by chunk, no gradient prepared: the forward of `none`."""
    w = weight.to(dtype)
    losses, lses = [], []
    for start in _chunk_starts(x.size(0), rows):
        xc, tc = x[start : start + rows], targets[start : start + rows]
        lse, loss = _chunk_losses(_chunk_logits(xc, w), tc)
        losses.append(loss)
        lses.append(lse)
    return torch.cat(losses), torch.cat(lses)


def _rows_gradients(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    rows: int, dtype: torch.dtype, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Gradients of x and of the weight given each row's upstream gradient: the backward of `none`, which
    recomputes each chunk's logits from the saved log-sum-exp. Without `weight_grad` (a frozen head: adapters,
    RL with LoRA) the weight's gradient, a third of the head's backward, is not computed (None)."""
    w = weight.to(dtype)
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
    for start in _chunk_starts(x.size(0), rows):
        xc, tc = x[start : start + rows], targets[start : start + rows]
        g = _softmax_minus_onehot(_chunk_logits(xc, w), lse[start : start + rows], tc)
        g = g.mul_(grad_out[start : start + rows].float().unsqueeze(1)).to(dtype)
        grad_x[start : start + rows] = (g @ w).to(x.dtype)
        if grad_w is not None:
            _accumulate_weight_grad(grad_w, g, xc)
    return grad_x, grad_w.to(weight.dtype) if grad_w is not None else None


def _loss_and_gradients(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mean: bool, rows: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean (or sum) loss with its gradients of x and of the weight, each chunk's gradient computed while its
    logits exist: the forward of `mean`/`sum` when a backward will follow (backward only scales them)."""
    w = weight.to(dtype)
    losses = []
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros_like(weight, dtype=torch.float32)
    for start in _chunk_starts(x.size(0), rows):
        xc, tc = x[start : start + rows], targets[start : start + rows]
        logits = _chunk_logits(xc, w)
        lse, loss = _chunk_losses(logits, tc)
        losses.append(loss)
        g = _softmax_minus_onehot(logits, lse, tc).to(dtype)
        grad_x[start : start + rows] = (g @ w).to(x.dtype)
        _accumulate_weight_grad(grad_w, g, xc)
    loss = torch.cat(losses).sum()
    if mean:
        scale = _mean_scale(targets)
        loss, grad_x, grad_w = loss * scale, grad_x * scale.to(x.dtype), grad_w * scale
    return loss, grad_x, grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205 (autograd.Function's own signature)
        ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str, rows: int,
        dtype: torch.dtype, grad_now: bool,
    ):  # fmt: skip
        ctx.reduction, ctx.rows, ctx.dtype = reduction, rows, dtype
        if not grad_now:
            loss, lse = _rows_losses(x, weight, targets, rows, dtype)
            ctx.save_for_backward(x, weight, targets, lse)
            return loss if reduction == "none" else _reduce(loss, targets, reduction)
        loss, grad_x, grad_w = _loss_and_gradients(x, weight, targets, reduction == "mean", rows, dtype)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        if ctx.reduction != "none":
            if len(ctx.saved_tensors) != 2:
                raise RuntimeError("linear_cross_entropy: gradients were not prepared in the forward pass")
            grad_x, grad_w = ctx.saved_tensors
            return (grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out.to(grad_w.dtype), *(None,) * 5)
        x, weight, targets, lse = ctx.saved_tensors
        grad_x, grad_w = _rows_gradients(x, weight, targets, lse, grad_out, ctx.rows, ctx.dtype,
                                         ctx.needs_input_grad[1])  # fmt: skip
        return (grad_x, grad_w, *(None,) * 5)


def _mean_scale(targets: torch.Tensor) -> torch.Tensor:
    return 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).float()


def _reduce(losses: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """`mean` over scored tokens (0 when none is scored), `sum`, or the rows as they are (`none`)."""
    if reduction == "none":
        return losses
    return losses.sum() * _mean_scale(targets) if reduction == "mean" else losses.sum()


# Per-token losses (`none`) are what RL and preference stages take, and their batches change length every step: traced
# by torch.compile, the chunk loop is unrolled once per chunk count, one graph for each (10 s and more apiece at a 32k
# vocabulary) until dynamo's recompile limit, then eager. Behind an op the compiler does not look into, one graph
# node serves any row count and the loop runs as it does eagerly. `mean`/`sum` (pretraining, SFT: rows of a fixed
# length) stay traced, where inductor fuses each chunk's softmax gradient into one pass (6% of a tiny model's step).
@torch.library.custom_op("danlu::chunked_cross_entropy", mutates_args=())
def _chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rows_losses(x, weight, targets, chunk_rows(x.size(0), weight.size(0)), dtype)


@_chunked_cross_entropy.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> tuple:
    return x.new_empty(x.size(0), dtype=torch.float32), x.new_empty(x.size(0), dtype=torch.float32)


@torch.library.custom_op("danlu::chunked_cross_entropy_backward", mutates_args=())
def _chunked_cross_entropy_backward(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    dtype: torch.dtype, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad of x, grad of the weight); a frozen weight's is an empty tensor (an op returns tensors, not None)."""
    rows = chunk_rows(x.size(0), weight.size(0))
    grad_x, grad_w = _rows_gradients(x, weight, targets, lse, grad_out.contiguous(), rows, dtype, weight_grad)
    return grad_x, grad_w if grad_w is not None else weight.new_empty(0)


@_chunked_cross_entropy_backward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
      dtype: torch.dtype, weight_grad: bool) -> tuple:  # fmt: skip
    return torch.empty_like(x), torch.empty_like(weight) if weight_grad else weight.new_empty(0)


def _save_for_backward(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, targets, dtype = inputs
    ctx.save_for_backward(x, weight, targets, output[1])
    ctx.dtype = dtype


def _backward(ctx: Any, grad_loss: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    x, weight, targets, lse = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    grad_x, grad_w = _chunked_cross_entropy_backward(
        x, weight, targets, lse, grad_loss, ctx.dtype, weight_grad
    )
    return grad_x, grad_w if weight_grad else None, None, None


_chunked_cross_entropy.register_autograd(_backward, setup_context=_save_for_backward)


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
    grad_now = reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if rows is None and reduction == "none" and torch.compiler.is_compiling():  # one graph node, any length
        return _chunked_cross_entropy(x2, weight, t1, _compute_dtype(x))[0].view(targets.shape)
    rows = rows or chunk_rows(x2.size(0), weight.size(0))
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
