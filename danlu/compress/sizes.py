"""Parameter counts of a model as it is in memory, which is what factorized or shared models need.

`ModelConfig.num_params` counts a plain Llama of the config's shape. After low-rank factorization (two thin matrices
per layer) or block sharing (one set of weights serving two positions) the config no longer says how many weights
there are, so these count the distinct tensors actually held.
"""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module, embeddings: bool = True) -> int:
    """Distinct parameter and persistent-buffer values of a float model (a tensor shared by two modules counts once); without
    `embeddings`, the token embedding and the output head are left out (the convention of `num_params`)."""
    skip: set[int] = set()
    if not embeddings:
        for name in ("model.embed_tokens", "lm_head"):
            mod = model.get_submodule(name)
            skip.update(t.data_ptr() for t in mod.state_dict().values())
    seen: set[int] = set()
    total = 0
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if name.startswith("rope_") or ptr in seen or ptr in skip:
            continue
        seen.add(ptr)
        total += t.numel()
    return total
