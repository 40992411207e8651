"""The best checkpoint of a run, by a stated criterion on the dev split: what `danlu run` says to try and what
`danlu serve RUN_DIR` serves.

The last stage is not always the best one: a short RL stage can cost facts while it gains arithmetic, and on a tiny
model DPO sometimes moves nothing. So the run picks among its chat checkpoints the one with the highest mean dev
accuracy over the skills a chat model is for — facts, arithmetic it cannot have memorized, tool use end to end —
and says which, by how much, and whether the lead is larger than the noise. Dev, never test: choosing on test would
make the test figures of the chosen checkpoint optimistic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from danlu.eval.stats import mean_of_proportions
from danlu.pipeline import CHAT_STAGES, STAGES

SPLIT = "dev"
QUANTITIES = ("facts_chat", "arithmetic_chat_unseen", "tools_answer")
CRITERION = ("highest mean dev-split accuracy over facts_chat, arithmetic_chat_unseen and tools_answer (held-out "
             "facts, sums that occur in no training text, tool use end to end); ties go to the later stage")  # fmt: skip


def choose_best(
    evaluation: dict[str, dict[str, dict[str, Any]]], candidates: list[str]
) -> dict[str, Any] | None:
    """The best of `candidates` (finished model stages) by CRITERION on `evaluation[SPLIT]`; None if no model.

    Chat checkpoints missing a criterion figure are not ranked; with none ranked, the last chat checkpoint is taken
    (the reason says so), and with no chat checkpoint at all, the pretrained model."""
    order = [s for s in STAGES if s in candidates]
    chat = [s for s in order if s in CHAT_STAGES]
    dev = evaluation.get(SPLIT) or {}
    scores: dict[str, dict[str, Any]] = {}
    for stage in chat:
        figs = [dev.get(stage, {}).get(q) for q in QUANTITIES]
        if all(f is not None for f in figs):
            mean, lo, hi = mean_of_proportions(figs)  # type: ignore[arg-type]
            scores[stage] = {"score": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
                             **{q: f["value"] for q, f in zip(QUANTITIES, figs)}}  # type: ignore[index]  # fmt: skip
    base = {"criterion": CRITERION, "split": SPLIT, "quantities": list(QUANTITIES), "scores": scores}
    if not scores:
        if chat:
            return {**base, "checkpoint": chat[-1], "reason": f"no chat checkpoint has dev figures for "
                    f"{', '.join(QUANTITIES)} (no eval stage ran?), so the last chat stage, {chat[-1]}"}  # fmt: skip
        if "pretrain" in order:
            return {
                **base,
                "checkpoint": "pretrain",
                "reason": "the run has no chat checkpoint: the pretrained model",
            }
        return None
    ranked = sorted(scores, key=lambda s: (scores[s]["score"], order.index(s)), reverse=True)
    best = ranked[0]
    b = scores[best]
    reason = f"{best}: mean {b['score']:.3f} (95% CI {b['ci95'][0]:.3f}–{b['ci95'][1]:.3f})"
    if len(ranked) > 1:
        r = scores[ranked[1]]
        if r["score"] == b["score"]:
            verdict = "a tie, which goes to the later stage"
        elif b["ci95"][0] > r["ci95"][1]:
            verdict = "a clear lead"
        else:
            verdict = "the intervals overlap, so the lead may be noise"
        reason += f"; runner-up {ranked[1]} {r['score']:.3f} (95% CI {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f}): {verdict}"
    return {**base, "checkpoint": best, "score": b["score"], "ci95": b["ci95"], "reason": reason}


def best_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, choice) of a run folder's best checkpoint, from its summary.json; None when it has no model."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    choice = summary.get("best_checkpoint") or choose_best(summary.get("evaluation") or {},
                                                           list(summary.get("stages") or {}))  # fmt: skip
    if not choice:
        return None
    return run_dir / choice["checkpoint"], choice
