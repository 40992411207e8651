"""Merging LoRA adapters of one base into one adapter, through peft's own `add_weighted_adapter`.

Why peft's and not danlu's model merge: an adapter is two low-rank factors per layer, and what a merge of adapters
should produce is again an adapter (small, servable beside others on one base, loadable by peft users). peft
already defines those combinations and their semantics; danlu's job is to feed it the right inputs, refuse
what it would merge silently into nonsense, and write the result as a peft adapter folder plus danlu.json.

The combinations are peft's (`combination_type`):
  cat      exact: ΔW = Σ w_i·s_i·B_i A_i, rank Σ r_i (any ranks)
  svd      the same weighted sum, truncated by SVD to `svd_rank` (default: the largest input rank)
  linear   A = Σ √(w_i s_i) A_i and B = Σ √(w_i s_i) B_i: cheap, only an approximation (cross terms); equal ranks
  ties, dare_ties, dare_linear, magnitude_prune
           TIES / DARE / magnitude pruning applied to the A and B factors separately; equal ranks, need `density`
  ties_svd, dare_ties_svd, dare_linear_svd, magnitude_prune_svd
           the same methods applied to the full ΔW_i, then SVD back to `svd_rank` (any ranks), need `density`
DARE's masks come from torch's global RNG, which `seed` fixes: the same seed gives the same adapter.

Refused, naming the difference: adapters made for different bases (recorded shape or vocabulary, or the base's
name), ranks that differ where the combination needs one rank, DoRA adapters (peft's combinations ignore DoRA's
magnitude vector, so the result would not be the weighted DoRA), soft prompts, weights that do not match the
adapters, a missing or out-of-range density.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu import DanluError

COMBINATIONS = ("cat", "svd", "linear", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")  # fmt: skip
EQUAL_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # peft's own rule
NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("total", "frequency")


@dataclass
class AdapterInput:
    """One adapter folder as read: its peft config, its danlu.json, and the base it names."""

    path: Path
    config: Any
    meta: dict[str, Any]

    @property
    def base(self) -> str | None:
        return (self.meta.get("base") or {}).get("name") or self.config.base_model_name_or_path

    @property
    def ranks(self) -> list[int]:
        """Every rank the adapter uses (peft's rank_pattern may give some layers another one)."""
        return sorted({int(self.config.r), *(int(v) for v in (self.config.rank_pattern or {}).values())})


@dataclass
class AdapterMergeResult:
    out: Path
    method: str
    adapters: list[str]
    weights: list[float]
    rank: int
    tensors: int


def read_input(path: str | Path) -> AdapterInput:
    """Reads one adapter folder; refuses what peft's LoRA combinations cannot merge, with the reason."""
    from danlu.adapters.folder import is_adapter_folder, read_adapter_config
    from danlu.io import read_meta

    path = Path(path)
    if not is_adapter_folder(path):
        raise DanluError(f"{path}: not an adapter folder (expected adapter_config.json and "
                         "adapter_model.safetensors without full model weights); merge full models with a "
                         "mergekit config instead")  # fmt: skip
    config = read_adapter_config(path)
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        raise DanluError(f"{path}: a {kind.lower()} adapter; only LoRA adapters can be merged (soft prompts are "
                         "inputs the model reads, not weight deltas)")  # fmt: skip
    if getattr(config, "use_dora", False):
        raise DanluError(f"{path}: a DoRA adapter; peft's weighted combinations ignore DoRA's magnitude vector, so "
                         "the result would not be the merged DoRA. Fold it into its base instead (danlu export "
                         "--merge) and merge the full models with a mergekit config")  # fmt: skip
    if getattr(config, "target_parameters", None):
        raise DanluError(
            f"{path}: the adapter targets parameters (target_parameters), which peft cannot merge"
        )
    return AdapterInput(path, config, read_meta(path))


def check_inputs(inputs: list[AdapterInput], method: str) -> None:
    """Refuses adapters of different bases, and different ranks where `method` needs one rank: names the pair."""
    first = inputs[0]
    rec0 = first.meta.get("base") or {}
    for other in inputs[1:]:
        rec = other.meta.get("base") or {}
        shape0, shape = rec0.get("shape") or {}, rec.get("shape") or {}
        differ = [f"{k} {shape0[k]} vs {shape[k]}" for k in shape0 if k in shape and shape0[k] != shape[k]]
        if differ:
            raise DanluError(f"adapters of different bases: {first.path} was trained on {first.base} and "
                             f"{other.path} on {other.base}, which differ in {', '.join(differ)}")  # fmt: skip
        if rec0.get("tokenizer") and rec.get("tokenizer") and rec0["tokenizer"] != rec["tokenizer"]:
            raise DanluError(f"adapters of different bases: {first.path} ({first.base}) and {other.path} "
                             f"({other.base}) were trained with different tokenizers")  # fmt: skip
        if first.base != other.base:
            raise DanluError(f"adapters of different bases: {first.path} names base {first.base!r} and "
                             f"{other.path} names {other.base!r}; a LoRA delta only means something on the "
                             "weights it was trained on (pass base=… / --base when both are copies of one "
                             "model)")  # fmt: skip
    if method in EQUAL_RANK:
        ranks = {str(a.path): a.ranks for a in inputs}
        if len({tuple(r) for r in ranks.values()}) > 1:
            listed = ", ".join(f"{p} r={'/'.join(map(str, r))}" for p, r in ranks.items())
            raise DanluError(f"{method} needs adapters of one rank, got {listed}; use cat (exact, rank = the sum) "
                             "or svd / ties_svd / dare_ties_svd (rank svd_rank)")  # fmt: skip


def check_options(method: str, n: int, weights: list[float] | None, density: float | None,
                  svd_rank: int | None, majority_sign_method: str) -> list[float]:  # fmt: skip
    """The method's options checked before any model loads; returns the weights (default 1 each)."""
    if method not in COMBINATIONS:
        raise DanluError(f"adapter merge method {method!r} is not one of peft's: {', '.join(COMBINATIONS)}")
    if n < 2:
        raise DanluError(f"merging adapters needs at least two adapter folders, got {n}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise DanluError(f"{len(weights)} weight(s) for {n} adapters; give one weight per adapter")
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise DanluError(f"adapter merge weights must be finite numbers, got {weights}")
    if method in NEEDS_DENSITY:
        if density is None:
            raise DanluError(f"{method} needs a density (the share of entries each adapter keeps), e.g. 0.5")
        if not 0 < density <= 1:
            raise DanluError(f"{method}: density must lie in (0, 1], got {density}")
    elif density is not None:
        raise DanluError(f"{method} takes no density (only {', '.join(NEEDS_DENSITY)} do)")
    if svd_rank is not None and (not method.endswith("svd") or svd_rank <= 0):
        raise DanluError(f"svd_rank {svd_rank}: a positive rank, and only for the *svd combinations")
    if majority_sign_method not in SIGN_METHODS:
        raise DanluError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got "
                         f"{majority_sign_method!r}")  # fmt: skip
    return weights


def merge_adapters(
    adapters: list[str | Path],
    out: str | Path,
    *,
    method: str = "cat",
    weights: list[float] | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    base: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
) -> AdapterMergeResult:
    """Combines LoRA adapters of one base with peft's `add_weighted_adapter` and writes the result at `out` as a
    peft adapter folder (atomic) that `danlu` and `peft.PeftModel.from_pretrained` both load.

    The base is loaded once with transformers (every danlu checkpoint is a transformers folder), each adapter
    attached by peft under its own name, and the combination's tensors taken out by peft's state-dict function,
    so the key names are exactly the ones peft writes."""
    import torch

    from danlu.adapters.folder import write_adapter_dir
    from danlu.files import atomic_path

    out = Path(out)
    if out.exists() and not force:
        raise DanluError(f"{out}: already exists (pass --force to replace it)")
    weights = check_options(method, len(adapters), weights, density, svd_rank, majority_sign_method)
    inputs = [read_input(a) for a in adapters]
    if base is not None:  # the caller states the base: recorded names may differ (copies), shapes may not
        for a in inputs:
            a.meta = {**a.meta, "base": {**(a.meta.get("base") or {}), "name": str(base)}}
            a.config.base_model_name_or_path = str(base)
    check_inputs(inputs, method)
    base_ref = str(base) if base is not None else inputs[0].base
    if not base_ref:
        raise DanluError(f"{inputs[0].path}: the adapter names no base model; pass base=… (--base)")
    peft_model = _load_with_adapters(base_ref, inputs)
    names = [f"in{i}" for i in range(len(inputs))]
    torch.manual_seed(seed)  # DARE's Bernoulli masks draw from the global RNG
    try:
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=method, svd_rank=svd_rank,
                                        density=density, majority_sign_method=majority_sign_method)  # fmt: skip
    except (ValueError, TypeError, RuntimeError) as e:
        raise DanluError(f"peft could not merge the adapters with {method}: {e}") from None
    tensors = _merged_tensors(peft_model)
    config = peft_model.peft_config["merged"]
    config.base_model_name_or_path = inputs[0].config.base_model_name_or_path
    meta = {
        "stage": "merge_adapters",
        "chat": all(a.meta.get("chat", True) for a in inputs),
        "base": inputs[0].meta.get("base") or {"name": base_ref},
        "peft": {"method": "lora", "r": int(config.r), "alpha": float(config.lora_alpha)},
        "merge": {"method": method, "adapters": [str(a.path) for a in inputs], "weights": weights,
                  "density": density, "svd_rank": svd_rank, "majority_sign_method": majority_sign_method,
                  "seed": seed, "engine": "peft.add_weighted_adapter"},
    }  # fmt: skip
    with atomic_path(out) as tmp:
        write_adapter_dir(tmp, tensors, config, meta)
    return AdapterMergeResult(
        out, method, [str(a.path) for a in inputs], weights, int(config.r), len(tensors)
    )


def _load_with_adapters(base: str, inputs: list[AdapterInput]) -> Any:
    """The base in transformers with every adapter attached by peft (names in0, in1, …)."""
    import warnings

    import torch

    try:
        import transformers
        from peft import PeftModel
    except ImportError as e:
        raise DanluError(f"merging adapters needs peft and transformers ({e}): pip install peft") from None
    from danlu.io import resolve_checkpoint

    path = resolve_checkpoint(Path(base)) if Path(base).exists() else base
    # fp32 whatever the folder stores: the combinations (SVD, TIES' sums) lose precision in bf16
    # (transformers 4.x calls the argument torch_dtype)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **{key: torch.float32})
    except (OSError, ValueError) as e:
        raise DanluError(f"{base}: the adapters' base does not load in transformers ({e})") from None
    _check_base_fits(Path(str(path)), inputs, model.config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ff]ound missing adapter keys.*")
        try:
            peft_model = PeftModel.from_pretrained(model, str(inputs[0].path), adapter_name="in0")
            for i, a in enumerate(inputs[1:], 1):
                peft_model.load_adapter(str(a.path), adapter_name=f"in{i}")
        except (ValueError, RuntimeError, KeyError) as e:
            raise DanluError(f"an adapter does not fit the base {base}: {str(e).strip().splitlines()[-1][:300]}"
                             ) from None  # fmt: skip
    return peft_model


def _check_base_fits(base: Path, inputs: list[AdapterInput], config: Any) -> None:
    """danlu's own base check (shape and vocabulary recorded in danlu.json) for each adapter on the loaded base."""
    from danlu.adapters.identity import check_base
    from danlu.tokenizer import Tokenizer

    if not base.exists():
        return
    tokenizer = Tokenizer.load(base)
    for a in inputs:
        check_base(a.path, a.meta.get("base"), base, config, tokenizer, quiet=True)


def _merged_tensors(peft_model: Any) -> dict[str, Any]:
    """The merged adapter's tensors under peft's file keys, fp32 on the CPU."""
    import torch
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, adapter_name="merged", save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


# ───────────────────────── mergekit-style config for adapters ─────────────────────────

ADAPTER_KEYS = {"merge_method", "models", "parameters", "base_model", "name"}


def _resolve(ref: str, root: Path | None) -> str:
    """A folder named in a config: as given, else relative to the config file's folder (as the model merge does)."""
    if root is not None and not Path(ref).exists() and (root / ref).exists():
        return str(root / ref)
    return ref


def is_adapter_config(raw: Any, root: Path | None = None) -> bool:
    """A merge config whose models are all adapter folders (so it is an adapter merge, not a model merge)."""
    from danlu.adapters.folder import is_adapter_folder

    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        return False
    refs = [m.get("model") if isinstance(m, dict) else m for m in raw["models"]]
    return all(isinstance(r, str) and is_adapter_folder(_resolve(r, root)) for r in refs)


def merge_adapters_config(raw: dict[str, Any], out: str | Path, *, seed: int = 0, force: bool = False,
                          where: str = "merge config", root: Path | None = None) -> AdapterMergeResult:  # fmt: skip
    """mergekit's shape for adapters: `merge_method` is peft's combination (cat, svd, linear, ties, dare_ties, …),
    `models: [{model: ADAPTER, parameters: {weight}}]`, global `parameters: {density, svd_rank,
    majority_sign_method}`, optional `base_model` (the base, when the adapters name copies of it)."""
    unknown = sorted(set(raw) - ADAPTER_KEYS)
    if unknown:
        raise DanluError(f"{where}: key(s) {', '.join(unknown)} do not apply to an adapter merge "
                         f"(keys: {', '.join(sorted(ADAPTER_KEYS))})")  # fmt: skip
    paths, weights = [], []
    for i, m in enumerate(raw["models"]):
        m = {"model": m} if isinstance(m, str) else m
        params = m.get("parameters") or {}
        extra = sorted(set(params) - {"weight"})
        if extra:
            raise DanluError(f"{where}: models[{i}].parameters: {', '.join(extra)} are not per adapter in peft's "
                             "combinations (only weight is; density and svd_rank go under the global "
                             "parameters)")  # fmt: skip
        paths.append(_resolve(m["model"], root))
        weights.append(params.get("weight", 1.0))
    params = dict(raw.get("parameters") or {})
    allowed = {"density", "svd_rank", "majority_sign_method"}
    if set(params) - allowed:
        raise DanluError(f"{where}: parameters {', '.join(sorted(set(params) - allowed))} are not peft's "
                         f"(allowed: {', '.join(sorted(allowed))})")  # fmt: skip
    return merge_adapters(paths, out, method=str(raw.get("merge_method", "cat")), weights=weights,
                          density=params.get("density"), svd_rank=params.get("svd_rank"),
                          majority_sign_method=params.get("majority_sign_method", "total"),
                          base=raw.get("base_model"), seed=seed, force=force)  # fmt: skip


def describe(res: AdapterMergeResult) -> str:
    """One line for the CLI."""
    return (f"[danlu] merge: adapters {', '.join(res.adapters)} (weights {json.dumps(res.weights)}) by peft's "
            f"{res.method} → {res.out} (rank {res.rank}, {res.tensors} tensors)")  # fmt: skip


def read_yaml(path: str | Path) -> Any:
    """A merge config file's mapping (None where it is not YAML: the model merge then reports the error)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
