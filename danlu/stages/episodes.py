"""RL episodes: what the policy wrote for a prompt, with its tool calls executed and their results fed back.

Without tools an episode is one sampled completion. With tools on, a completion that ends its turn with a
`<tool_call>` is parsed (danlu.tools.parse_tool_calls), the calls run through danlu.tools.run_tool — the runner that
`danlu serve` and `danlu chat` use — the results come back as `tool` turns rendered by the chat template, and the
policy writes again, for up to `tool_rounds` rounds. The episode keeps the exact tokens the policy sampled (trained,
mask 1) and the tokens the runtime inserted (tool results, the next turn's header: mask 0), so the policy gradient
and the KL see the sequence the policy was conditioned on, and only the policy's own tokens carry loss.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from danlu import DanluError


@dataclass
class Episode:
    ids: list[int]  # prompt + everything after it
    mask: list[int]  # 1 on tokens the policy sampled (and each of its turns' end-of-turn token)
    prompt_len: int
    text: str  # the last turn's text: the final answer that is scored
    finish_reason: str
    sampled: int = 0  # tokens the policy wrote over all its turns
    calls: list[tuple[str, str]] = field(default_factory=list)  # (tool name, result) in order
    malformed: bool = False  # a <tool_call> that did not parse
    turns: list[str] = field(default_factory=list)  # every turn's text, for examples and logs

    @property
    def last_target(self) -> int:
        """Index of the episode's last trained target (targets are ids shifted by one)."""
        return len(self.ids) - 2


def _append_turn(ep: Episode, completion: Any, end_of_turn: int) -> None:
    tail = list(completion.token_ids) + ([end_of_turn] if completion.finish_reason == "stop" else [])
    ep.ids += tail
    ep.mask += [1] * len(tail)
    ep.sampled += len(completion.token_ids)
    ep.text, ep.finish_reason = completion.text, completion.finish_reason
    ep.turns.append(completion.text)


def tool_turn_tokens(
    tokenizer: Any, conversation: list[dict[str, Any]], results: list[dict[str, Any]]
) -> list[int]:
    """Tokens from just after an assistant tool-call turn's end-of-turn token to the start of the next assistant
    turn: the template's rendering of the `tool` results plus its generation prompt.

    Found by rendering the conversation with and without the results: this needs a template whose rendering of a
    conversation extends the rendering of its prefixes (ChatML, Llama-3, Qwen2.5 do)."""
    head = tokenizer.render_chat(conversation)[0]
    full = tokenizer.render_chat([*conversation, *results], add_generation_prompt=True)[0]
    if full[: len(head)] != head:
        raise DanluError(
            "tool rollouts: this chat template re-renders earlier turns once tool results follow, so the sampled "
            "tokens cannot be kept; turn the stage's `tools` off"
        )
    eot = tokenizer.end_of_turn_id
    cut = max((i for i, t in enumerate(head) if t == eot), default=len(head) - 1)
    return head[cut + 1 :] + full[len(head) :]


# Seed distance between an episode's rounds: more episodes than a run samples (16.7M), and far below 2**32, since
# a CPU torch.Generator keeps only the low 32 bits of its seed (seeds 2**32 apart draw the same numbers).
ROUND_STRIDE = 1 << 24


def _adjacent_runs(indices: list[int]) -> list[list[int]]:
    """Ascending indices cut into runs of consecutive ones: [0, 1, 3, 4, 5] → [[0, 1], [3, 4, 5]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def run_episodes(
    generator: Any,
    rows: list[Any],
    prompts: list[list[int]],
    params: Any,
    *,
    tools: bool,
    tool_rounds: int = 1,
) -> list[Episode]:
    """Samples one episode per (row, prompt ids); with `tools`, executes calls for up to `tool_rounds` rounds.

    Every round is one batched generate over the episodes still waiting for their answer (`Generator.generate`
    seeds its row i with seed + i). Episode i samples round k with seed + k·ROUND_STRIDE + i whatever else shares
    its calls, so a resumed run repeats its episodes exactly, and a caller that numbers its episodes globally
    (seed = base + index of the first) samples each one as one process sampling them all would. Waiting episodes
    that are not adjacent go in separate calls for that reason. A row's `today` (ISO date) is what get_date
    returns."""
    from dataclasses import replace

    from danlu.tokenizer import TOOL_CALL_START
    from danlu.tools import parse_tool_calls, run_tool

    tok = generator.tokenizer
    episodes = [Episode(list(p), [0] * len(p), len(p), "", "length") for p in prompts]
    conversations = [list(row.messages) for row in rows]
    waiting = list(range(len(rows)))
    for round_no in range((tool_rounds if tools else 0) + 1):
        if not waiting:
            break
        for run in _adjacent_runs(waiting) if params.seed is not None else [waiting]:
            seed = None if params.seed is None else params.seed + round_no * ROUND_STRIDE + run[0]
            completions = generator.generate([episodes[i].ids for i in run], replace(params, seed=seed))
            for i, c in zip(run, completions):
                _append_turn(episodes[i], c, tok.end_of_turn_id)
        if not tools:
            break
        still = []
        for i in waiting:
            ep, row = episodes[i], rows[i]
            content, calls = parse_tool_calls(ep.text)
            ep.malformed |= TOOL_CALL_START in content
            if not calls:
                continue
            if (
                ep.finish_reason != "stop" or round_no == tool_rounds
            ):  # no round left: the calls stay unexecuted
                ep.calls += [(call["function"]["name"], "") for call in calls]
                continue
            conversations[i].append({"role": "assistant", "content": content, "tool_calls": calls})
            today = dt.date.fromisoformat(row.today) if getattr(row, "today", None) else None
            results = []
            for call in calls:
                fn = call["function"]
                result = run_tool(fn["name"], fn["arguments"], today)
                ep.calls.append((fn["name"], result))
                # as danlu serve does: a result that echoes control tokens the policy wrote stays plain text
                results.append({"role": "tool", "name": fn["name"], "content": tok.defuse(result)})
            inserted = tool_turn_tokens(tok, conversations[i], results)
            conversations[i] += results
            if len(ep.ids) + len(inserted) + params.max_tokens > generator.context:
                continue  # no room for another turn: the episode ends on its call
            ep.ids += inserted
            ep.mask += [0] * len(inserted)
            still.append(i)
        waiting = still
    return episodes
