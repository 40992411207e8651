"""A stage's `peft:` section: which parameter-efficient method, with which settings, checked before anything loads.

One dataclass for every method, because the recipe's section is flat (`sft.peft.method=lora sft.peft.r=16`) and
the user should not have to learn which keys belong to which class of peft. `lora`, `dora`, `pissa` and `rslora`
are LoRA with one switch each (peft's `use_dora`, `init_lora_weights="pissa"`, `use_rslora`); `ptuning`, `prompt`
and `prefix` are the soft-prompt methods (peft's P-tuning, prompt tuning and prefix tuning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from danlu import DanluError

if TYPE_CHECKING:  # torch is imported where a model is at hand: `danlu --help` lists METHODS without it
    from torch import nn

LORA_METHODS = ("lora", "dora", "pissa", "rslora")
PROMPT_METHODS = ("ptuning", "prompt", "prefix")
METHODS = (*LORA_METHODS, *PROMPT_METHODS)


@dataclass
class PeftSpec:
    """Settings of one adapter. Keys that a method does not use are ignored by it (and recorded as given)."""

    method: Literal["none", "lora", "dora", "pissa", "rslora", "ptuning", "prompt", "prefix"] = "none"
    r: int = 8  # LoRA rank
    alpha: float = 0.0  # LoRA scaling numerator; 0 = 2r (scale 2, the common choice)
    dropout: float = 0.0  # dropout on the LoRA branch's input
    # module names (suffixes, as peft matches them) or one regex; None = every linear layer but the output head
    target_modules: list[str] | str | None = None
    pissa_niter: int = 0  # PiSSA: 0 = exact SVD; k > 0 = fast randomized SVD with k subspace iterations
    virtual_tokens: int = 20  # soft prompts: number of virtual tokens
    encoder: Literal["mlp", "lstm"] = (
        "mlp"  # P-tuning's prompt encoder (peft's MLP or LSTM reparameterization)
    )
    encoder_hidden: int = 0  # P-tuning / prefix projection width; 0 = the model's hidden size
    prefix_projection: bool = False  # prefix tuning: an MLP produces the prefix (peft's prefix_projection)
    init_text: str | None = None  # prompt tuning: initialize the virtual tokens from this text's embeddings

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.r

    def check(self, where: str) -> None:
        """Raises one DanluError naming the key at fault."""
        if self.method not in ("none", *METHODS):
            raise DanluError(f"{where}.method: {self.method!r} is not one of none, {', '.join(METHODS)}")
        if self.is_lora and self.r <= 0:
            raise DanluError(f"{where}.r: the LoRA rank must be a positive integer, got {self.r}")
        if self.alpha < 0:
            raise DanluError(f"{where}.alpha: must be positive (0 = 2r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise DanluError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if self.method in PROMPT_METHODS and self.virtual_tokens <= 0:
            raise DanluError(f"{where}.virtual_tokens: must be a positive integer, got {self.virtual_tokens}")
        if self.pissa_niter < 0 or self.encoder_hidden < 0:
            raise DanluError(f"{where}: pissa_niter and encoder_hidden must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peft_spec(section: dict[str, Any] | None, where: str) -> PeftSpec:
    """The checked PeftSpec of a stage's `peft:` section (method "none" when the section is empty)."""
    from danlu.config import from_dict

    spec = from_dict(PeftSpec, section or {}, where)
    spec.check(where)
    return spec


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: nn.Linear (danlu's Linear is one) or transformers' GPT-2-style Conv1D."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers, the output head left out (LoRA on it is rarely worth its size,
    and peft's "all-linear" leaves it out too)."""
    head = _output_head(model)
    return [n for n, m in model.named_modules() if is_linear(m) and m is not head]


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last components of the linear layers' names (q_proj, …): what `target_modules` lists."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_layers(model)))


def _output_head(model: nn.Module) -> nn.Module | None:
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return hf.get_output_embeddings()
    return getattr(model, "lm_head", None)
