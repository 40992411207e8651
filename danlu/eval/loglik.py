"""Log-likelihood of continuations given contexts: the primitive under multiple-choice and preference scoring."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def loglikelihoods(
    model: Any,
    requests: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): summed log-probability of the continuation and whether it is greedy.

    Rows are right-padded into batches sorted by length (little padding); contexts longer than the model's window
    lose their oldest tokens, as lm-evaluation-harness does, and a continuation that alone exceeds the window is
    scored on its last window tokens.
    """
    window = model.config.max_position_embeddings
    device = model.lm_head.weight.device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs, spans = [], []
        for i in idx:
            ctx, cont = requests[i]
            full = (list(ctx) + list(cont))[-(window + 1) :]
            scored = min(len(cont), len(full) - 1)  # a continuation longer than the window: its last tokens
            seqs.append(full[:-1])
            spans.append((len(full) - 1 - scored, scored, full[-scored:]))
        width = max(len(s) for s in seqs)
        x = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
        logits = model(x).float()
        if (
            vocab_size is not None and logits.size(-1) > vocab_size
        ):  # padded embedding rows are no real tokens
            logits[..., vocab_size:] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        for row, i, (begin, n, target) in zip(range(len(idx)), idx, spans):
            lp = logp[row, begin : begin + n]
            tgt = torch.tensor(target, device=device)
            total = lp.gather(-1, tgt[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == tgt).all())
            out[i] = (total, greedy)
    return out
