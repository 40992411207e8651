"""Weight merging with mergekit's YAML schema: linear, SLERP, task arithmetic, TIES, DARE (TIES and linear), model
stock. `config` reads the schema, `methods` holds the formulas, `merger` runs a merge tensor by tensor. `lora`
merges LoRA adapters of one base into one adapter through peft's `add_weighted_adapter` (cat, svd, linear, TIES,
DARE, magnitude pruning). Ensembles at generation time (averaged next-token log-probs) live in danlu.ensemble."""

from danlu.merge.lora import AdapterMergeResult, merge_adapters
from danlu.merge.merger import MergeResult, merge

__all__ = ["AdapterMergeResult", "MergeResult", "merge", "merge_adapters"]
