"""LoRA, DoRA, PiSSA and rsLoRA through the `peft` library itself, on danlu's native model and on the
transformers-backed one.

peft's layers are injected into the model in place (`inject_adapter_in_model`), so the model keeps the interface the
engine, generation and serving drive (`model(ids, targets)`, `hidden_states`, `decode_step`, caches). Module names
are transformers' on both paths, so peft's own key names come out: the file danlu writes is the file
`PeftModel.save_pretrained` writes, and a file peft wrote loads here.

PiSSA moves the principal singular directions of each adapted weight into the adapter and leaves the residual in
the base, so its trained adapter only works on that modified base. Saving converts it into the equivalent plain
LoRA of rank 2r on the *original* base (ΔW = BA − B₀A₀, as peft's `path_initial_model_for_weight_conversion` does),
which any peft user can load; resuming recomputes the same initialization and takes the first r rows/columns back.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.adapters.spec import PeftSpec, linear_layers, linear_suffixes

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the model's own parameter names
DEFAULT = "default"


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise DanluError(f"LoRA-family adapters need the peft library ({e}): pip install peft") from None
    return peft


def lora_config(spec: PeftSpec, model: nn.Module, base_name: str, where: str) -> Any:
    """peft's LoraConfig for `spec`, with the target modules checked against the model's linear layers."""
    targets = spec.target_modules or linear_suffixes(model)
    check_targets(model, targets, where)
    init: Any = True
    if spec.method == "pissa":
        init = f"pissa_niter_{spec.pissa_niter}" if spec.pissa_niter else "pissa"
    return _peft().LoraConfig(
        r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, target_modules=targets,
        use_dora=spec.method == "dora", use_rslora=spec.method == "rslora", init_lora_weights=init,
        task_type="CAUSAL_LM", base_model_name_or_path=base_name, bias="none",
        fan_in_fan_out=_fan_in_fan_out(model),
    )  # fmt: skip


def _fan_in_fan_out(model: nn.Module) -> bool:
    """GPT-2-style Conv1D layers store their weight transposed; peft must be told."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def check_targets(model: nn.Module, targets: list[str] | str, where: str) -> None:
    """Each target entry must match at least one linear layer, as peft matches them (exact name, or a suffix after
    a dot; a single string is a regex over full names): a typo would otherwise silently adapt less than asked."""
    names = linear_layers(model)
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise DanluError(
            f"{where}.target_modules: {', '.join(map(repr, unmatched))} match(es) no linear layer of this "
            f"model; its linear layers are: {', '.join(linear_suffixes(model)) or 'none'}"
        )


def attach_lora(model: nn.Module, config: Any, adapter: str = DEFAULT) -> nn.Module:
    """Injects peft's LoRA layers (named `adapter`) into `model` in place; only adapter parameters stay trainable."""
    import warnings

    peft = _peft()
    try:
        with warnings.catch_warnings():  # a second adapter on one base (serving) is what we mean to do
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            return peft.inject_adapter_in_model(config, model, adapter_name=adapter)
    except ValueError as e:  # peft's own check (NoMatchingPeftModuleError is one)
        raise DanluError(f"peft could not adapt the model: {e}") from None


def lora_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
               adapter: str = DEFAULT) -> dict[str, torch.Tensor]:  # fmt: skip
    """The adapter's tensors under peft's file keys (`base_model.model.….lora_A.weight`), fp32 on the CPU."""
    peft = _peft()
    if state_dict is not None:
        state_dict = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
    # save_embedding_layers=False: adapters never resize the base's embedding (attach_peft refuses it), and the
    # "auto" check would read the base's config through transformers or even the hub
    sd = peft.get_peft_model_state_dict(
        model, state_dict=state_dict, adapter_name=adapter, save_embedding_layers=False
    )
    return {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def set_lora_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], where: str, adapter: str = DEFAULT
) -> None:
    """Loads adapter tensors keyed as peft's files are into the injected layers; every key must land."""
    peft = _peft()
    plain = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    result = peft.set_peft_model_state_dict(model, plain, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    wanted = {k for k, _ in model.named_parameters() if f".{adapter}." in k and "lora_" in k}
    missing = sorted(k for k in getattr(result, "missing_keys", []) if k in wanted)
    if unexpected or missing:
        raise DanluError(f"{where}: adapter tensors do not fit this base model (unexpected "
                         f"{unexpected[:3] or '-'}, missing {missing[:3] or '-'})")  # fmt: skip


def pissa_to_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PiSSA adapter → the plain rank-2r LoRA that gives the same model on the original base:
    ΔW = BA − B₀A₀ = [B | −B₀][A ; A₀] (peft's `subtract_mutated_init`). The scale α/r stays the same when both α
    and r double (α·√2 under rsLoRA), which the saved config does."""
    out = {}
    for k, v in trained.items():
        if "lora_A" in k:
            out[k] = torch.cat([v, initial[k]], dim=0)
        elif "lora_B" in k:
            out[k] = torch.cat([v, -initial[k]], dim=1)
        else:
            out[k] = v
    return out


def lora_from_pissa(saved: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The trained PiSSA factors back from a converted file: the first r rows of A and columns of B."""
    return {k: v[:r] if "lora_A" in k else v[:, :r] if "lora_B" in k else v for k, v in saved.items()}


def converted_config(config: Any) -> Any:
    """The LoraConfig a converted PiSSA adapter is saved with: plain init, rank and α doubled."""
    import copy

    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r *= 2
    out.lora_alpha *= 2**0.5 if out.use_rslora else 2
    return out


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft's adapter layers in the model, with their names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(model: nn.Module, adapter: str = DEFAULT) -> nn.Module:
    """Folds the adapter into the base weights (DoRA's magnitude included, by peft's own `merge`) and puts the
    plain base layers back, so the result is an ordinary model that saves as a full checkpoint."""
    for name, layer in tuner_layers(model):
        layer.merge(adapter_names=[adapter])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def select_adapter(model: nn.Module, adapter: str | None) -> None:
    """Makes `adapter` the one peft's layers apply (None: none, the bare base). For serving several on one base."""
    for _, layer in tuner_layers(model):
        if adapter is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(adapter)
