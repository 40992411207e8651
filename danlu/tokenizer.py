"""The tokenizer every stage shares: danlu's own byte-level BPE (zh + en, ChatML) or any Hugging Face tokenizer.

danlu's own tokenizer (`Tokenizer.train`), and why these choices:
- Byte-level BPE over the 256-byte alphabet never meets an unknown character, and decoding is lossless (no
  normalizer: text comes back byte for byte, whitespace, tabs and emoji included).
- The pre-tokenizer is Qwen2's regex (llama.cpp knows it by name as `qwen2`), so a GGUF export tokenizes
  exactly as we do; it splits digits one by one, which helps small models with arithmetic.
- The chat template is ChatML (Qwen, MiniMind, llama.cpp's `chatml`), stored inline in tokenizer_config.json so
  that transformers, vLLM and llama.cpp render conversations exactly as danlu trains on them.

Tokenizers from elsewhere (`Tokenizer.load` of a Hugging Face folder: Qwen2.5, Llama-3, Mistral, GPT-2, a BERT
WordPiece `vocab.txt`, …) keep their own special tokens and chat template. Nothing about a turn's layout is
assumed: the token that ends an assistant turn is found by rendering a tiny conversation with the template, and
an assistant message's trained span is found by rendering the conversation's prefixes (see `render_chat`).

`render_chat` tokenizes the rendered string in one piece and maps character spans to tokens through offsets, so
its ids are exactly those of `transformers`' `apply_chat_template(tokenize=True)`: the model is served with the
same token boundaries it was fine-tuned on.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import atomic_path, write_json_atomic, write_text_atomic

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Ids 0..4 in this order. The first three are special (skipped by decode(skip_special_tokens=True)); the tool-call
# tags are ordinary added tokens, so decoded assistant text keeps them and danlu.tools.parse_tool_calls can read it.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
ADDED_TOKENS = [*SPECIAL_TOKENS, TOOL_CALL_START, TOOL_CALL_END]


def defuse_special_tokens(text: str) -> str:
    """Text in which a typed "<|im_start|>" (or any other control token) can no longer become that token.

    The tokenizer turns these strings into control ids wherever they occur (as transformers does), so a chat user
    could otherwise close their turn and write a system message of their own. A zero-width space after the "<"
    keeps the text readable and makes it plain text to the tokenizer. This function knows danlu's ChatML tokens
    only; `Tokenizer.defuse` knows those of the tokenizer at hand (Llama-3's `<|eot_id|>`, …).
    """
    return _defuse(text, ADDED_TOKENS)


def _defuse(text: str, tokens: Iterable[str]) -> str:
    """`text` with a zero-width space after the first character of each occurrence of `tokens` (longest first)."""
    for token in sorted(tokens, key=len, reverse=True):
        if token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


ROLES = ("system", "user", "assistant", "tool")

# Qwen2's pre-tokenizer regex (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2, name "qwen2").
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to help with the user's request.\n\n"
    "The functions you can call are described inside <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nTo call a function, write a JSON object with its name and arguments inside "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)

# ChatML. Rendered with trim_blocks/lstrip_blocks as transformers does; every tag uses `-` so layout is irrelevant.
# A tool call is written exactly as danlu.tools.tool_call_text writes it; string arguments are emitted verbatim
# (danlu normalizes JSON-string arguments to dicts before rendering, see _normalize_messages).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' and messages[0].content %}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for part in messages[0].content %}{%- if part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '\\n\\n' }}"
    "{%- endif %}"
    "{{- " + json.dumps(TOOLS_PREAMBLE) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(TOOLS_POSTAMBLE) + " }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and tools and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- elif message.content %}{%- for part in message.content %}{%- if part.type == 'text' %}{{- part.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' }}{{- fn.name | tojson }}{{- ', \"arguments\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}"
    "{%- elif fn.arguments is defined and fn.arguments is not none %}{{- fn.arguments | tojson }}"
    "{%- else %}{{- '{}' }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Named special tokens as transformers knows them; chat templates see them as variables (`{{ bos_token }}`).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Files from which transformers builds a tokenizer when a folder has no tokenizer.json (its "slow" tokenizers).
SLOW_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# End-of-text tokens of well-known families, for a tokenizer.json that comes without any config naming its eos.
_KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
# Keys of an imported tokenizer_config.json that must not survive a save: they would make transformers load
# another class or files that are not in the saved folder.
_DROPPED_CONFIG_KEYS = (
    "auto_map", "tokenizer_file", "vocab_file", "merges_file", "name_or_path", "special_tokens_map_file",
    "is_local", "local_files_only", "chat_template_file",
)  # fmt: skip
_PROBE_USER = "danlu probe: a question"
_PROBE_ASSISTANT = "danlu probe: an answer"
_WARNED: set[str] = set()


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    """The `tojson` filter as transformers defines it (Jinja's own escapes HTML characters and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


_TEMPLATES: dict[str, Any] = {}
_ENV: Any = None


def _jinja_env() -> Any:
    """The Jinja environment transformers renders chat templates in: sandboxed, trim_blocks + lstrip_blocks, loop
    controls, `{% generation %}` blocks, `raise_exception`, `strftime_now`, the JSON `tojson` filter, and the
    guarded `dict` / `namespace` globals."""
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            """`{% generation %}…{% endgeneration %}` marks assistant text for transformers; it renders its body."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller: Any) -> str:
                return caller()

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        class TemplateDict:
            def __call__(self, *args: Any, **kwargs: Any) -> dict:
                return dict(*args, **kwargs)

            def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
                return dict.fromkeys(*args, **kwargs)

        class TemplateNamespace(jinja2.utils.Namespace):
            """A namespace that refuses dunder attributes (no way into CPython internals)."""

            def __init__(*args: Any, **kwargs: Any) -> None:
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    TemplateNamespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name: str, value: Any) -> None:
                TemplateNamespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name: Any) -> None:
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = TemplateDict()
        env.globals["namespace"] = TemplateNamespace
        _ENV = env
    return _ENV


def _compile_template(source: str, where: str = "chat template") -> Any:
    """A compiled chat template, cached; the same sandbox and whitespace settings as transformers."""
    compiled = _TEMPLATES.get(source)
    if compiled is None:
        import jinja2

        try:
            compiled = _jinja_env().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DanluError(f"{where}: syntax error on line {e.lineno}: {e.message}") from None
        _TEMPLATES[source] = compiled
    return compiled


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    raise DanluError(
        f"{where}: content must be a string, a list of parts or null, got {type(content).__name__}"
    )


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages → plain dicts the template renders as danlu trains on them.

    content None → ""; content parts → their text; tool-call arguments given as a JSON string become a dict, so
    they render exactly as danlu.tools.tool_call_text writes them whatever spacing the client used.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DanluError(
            f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}"
        )
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise DanluError(f"{where}: expected an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DanluError(f"{where}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), where)}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise DanluError(f"{where}: only assistant messages can have tool_calls (role is {role!r})")
            msg["tool_calls"] = [_normalize_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    return out


def _normalize_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise DanluError(f"{where}: expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise DanluError(f"{where}: expected {{'function': {{'name': str, 'arguments': ...}}}}")
    args = fn.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            parsed = None  # not JSON: rendered verbatim, as the model wrote it
        if parsed is not None:
            args = parsed
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table that byte-level BPE vocabularies are written in."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_str(value: Any) -> str | None:
    """A special token given as a string, an AddedToken-style dict {"content": ...} or an AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; a malformed one is an error naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DanluError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise DanluError(f"{path}: expected a JSON object")
    return data


def _ids_of(value: Any) -> list[int]:
    """generation_config's eos_token_id: an int or a list of ints."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _templates_of(folder: Path, cfg: Mapping[str, Any]) -> tuple[str | dict[str, str] | None, str]:
    """The folder's chat template(s) and where they came from, with transformers' precedence: chat_template.jinja
    (plus additional_chat_templates/NAME.jinja) over the config's inline `chat_template` (a string, or a list of
    {name, template} as transformers writes several)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates = {"default": jinja_file.read_text(encoding="utf-8")}
        extra = folder / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        return (templates["default"] if len(templates) == 1 else templates), str(jinja_file)
    where = f"{folder / 'tokenizer_config.json'} (chat_template)"
    template = cfg.get("chat_template")
    if isinstance(template, str):
        return template, where
    if isinstance(template, list):
        named = {
            t["name"]: t["template"]
            for t in template
            if isinstance(t, Mapping)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
        }
        return (named or None), where
    if isinstance(template, Mapping):
        return ({k: v for k, v in template.items() if isinstance(v, str)} or None), where
    return None, where


def _load_with_transformers(folder: Path, files: list[str]) -> tuple[Any, dict[str, Any]]:
    """A folder with only slow-tokenizer files, read by transformers; returns its fast backend (a tokenizers.Tokenizer)
    and the named special tokens it resolved (which such classes define as defaults, not in a config file)."""
    try:
        import transformers
    except ImportError:
        raise DanluError(
            f"{folder}: has no tokenizer.json, only {', '.join(files)}; reading such a tokenizer needs "
            "transformers, which is not installed (pip install transformers)"
        ) from None
    from tokenizers import Tokenizer as RustTokenizer

    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as first:  # no class named anywhere: guess it from the files, as the model cards do
        guess = (
            "BertTokenizer" if "vocab.txt" in files
            else "GPT2Tokenizer" if {"vocab.json", "merges.txt"} <= set(files)
            else "LlamaTokenizer" if "tokenizer.model" in files
            else None
        )  # fmt: skip
        try:
            if guess is None:
                raise first
            hf = getattr(transformers, guess).from_pretrained(str(folder))
        except Exception:
            message = " ".join(str(first).split())[:500] or repr(first)
            raise DanluError(f"{folder}: transformers cannot read this tokenizer ({message})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DanluError(
            f"{folder}: transformers read it as {type(hf).__name__}, which has no fast (tokenizers) backend"
        )
    cfg: dict[str, Any] = {}
    for name in NAMED_SPECIALS:
        token = _token_str(getattr(hf, name, None))
        if token is not None:
            cfg[name] = token
    cleanup = getattr(hf, "clean_up_tokenization_spaces", None)
    if isinstance(cleanup, bool):
        cfg["clean_up_tokenization_spaces"] = cleanup
    return RustTokenizer.from_str(backend.to_str()), cfg


def _add_configured_tokens(tk: Any, cfg: Mapping[str, Any]) -> None:
    """Adds the tokens of the config's `added_tokens_decoder` that tokenizer.json lacks, as transformers does."""
    decoder = cfg.get("added_tokens_decoder")
    if not isinstance(decoder, Mapping):
        return
    from tokenizers import AddedToken

    entries = []
    for key, value in decoder.items():
        content = _token_str(value)
        if content is None or not str(key).isdigit() or tk.token_to_id(content) is not None:
            continue
        props = value if isinstance(value, Mapping) else {}
        flags = {k: bool(props[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in props}
        entries.append((int(key), AddedToken(content, special=bool(props.get("special", False)), **flags)))
    for _, token in sorted(entries, key=lambda e: e[0]):
        if token.special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


class Tokenizer:
    """A tokenizers.Tokenizer plus its chat template and the ids stages need.

    Ids: `bos_id` (document separator and prompt prefix: the tokenizer's bos, else its cls, else eos), `eos_id`,
    `pad_id` (pad, else eos), `end_of_turn_id` (the token that closes an assistant turn in the chat template:
    <|im_end|> for ChatML, <|eot_id|> for Llama-3, </s> for Mistral; eos without a template) and `stop_ids` (eos,
    end of turn and generation_config.json's eos ids). danlu's own tokenizer keeps <|endoftext|> as bos, eos and
    pad whatever its config names (a chat checkpoint's config names <|im_end|> as eos for transformers' sake).
    """

    def __init__(
        self,
        tk: Any,
        chat_template: str | Mapping[str, str] | None = CHAT_TEMPLATE,
        *,
        where: str = "tokenizer",
        config: Mapping[str, Any] | None = None,
        generation_eos: Iterable[int] = (),
        template_where: str | None = None,
        generation_bos: int | None = None,
    ) -> None:
        self._tk = tk
        self._generation_bos = generation_bos
        self._where = where
        # danlu's own layout (ids 0..4 = ADDED_TOKENS, as `train` makes them): saved and resolved as always.
        # MiniMind's tokenizer shares ids 0..2 but not the tool-call tags, and keeps its own special tokens.
        self._danlu = all(tk.token_to_id(t) == i for i, t in enumerate(ADDED_TOKENS))
        self._config: dict[str, Any] = dict(config or {})
        self._named: dict[str, str] = {}
        for name in NAMED_SPECIALS:
            token = _token_str(self._config.get(name))
            if token is not None:
                self._named[name] = token
        if self._danlu and not config:
            self._named = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
                           "unk_token": ENDOFTEXT}  # fmt: skip
        self._named_templates: dict[str, str] = {}
        if isinstance(chat_template, Mapping):
            self._named_templates = dict(chat_template)
            default = self._named_templates.pop("default", None)
            if default is None and self._named_templates:  # transformers wants a name here; take the first
                default = self._named_templates.pop(next(iter(self._named_templates)))
            chat_template = default
        if chat_template is None and self._danlu:
            chat_template = CHAT_TEMPLATE
        self.chat_template: str | None = chat_template
        # whether the folder had a template of its own (danlu's tokenizers have ChatML); False for a base model's
        self.has_chat_template: bool = chat_template is not None
        self._template_where = template_where or (
            "danlu's ChatML template" if chat_template == CHAT_TEMPLATE else f"{where} (chat template)"
        )
        self._generation_eos = list(generation_eos)
        self._extra_specials: list[str] = []  # special tokens add_chat_tokens added
        self.model_max_length: int | None = None  # written to tokenizer_config.json when set
        self._facts: dict[str, Any] | None = None
        self._refresh()

    def _refresh(self) -> None:
        """(Re)computes everything derived from the vocabulary and the template."""
        tk = self._tk
        self._added: dict[int, Any] = dict(tk.get_added_tokens_decoder())
        self._special_ids = {i for i, a in self._added.items() if a.special}
        self._vocab_size = max(tk.get_vocab_size(with_added_tokens=True), max(self._added, default=-1) + 1)
        self._piece_bytes: list[bytes] | None = None
        self._offset_tk: Any = None
        self._facts = None
        if self._danlu:
            self.bos_id: int = tk.token_to_id(ENDOFTEXT)
            self.eos_id: int = self.bos_id
            self.pad_id: int = self.bos_id
            self.end_of_turn_id: int = tk.token_to_id(IM_END)
        else:
            self._resolve_ids()
        valid = [i for i in self._generation_eos if 0 <= i < self.vocab_size]
        self.stop_ids: set[int] = {self.eos_id, self.end_of_turn_id, *valid}

    def _named_id(self, name: str) -> int | None:
        token = self._named.get(name)
        return self._tk.token_to_id(token) if token else None

    def _resolve_ids(self) -> None:
        eos = self._named_id("eos_token")
        if eos is None:
            eos = next((i for i in self._generation_eos if 0 <= i < self.vocab_size), None)
        if eos is None:
            eos = self._named_id("sep_token")  # BERT-style vocabularies end a text with [SEP]
        if eos is None:
            eos = next((i for t in _KNOWN_EOS if (i := self._tk.token_to_id(t)) is not None), None)
        if eos is None:
            raise DanluError(
                f"{self._where}: the tokenizer names no end-of-text token (eos_token in tokenizer_config.json, "
                "or eos_token_id in generation_config.json); danlu needs one to separate documents and stop"
            )
        bos = self._named_id("bos_token")
        if bos is None:
            bos = self._named_id("cls_token")  # BERT-style vocabularies start a text with [CLS]
        if bos is None and self._generation_bos is not None and 0 <= self._generation_bos < self.vocab_size:
            bos = (
                self._generation_bos
            )  # Qwen2 names none in its tokenizer, <|endoftext|> in generation_config
        pad = self._named_id("pad_token")
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos  # no bos anywhere: eos separates documents
        self.pad_id = eos if pad is None else pad
        eot = self._probe_end_of_turn()
        self.end_of_turn_id = eos if eot is None else eot

    def _probe_end_of_turn(self) -> int | None:
        """The first added token after the assistant's content when the template renders a tiny conversation."""
        if self.chat_template is None:
            return None
        probes = (
            [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}],
            [{"role": "system", "content": "danlu probe: a system prompt"},
             {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}],
        )  # fmt: skip
        error: DanluError | None = None
        for messages in probes:
            try:
                text = self._render_with(self.chat_template, messages, None, False)
            except DanluError as e:
                error = error or e
                continue
            k = text.rfind(_PROBE_ASSISTANT)
            if k < 0:
                continue
            rest = text[k + len(_PROBE_ASSISTANT) :]
            best: tuple[tuple[int, int], int] | None = None
            for i, added in self._added.items():
                if not added.content.strip():
                    continue  # whitespace tokens (Gemma's "\n") are layout, not the end of a turn
                p = rest.find(added.content)
                if p >= 0 and (best is None or (p, -len(added.content)) < best[0]):
                    best = ((p, -len(added.content)), i)
            return None if best is None else best[1]
        raise DanluError(f"{error}" if error else f"{self._template_where}: cannot render a conversation")

    @property
    def im_end_id(self) -> int:
        """Deprecated name of `end_of_turn_id` (which is <|im_end|> for ChatML only)."""
        return self.end_of_turn_id

    @property
    def im_start_id(self) -> int | None:
        """Deprecated: the id of <|im_start|> (None if this tokenizer has none); use token_to_id."""
        return self._tk.token_to_id(IM_START)

    # ── training, loading, saving ────────────────────────────────────────────────────────────────────────────
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        *,
        max_token_length: int | None = None,
    ) -> Tokenizer:
        """Trains byte-level BPE on `texts`; `vocab_size` counts everything (bytes, merges, added tokens).

        `max_token_length` (in bytes) stops merges into very long tokens, which templated or repetitive corpora
        otherwise produce (whole Chinese phrases as one token generalize badly to new phrasings).
        """
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as RustTokenizer

        minimum = 256 + len(ADDED_TOKENS)
        if vocab_size < minimum:
            raise DanluError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum}")
        tk = RustTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            max_token_length=max_token_length,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        # The trainer registers all its tokens as special; the tool-call tags must decode even when special
        # tokens are skipped, so mark them ordinary (ids stay 3 and 4).
        data = json.loads(tk.to_str())
        for entry in data["added_tokens"]:
            if entry["content"] in (TOOL_CALL_START, TOOL_CALL_END):
                entry["special"] = False
        return cls(RustTokenizer.from_str(json.dumps(data, ensure_ascii=False)))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Loads a tokenizer folder: danlu's own, a model checkpoint, or any Hugging Face tokenizer folder.

        Read: tokenizer.json; tokenizer_config.json and special_tokens_map.json when present (special tokens as
        strings or {"content": ...} objects); the chat template from chat_template.jinja or the config's inline
        `chat_template` (a string or named templates); generation_config.json's `eos_token_id` (extra stop
        tokens). A folder with only slow-tokenizer files (BERT's vocab.txt, GPT-2's vocab.json + merges.txt, a
        sentencepiece tokenizer.model) is read by transformers and wrapped through its fast backend.
        """
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(path)
        if folder.name == "tokenizer.json" and folder.is_file():
            folder = folder.parent
        if not folder.is_dir():
            raise DanluError(f"{folder}: no such tokenizer folder")
        cfg_path, tk_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
        cfg = _read_json(cfg_path)
        if tk_path.is_file():
            try:
                tk = RustTokenizer.from_file(str(tk_path))
            except Exception as e:  # tokenizers raises a plain Exception for malformed files
                raise DanluError(
                    f"{tk_path}: cannot read tokenizer ({str(e).splitlines()[0] if str(e) else e!r})"
                ) from None
            cfg = dict(cfg or {})
            special_map = _read_json(folder / "special_tokens_map.json")
            if special_map and "added_tokens_decoder" not in cfg:  # transformers' legacy precedence
                cfg.update({k: v for k, v in special_map.items() if k in NAMED_SPECIALS and v is not None})
            _add_configured_tokens(tk, cfg)
        else:
            slow = [f for f in SLOW_FILES if (folder / f).is_file()]
            if not slow:
                raise DanluError(
                    f"{folder}: no tokenizer.json (nor slow-tokenizer files: {', '.join(SLOW_FILES)}); expected "
                    "a folder written by `danlu tokenizer train`, a checkpoint or a Hugging Face model folder"
                )
            tk, named = _load_with_transformers(folder, slow)
            cfg = {**(cfg or {}), **named}
        templates, template_where = _templates_of(folder, cfg)
        generation = _read_json(folder / "generation_config.json") or {}
        tok = cls(
            tk,
            templates,
            where=str(folder),
            config=cfg,
            generation_eos=_ids_of(generation.get("eos_token_id")),
            template_where=template_where,
            generation_bos=next(iter(_ids_of(generation.get("bos_token_id"))), None),
        )
        max_len = cfg.get("model_max_length")
        tok.model_max_length = max_len if isinstance(max_len, int) and not isinstance(max_len, bool) else None
        return tok

    def save(
        self, path: str | Path, *, model_max_length: int | None = None, eos_token: str | None = None
    ) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into folder `path`.

        Each file is written atomically and other files in the folder (a model checkpoint) are left alone, except a
        chat_template.jinja that would contradict the template saved inline (transformers prefers that file).
        `eos_token` is what transformers' `generate` stops on: for a chat model the end-of-turn token (<|im_end|>
        for danlu's tokenizer); None keeps the tokenizer's own (<|endoftext|> for danlu's). danlu itself always
        stops on all of `stop_ids`.

        danlu's own tokenizer gets its fixed config; an imported one keeps its original config's fields (special
        tokens, `add_bos_token`, …) with `tokenizer_class: PreTrainedTokenizerFast`, an up-to-date
        `added_tokens_decoder` and the chat template inline, so that transformers loads the folder to the same
        ids and the same chat rendering.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        max_len = model_max_length if model_max_length is not None else self.model_max_length
        if self._danlu:
            config, special_map = self._danlu_config(eos_token or ENDOFTEXT)
        else:
            config, special_map = self._imported_config(eos_token)
        if max_len is not None:
            config["model_max_length"] = int(max_len)
        with atomic_path(folder / "tokenizer.json") as tmp:
            self._tk.save(str(tmp), pretty=True)
        write_json_atomic(folder / "tokenizer_config.json", config)
        write_json_atomic(folder / "special_tokens_map.json", special_map)
        stale = folder / "chat_template.jinja"
        if stale.is_file() and stale.read_text(encoding="utf-8") != self.chat_template:
            if self.chat_template is None:
                stale.unlink()
            else:
                write_text_atomic(stale, self.chat_template)

    def _added_entry(self, i: int) -> dict[str, Any]:
        a = self._added[i]
        return {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                "single_word": a.single_word, "special": a.special}  # fmt: skip

    def _danlu_config(self, eos_token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if eos_token not in ADDED_TOKENS:
            raise DanluError(f"eos_token {eos_token!r}: must be one of {', '.join(ADDED_TOKENS)}")
        decoder: dict[str, Any] = {}
        for content in ADDED_TOKENS:
            i = self._tk.token_to_id(content)
            if i is not None:
                decoder[str(i)] = {
                    "content": content,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": content in SPECIAL_TOKENS,
                }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"],
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "bos_token": ENDOFTEXT,
            "eos_token": eos_token,
            "pad_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT,
            "additional_special_tokens": [IM_START, IM_END],
            "added_tokens_decoder": decoder,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
            "chat_template": self.chat_template,
        }
        special_map = {
            "bos_token": ENDOFTEXT,
            "eos_token": eos_token,
            "pad_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT,
            "additional_special_tokens": [IM_START, IM_END],
        }
        return config, special_map

    def _imported_config(self, eos_token: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        config = {k: v for k, v in self._config.items() if k not in _DROPPED_CONFIG_KEYS}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.setdefault("model_input_names", ["input_ids", "attention_mask"])
        named = dict(self._named)
        if eos_token is not None:
            if self._tk.token_to_id(eos_token) is None:
                raise DanluError(f"eos_token {eos_token!r}: not a token of this tokenizer")
            named["eos_token"] = eos_token
        for name in NAMED_SPECIALS:
            if name in named:
                config[name] = named[name]
        extra_key = "extra_special_tokens" if isinstance(config.get("extra_special_tokens"), list) else (
            "additional_special_tokens")  # fmt: skip
        extra = [t for t in (_token_str(x) for x in config.get(extra_key) or []) if t is not None]
        extra += [t for t in self._extra_specials if t not in extra]
        if extra:
            config[extra_key] = extra
        config["added_tokens_decoder"] = {str(i): self._added_entry(i) for i in sorted(self._added)}
        if self._named_templates:
            config["chat_template"] = [
                {"name": name, "template": t}
                for name, t in [("default", self.chat_template), *self._named_templates.items()]
                if t is not None
            ]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        else:
            config.pop("chat_template", None)
        special_map: dict[str, Any] = {name: named[name] for name in NAMED_SPECIALS if name in named}
        if extra:
            special_map["additional_special_tokens"] = extra
        return config, special_map

    # ── encoding and decoding ────────────────────────────────────────────────────────────────────────────────
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: the minimum embedding size."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens (skipped by decode(skip_special_tokens=True)), in id order."""
        return [self._added[i].content for i in sorted(self._special_ids)]

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    @property
    def backend(self) -> Any:
        """The underlying tokenizers.Tokenizer (for callers that need offsets or the Rust API)."""
        return self._tk

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """vocab_size rounded up to a multiple (embedding rows; 64 keeps matmuls and GGUF blocks aligned)."""
        return -(-self.vocab_size // multiple) * multiple

    def check_fits(self, model_vocab_size: int, where: str) -> None:
        """Raises if the model's embedding has fewer rows than this tokenizer has tokens (more rows are fine:
        Qwen pads its embedding beyond the tokenizer)."""
        if self.vocab_size > model_vocab_size:
            raise DanluError(
                f"{where}: the tokenizer has {self.vocab_size} tokens but the model's embedding has only "
                f"{model_vocab_size} rows (vocab_size); use the tokenizer the model was trained with"
            )

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids (as in transformers). No bos or
        other template tokens are added (the tokenizer's post-processor is not applied)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts at once in Rust (threads when TOKENIZERS_PARALLELISM allows)."""
        fast = getattr(self._tk, "encode_batch_fast", None) or self._tk.encode_batch
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _tk_facts(self) -> dict[str, Any]:
        """What the decoder and model are (read once from the decoder's JSON and the model's attributes)."""
        if self._facts is None:

            def kinds(node: Any) -> list[str]:
                if not isinstance(node, Mapping):
                    return []
                return [str(node.get("type"))] + [
                    k for child in node.get("decoders") or [] for k in kinds(child)
                ]

            decoder = self._tk.decoder
            model = self._tk.model
            is_wordpiece = type(model).__name__ == "WordPiece"
            self._facts = {
                "byte_level": "ByteLevel" in kinds(json.loads(decoder.__getstate__()) if decoder else None),
                "byte_fallback": bool(getattr(model, "byte_fallback", False)),
                "wordpiece_prefix": getattr(model, "continuing_subword_prefix", "##")
                if is_wordpiece
                else None,
            }
        return self._facts

    @property
    def byte_fallback_ids(self) -> set[int]:
        """Ids of sentencepiece-style byte-fallback tokens (<0x00>…<0xFF>), empty for other tokenizers."""
        if not self._tk_facts()["byte_fallback"]:
            return set()
        return {i for b in range(256) if (i := self._tk.token_to_id(f"<0x{b:02X}>")) is not None}

    @property
    def is_byte_level(self) -> bool:
        """Whether tokens are spelled in GPT-2's byte alphabet (danlu, Qwen, Llama-3, GPT-2): then `piece_bytes`
        is exact and streaming works byte by byte."""
        return bool(self._tk_facts()["byte_level"])

    def piece_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (a byte-level token may hold part of a UTF-8 character).

        Exact for byte-level BPE and for sentencepiece byte-fallback tokens (<0xE4> → b"\\xe4"). For other
        tokenizers it is approximate: the UTF-8 of the token's text as decoded after an ordinary token (so a
        sentencepiece "▁word" counts its space); a WordPiece token counts its text without the "##" prefix and
        without the space decode puts between words, and its vocabulary is already normalized (lowercased…).
        bits-per-byte (danlu.eval.bpb) uses these counts, so it is exact only for byte-level tokenizers.
        """
        if self._piece_bytes is None:
            self._piece_bytes = self._piece_table()
        i = int(i)
        return self._piece_bytes[i] if 0 <= i < len(self._piece_bytes) else b""

    def _piece_table(self) -> list[bytes]:
        n = self.vocab_size
        tokens = [self._tk.id_to_token(j) or "" for j in range(n)]
        facts = self._tk_facts()
        table: list[bytes] = []
        if facts["byte_level"]:
            inverse = {c: b for b, c in _bytes_to_unicode().items()}
            for j, tok in enumerate(tokens):
                if j in self._added or any(c not in inverse for c in tok):
                    table.append(tok.encode("utf-8"))
                else:
                    table.append(bytes(inverse[c] for c in tok))
            return table
        prefix = facts["wordpiece_prefix"]
        if prefix is not None:
            for j, tok in enumerate(tokens):
                plain = j not in self._added and tok.startswith(prefix) and len(tok) > len(prefix)
                table.append((tok[len(prefix) :] if plain else tok).encode("utf-8"))
            return table
        # the text a token adds after an ordinary token (decoders strip or join at the start of a text)
        anchor = next(
            (j for j, tok in enumerate(tokens) if j not in self._added and tok.isalnum() and tok.isascii()),
            None,
        )
        alone = self._tk.decode_batch([[j] for j in range(n)], skip_special_tokens=False)
        if anchor is not None:
            base = self._tk.decode([anchor], skip_special_tokens=False)
            after = self._tk.decode_batch([[anchor, j] for j in range(n)], skip_special_tokens=False)
        byte = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        for j, tok in enumerate(tokens):
            m = byte.fullmatch(tok)
            if j in self._added:
                table.append(tok.encode("utf-8"))
            elif facts["byte_fallback"] and m:
                table.append(bytes([int(m.group(1), 16)]))
            elif anchor is not None and after[j].startswith(base):
                table.append(after[j][len(base) :].encode("utf-8"))
            else:
                table.append(alone[j].encode("utf-8"))
        return table

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def defuse(self, text: str) -> str:
        """Text in which typed control tokens of this tokenizer (<|im_start|>, <|eot_id|>, [INST], …) can no longer
        become those tokens: a zero-width space goes after their first character. The server applies it to
        client text so a user cannot close their turn and write a system message of their own. Defused: every
        special token, and the ordinary added tokens the chat template writes (<tool_call>), as transformers'
        sanitize_control_tokens picks them."""
        return _defuse(text, self._control_tokens())

    def _control_tokens(self) -> list[str]:
        if self._danlu:
            return [t for t in ADDED_TOKENS if self._tk.token_to_id(t) is not None] + [
                a.content for a in self._added.values() if a.special and a.content not in ADDED_TOKENS
            ]
        sources = [t for t in (self.chat_template, *self._named_templates.values()) if t]
        out = []
        for added in self._added.values():
            c = added.content
            if len(c) < 2 or not c.strip():
                continue
            if added.special or any(c in s for s in sources):
                out.append(c)
        return out

    # ── chat ──────────────────────────────────────────────────────────────────────────────────────────────────
    def _template_for(self, tools: Any) -> str:
        if tools and "tool_use" in self._named_templates:
            return self._named_templates["tool_use"]
        if self.chat_template is None:
            raise DanluError(
                f"{self._where}: this tokenizer has no chat template (a base model's); give it ChatML with "
                "add_chat_tokens() or use a chat model's tokenizer"
            )
        return self.chat_template

    def _render_with(
        self, template: str, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool
    ) -> str:
        """Renders as transformers does: the named special tokens are variables (`{{ bos_token }}`)."""
        compiled = _compile_template(template, self._template_where)
        try:
            return compiled.render(
                **self._named,
                messages=messages,
                tools=tools or None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # raise_exception(), undefined variables, type errors inside the template
            raise DanluError(f"{self._template_where}: the chat template failed: {e}") from None

    def _render(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        return self._render_with(self._template_for(tools), messages, tools, add_generation_prompt)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The conversation as the model sees it (the template's text)."""
        return self._render(_normalize_messages(messages), _check_tools(tools), add_generation_prompt)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and its assistant-loss mask (1 = train on this token).

        An assistant message's trained span starts where the rendering of the messages before it, with the
        generation prompt, ends (after ChatML's "<|im_start|>assistant\\n", Llama-3's header) and ends after its
        end-of-turn token; what follows that token (ChatML's "\\n") and everything of other roles is 0. This needs
        a template whose rendering of a conversation extends the rendering of its prefixes (ChatML, Llama-3,
        Qwen2.5, Mistral). A template that re-renders earlier turns once later ones follow (Qwen3 drops earlier
        reasoning) gets only its last assistant message trained, said once on stderr. A token that straddles a
        boundary (possible only when content starts with a newline) counts as assistant.
        """
        msgs = _normalize_messages(messages)
        tools = _check_tools(tools)
        text = self._render(msgs, tools, add_generation_prompt)
        spans = self._assistant_spans(msgs, tools, text, add_generation_prompt)
        enc = self._offsets_tokenizer().encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        k = 0
        for t, (a, b) in enumerate(enc.offsets):
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            if k < len(spans) and a < spans[k][1] and b > spans[k][0]:
                mask[t] = 1
        return list(enc.ids), mask

    def _offsets_tokenizer(self) -> Any:
        """The tokenizer without its post-processor: the same ids without bos/eos (add_special_tokens=False), but
        offsets that cover every character (ByteLevel's trim_offsets would give whitespace tokens empty spans)."""
        if self._tk.post_processor is None:
            return self._tk
        if self._offset_tk is None:
            from tokenizers import Tokenizer as RustTokenizer

            self._offset_tk = RustTokenizer.from_str(self._tk.to_str())
            self._offset_tk.post_processor = None
        return self._offset_tk

    def _assistant_spans(
        self, msgs: list[dict[str, Any]], tools: Any, text: str, add_generation_prompt: bool
    ) -> list[tuple[int, int]]:
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not assistants:
            return []
        spans = []
        for i in assistants:
            span = self._locate(msgs, tools, text, i, add_generation_prompt)
            if span is None:
                break
            spans.append(span)
        else:
            return spans
        last = assistants[-1]
        if self._template_where not in _WARNED:
            _WARNED.add(self._template_where)
            print(
                f"danlu: {self._template_where}: the chat template renders earlier turns differently once later "
                "turns follow (it may drop earlier reasoning); training only the last assistant message of such "
                "conversations",
                file=sys.stderr,
            )
        span = self._locate(msgs, tools, text, last, add_generation_prompt) or self._find_content(
            msgs[last], text
        )
        if span is None:
            raise DanluError(
                f"{self._template_where}: cannot locate the last assistant message in the rendered conversation"
            )
        return [span]

    def _locate(
        self, msgs: list[dict[str, Any]], tools: Any, text: str, i: int, add_generation_prompt: bool
    ) -> tuple[int, int] | None:
        """Message i's span: from the end of render(messages[:i], generation prompt) to after its end-of-turn token
        within render(messages[:i + 1]); None when those renderings are not prefixes of `text`."""
        try:
            head = self._render(msgs[:i], tools, True)
            whole = (
                text
                if i + 1 == len(msgs) and not add_generation_prompt
                else self._render(msgs[: i + 1], tools, False)
            )
        except DanluError:
            return None
        start, end = len(head), len(whole)
        if end < start or not text.startswith(whole) or not whole.startswith(head):
            return None
        return start, self._span_end(text, start, end)

    def _span_end(self, text: str, start: int, end: int) -> int:
        eot = self.id_to_token(self.end_of_turn_id) or ""
        k = text.rfind(eot, start, end) if eot else -1
        return k + len(eot) if k >= 0 else start + len(text[start:end].rstrip())

    def _find_content(self, message: dict[str, Any], text: str) -> tuple[int, int] | None:
        content = message["content"]
        k = text.rfind(content) if content else -1
        if k < 0:
            return None
        eot = self.id_to_token(self.end_of_turn_id) or ""
        e = text.find(eot, k + len(content)) if eot else -1
        return k, (e + len(eot) if e >= 0 else k + len(content))

    def add_chat_tokens(self) -> int:
        """Gives a base model's tokenizer (no chat template: GPT-2's lone <|endoftext|>) danlu's ChatML: adds
        <|im_start|> and <|im_end|> as special tokens and <tool_call> / </tool_call> as ordinary added tokens
        (those absent), sets the ChatML template, and makes <|im_end|> the end of turn. Returns how many tokens
        were added (the model's embedding must grow by as many rows); 0, changing nothing, when the tokenizer
        already has a chat template."""
        if self.has_chat_template:
            return 0
        from tokenizers import AddedToken

        tid = self._tk.token_to_id
        specials = [
            AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END) if tid(t) is None
        ]
        plain = [AddedToken(t, special=False, normalized=False)
                 for t in (TOOL_CALL_START, TOOL_CALL_END) if tid(t) is None]  # fmt: skip
        before = self.vocab_size
        if specials:
            self._tk.add_special_tokens(specials)
        if plain:
            self._tk.add_tokens(plain)
        self._extra_specials += [t for t in (IM_START, IM_END) if t not in self._extra_specials]
        self.chat_template = CHAT_TEMPLATE
        self._named_templates = {}
        self.has_chat_template = True
        self._template_where = "danlu's ChatML template"
        self._refresh()
        return self.vocab_size - before


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise DanluError("tools must be a list of JSON tool schemas (objects)")
    return [dict(t) for t in tools]


class StreamDecoder:
    """Turns token ids, fed one at a time, into text deltas: `"".join(deltas) + flush()` equals `decode(all ids)`.

    Byte-level tokenizers (danlu, Qwen, Llama-3, GPT-2) are decoded byte by byte: byte-level BPE splits Chinese
    characters and emoji across tokens, and a delta is only emitted once its bytes form whole characters.

    Other tokenizers (WordPiece, sentencepiece) decode with context: a "##" piece joins the previous word,
    sentencepiece strips the text's first space, WordPiece's cleanup rewrites " ." or " do not", and a run of
    byte-fallback tokens (<0xE4><0xB8><0xAD>) is decoded as a whole (one invalid byte turns the whole run into
    U+FFFD). So a window of recent ids is decoded at every step and text is emitted once the next token has left
    it unchanged (one token of delay), never while it ends in U+FFFD and never inside a run of byte tokens. The
    window is cut back to its last few tokens (never inside a byte run) whenever the cut one decodes to the same
    pending text, so each step costs a short decode.
    """

    CONTEXT = 8  # tokens kept before the emitted boundary when the window is cut

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.special_ids
        self._bytes = tokenizer.is_byte_level
        self._byte_tokens = set() if self._bytes else tokenizer.byte_fallback_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # the window
        self._text = ""  # decode(window)
        self._done = 0  # characters of _text already emitted

    def step(self, token_id: int) -> str:
        """Feeds one id; returns the newly completed text ("" while a character is incomplete)."""
        token_id = int(token_id)
        if self._bytes:
            if self._skip and token_id in self._special:
                return ""
            return self._utf8.decode(self._tok.piece_bytes(token_id))
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        stable = _common_prefix_len(text, self._text)
        while stable > self._done and text[stable - 1] == "\ufffd":
            stable -= 1
        if self._byte_tokens and self._in_byte_run(len(self._ids)):
            stable = self._done  # the run's text changes until it ends
        delta = text[self._done : stable] if stable > self._done else ""
        self._done = max(self._done, stable)
        self._text = text
        if len(self._ids) > 4 * self.CONTEXT:
            self._cut()
        return delta

    def _transparent(self, i: int) -> bool:
        """A token decode drops (a special one when skipping them)."""
        return self._skip and i in self._special

    def _in_byte_run(self, end: int) -> bool:
        """Whether the last token of window[:end] that decode keeps is a byte-fallback token."""
        for i in reversed(self._ids[:end]):
            if not self._transparent(i):
                return i in self._byte_tokens
        return False

    def _cut(self) -> None:
        start, kept = len(self._ids), 0
        while start > 0 and kept < self.CONTEXT:
            start -= 1
            kept += not self._transparent(self._ids[start])
        while start > 0 and self._byte_tokens and self._in_byte_run(start):
            start -= 1  # keep a byte run whole
        if start == 0:
            return
        ids = self._ids[start:]
        text = self._tok.decode(ids, skip_special_tokens=self._skip)
        pending = self._text[self._done :]
        if len(text) > len(pending) and text.endswith(pending):
            self._ids, self._text, self._done = ids, text, len(text) - len(pending)

    def feed(self, ids: Iterable[int]) -> str:
        return "".join(self.step(i) for i in ids)

    def flush(self) -> str:
        """Ends the stream: the held-back text; incomplete trailing bytes become U+FFFD, as decode() renders them."""
        if self._bytes:
            return self._utf8.decode(b"", final=True)
        delta = self._text[self._done :]
        self._done = len(self._text)
        return delta


def tokenizer_difference(a: Tokenizer, b: Tokenizer, name_a: str, name_b: str) -> str | None:
    """The first way two tokenizers differ, in words ("token id 7 is 'x' in A but 'y' in B (400 vs 401 tokens)",
    or the same vocabulary with another pre-tokenizer), or None when they tokenize every text the same way. The one
    check behind every "these models must share a tokenizer" (merging, ensembles, reward models, references)."""
    ta, tb = a.backend, b.backend
    va, vb = ta.get_vocab(with_added_tokens=True), tb.get_vocab(with_added_tokens=True)
    if va != vb:
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        for i in range(max(max(ia, default=0), max(ib, default=0)) + 1):
            if ia.get(i) != ib.get(i):
                return (f"token id {i} is {ia.get(i)!r} in {name_a} but {ib.get(i)!r} in {name_b} "
                        f"({len(va)} vs {len(vb)} tokens)")  # fmt: skip
    ja, jb = json.loads(ta.to_str()), json.loads(tb.to_str())
    for part in ("model", "pre_tokenizer", "normalizer", "decoder"):
        if ja.get(part) != jb.get(part):
            return (f"{name_a} and {name_b} have the same {len(va)}-token vocabulary but a different "
                    f"{part.replace('_', '-')} (so they split text differently)")  # fmt: skip
    return None
