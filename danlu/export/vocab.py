"""A checkpoint's tokenizer files → the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE only).

llama.cpp does not run the tokenizer.json it is given: it re-implements a fixed set of pre-tokenizers and picks
one by the *name* in `tokenizer.ggml.pre`. A name that does not match the regex the model was trained with makes
llama.cpp split text differently, silently (its fallback is a "default" pre-tokenizer). So the name is derived
from tokenizer.json's own pre-tokenizer here, and anything not known to be identical is refused before a file is
written, naming what was found.

Pure JSON work: no transformers, no tokenizers import (the export must not depend on how a tokenizer class of
the day interprets these files). The layout follows llama.cpp's converter (`_set_vocab_gpt2`): tokens by id in
the vocab's byte-level form, added tokens in their raw text, special added tokens CONTROL, other added tokens
USER_DEFINED, holes and padding rows `[PAD{i}]` UNUSED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError

# The regexes llama.cpp implements, keyed by the exact string tokenizer.json stores, with the name it knows them by.
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
KNOWN_REGEXES = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe", GPT2_REGEX: "gpt-2"}
# llama.cpp's BPE tokenizer skips merges for a word that is a whole vocab entry under these names only.
IGNORE_MERGES_PRE = {"llama-bpe"}

# gguf.TokenType values (kept here so that this module imports nothing heavy)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class VocabPlan:
    """Everything the exporter writes under `tokenizer.ggml.*`, plus what the Modelfile needs."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, pad, unk, eot: those present
    add_bos: bool
    add_eos: bool | None
    chat_template: str | list[dict[str, str]] | None
    stop_ids: list[int]  # eos first, then generation_config's other eos ids
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json (temperature, top_p…)
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def padded(self, rows: int) -> tuple[list[str], list[int]]:
        """Tokens and types padded with `[PAD{i}]` (UNUSED) up to the embedding's row count."""
        extra = range(len(self.tokens), rows)
        return self.tokens + [f"[PAD{i}]" for i in extra], self.types + [UNUSED] * len(extra)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DanluError(f"{path}: malformed JSON ({e})") from None


def detect_pre_tokenizer(tk: dict[str, Any], where: Path) -> str:
    """The llama.cpp name of tokenizer.json's pre-tokenizer, or DanluError naming what was found.

    Accepted: Sequence[Split(known regex, Isolated), ByteLevel(use_regex=False)] (Llama-3, Qwen2, danlu) and a lone
    ByteLevel(use_regex=True) (GPT-2, whose ByteLevel applies GPT-2's regex itself).
    """
    pt = tk.get("pre_tokenizer")
    if not isinstance(pt, dict):
        raise DanluError(
            f"{where}: tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one it knows by name"
        )
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type") for p in items]
    unknown = [k for k in kinds if k not in ("Split", "ByteLevel")]
    if unknown or kinds.count("ByteLevel") != 1 or kinds.count("Split") > 1:
        raise DanluError(
            f"{where}: pre-tokenizer {' + '.join(map(str, kinds)) or 'empty Sequence'} is not one llama.cpp "
            "implements (expected a Split with the Llama-3, Qwen2 or GPT-2 regex followed by ByteLevel)"
        )
    byte_level = items[kinds.index("ByteLevel")]
    if byte_level.get("add_prefix_space"):
        raise DanluError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
    if "Split" not in kinds:
        if byte_level.get("use_regex", True):
            return "gpt-2"
        raise DanluError(
            f"{where}: ByteLevel pre-tokenizer without a regex splits nothing; llama.cpp has no such mode"
        )
    split = items[kinds.index("Split")]
    if kinds.index("Split") > kinds.index("ByteLevel") or byte_level.get("use_regex", True):
        raise DanluError(
            f"{where}: pre-tokenizer applies ByteLevel's own regex as well as a Split; llama.cpp has no such mode"
        )
    pattern = split.get("pattern") or {}
    regex = pattern.get("Regex")
    if regex is None:
        raise DanluError(
            f"{where}: pre-tokenizer Split on the plain string {pattern.get('String')!r} is not supported"
        )
    if split.get("behavior") not in ("Isolated", None) or split.get("invert"):
        raise DanluError(
            f"{where}: pre-tokenizer Split with behavior {split.get('behavior')!r}, invert={split.get('invert')} "
            "is not supported (expected Isolated)"
        )
    name = KNOWN_REGEXES.get(regex)
    if name is None:
        raise DanluError(
            f"{where}: unknown pre-tokenizer regex {regex!r}; llama.cpp would split text differently. "
            "Known: the Llama-3 regex (llama-bpe), Qwen2's (qwen2) and GPT-2's (gpt-2)"
        )
    return name


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _looks_special(text: str) -> bool:
    """llama.cpp's converter marks added tokens like `<|…|>` CONTROL even when not flagged special."""
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


def read_vocab(folder: Path, config: dict[str, Any]) -> VocabPlan:
    """Reads tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json."""
    tk_path = folder / "tokenizer.json"
    if not tk_path.is_file():
        other = [n for n in ("tokenizer.model", "vocab.json", "vocab.txt") if (folder / n).is_file()]
        raise DanluError(
            f"{folder}: no tokenizer.json"
            + (
                f" (found {', '.join(other)}: only fast byte-level BPE tokenizers are exported)"
                if other
                else ""
            )
        )
    tk = _read_json(tk_path)
    model = tk.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise DanluError(
            f"{tk_path}: tokenizer model is {kind or 'unknown'}; only byte-level BPE is exported to GGUF "
            "(WordPiece, Unigram and WordLevel tokenizers are not)"
        )
    pre = detect_pre_tokenizer(tk, tk_path)
    notes: list[str] = []
    norm = tk.get("normalizer")
    if norm is not None:
        if norm.get("type") != "NFC":
            raise DanluError(
                f"{tk_path}: normalizer {norm.get('type')!r} is not supported (llama.cpp's BPE does not normalize)"
            )
        notes.append("tokenizer.json applies NFC normalization; llama.cpp does not (identical for NFC text)")
    if bool(model.get("ignore_merges")) != (pre in IGNORE_MERGES_PRE):
        notes.append(
            f"tokenizer.json has ignore_merges={bool(model.get('ignore_merges'))} but llama.cpp's {pre} "
            f"uses {pre in IGNORE_MERGES_PRE}: a word that is itself a vocab entry may split differently"
        )

    vocab: dict[str, int] = model.get("vocab") or {}
    added = [a for a in tk.get("added_tokens") or [] if isinstance(a.get("id"), int)]
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in vocab.items()}
    for a in added:
        content = a["content"]
        by_id[a["id"]] = (content, CONTROL if a.get("special") or _looks_special(content) else USER_DEFINED)
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, (f"[PAD{i}]", UNUSED))[1] for i in range(n)]

    merges_raw = model.get("merges") or []
    merges: list[str] = []
    for m in merges_raw:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2:
            # A space inside a merge part is written as byte-level 'Ġ', as gguf-py's SpecialVocab does.
            merges.append(" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m))
        else:
            raise DanluError(f"{tk_path}: unreadable BPE merge entry {m!r}")

    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    stm_path = folder / "special_tokens_map.json"
    stm = _read_json(stm_path) if stm_path.is_file() else {}
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    if tc.get("add_prefix_space"):
        raise DanluError(f"{tc_path}: add_prefix_space=true is not supported for byte-level BPE export")

    ids_by_text = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for typ in ("bos", "eos", "pad", "unk"):
        text = _token_content(tc.get(f"{typ}_token")) or _token_content(stm.get(f"{typ}_token"))
        if text is not None and text in ids_by_text:
            special[typ] = ids_by_text[text]
        elif isinstance(config.get(f"{typ}_token_id"), int):
            special[typ] = config[f"{typ}_token_id"]

    gen_eos = gen.get("eos_token_id", config.get("eos_token_id"))
    gen_eos_list = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
    if "eos" not in special and gen_eos_list:
        special["eos"] = gen_eos_list[0]
    stop_ids = ([special["eos"]] if "eos" in special else []) + [
        i for i in gen_eos_list if i != special.get("eos")
    ]
    stop_ids = [i for i in dict.fromkeys(stop_ids) if 0 <= i < n]
    if len(stop_ids) > 1:
        special["eot"] = stop_ids[1]  # llama.cpp stops on eos, eot and the end tokens it recognizes by text

    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(tk.get("post_processor"), special.get("bos"), tokens)
    add_eos = tc.get("add_eos_token") if isinstance(tc.get("add_eos_token"), bool) else None

    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise DanluError(f"{tc_path}: chat_template must be a string or a list of named templates")

    return VocabPlan(
        tokens=tokens, types=types, merges=merges, pre=pre, special_ids=special, add_bos=add_bos,
        add_eos=add_eos, chat_template=template, stop_ids=stop_ids,
        generation={k: gen[k] for k in ("temperature", "top_p", "top_k") if isinstance(gen.get(k), (int, float))},
        notes=notes,
    )  # fmt: skip


def _post_processor_adds_bos(pp: Any, bos_id: int | None, tokens: list[str]) -> bool:
    """Whether a TemplateProcessing post-processor puts the BOS token first (Llama-3 declares add_bos this way)."""
    if not isinstance(pp, dict) or bos_id is None:
        return False
    for proc in pp.get("processors", [pp]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            return first is not None and first == tokens[bos_id]
    return False


def template_text(template: str | list[dict[str, str]] | None) -> str:
    """The default chat template's text (a list holds named templates, as transformers allows)."""
    if isinstance(template, list):
        return next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    return template or ""
