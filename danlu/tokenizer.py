"""The tokenizer every stage shares: byte-level BPE (zh + en), ChatML chat template, assistant-loss mask.

Why these choices:
- Byte-level BPE over the 256-byte alphabet never meets an unknown character, and decoding is lossless (no
  normalizer: text comes back byte for byte, whitespace, tabs and emoji included).
- The pre-tokenizer is Qwen2's regex (llama.cpp knows it by name as `qwen2`), so a GGUF export tokenizes
  exactly as we do; it splits digits one by one, which helps small models with arithmetic.
- The chat template is ChatML (Qwen, MiniMind, llama.cpp's `chatml`), stored inline in tokenizer_config.json so
  that transformers, vLLM and llama.cpp render conversations exactly as danlu trains on them.
- `render_chat` tokenizes the rendered string in one piece and maps character spans to tokens through offsets,
  so its ids are exactly those of `transformers`' `apply_chat_template(tokenize=True)`: the model is served with
  the same token boundaries it was fine-tuned on.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import atomic_path, write_json_atomic

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
    keeps the text readable and makes it plain text to the tokenizer.
    """
    for token in ADDED_TOKENS:
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


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    """The `tojson` filter as transformers defines it (Jinja's own escapes HTML characters and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    """A compiled chat template, cached; the same sandbox and whitespace settings as transformers."""
    compiled = _TEMPLATES.get(source)
    if compiled is None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = raise_exception
        try:
            compiled = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DanluError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
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


class Tokenizer:
    """A trained byte-level BPE (tokenizers.Tokenizer) plus the chat template and the ids stages need."""

    def __init__(self, tk: Any, chat_template: str = CHAT_TEMPLATE, *, where: str = "tokenizer") -> None:
        self._tk = tk
        self.chat_template = chat_template
        ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DanluError(
                f"{where}: tokenizer lacks the special token(s) {', '.join(missing)} that danlu needs"
            )
        self.bos_id: int = ids[ENDOFTEXT]
        self.eos_id: int = ids[ENDOFTEXT]
        self.pad_id: int = ids[ENDOFTEXT]
        self.im_start_id: int = ids[IM_START]
        self.im_end_id: int = ids[IM_END]
        self.stop_ids: set[int] = {self.eos_id, self.im_end_id}
        self._piece_bytes: list[bytes] | None = None
        self.model_max_length: int | None = None  # written to tokenizer_config.json when set

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
        """Loads a folder with tokenizer.json + tokenizer_config.json (a danlu tokenizer or model checkpoint)."""
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(path)
        if folder.name == "tokenizer.json" and folder.is_file():
            folder = folder.parent
        if not folder.is_dir():
            raise DanluError(f"{folder}: no such tokenizer folder")
        tk_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        for p in (tk_path, cfg_path):
            if not p.is_file():
                raise DanluError(
                    f"{folder}: no {p.name} (expected a folder written by `danlu tokenizer train` or a checkpoint)"
                )
        try:
            tk = RustTokenizer.from_file(str(tk_path))
        except Exception as e:  # tokenizers raises a plain Exception for malformed files
            raise DanluError(
                f"{tk_path}: cannot read tokenizer ({str(e).splitlines()[0] if str(e) else e!r})"
            ) from None
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DanluError(f"{cfg_path}: malformed JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise DanluError(f"{cfg_path}: expected a JSON object")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates, as transformers allows
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        tok = cls(tk, template or CHAT_TEMPLATE, where=str(folder))
        tok.model_max_length = cfg.get("model_max_length")
        return tok

    def save(
        self, path: str | Path, *, model_max_length: int | None = None, eos_token: str = ENDOFTEXT
    ) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into folder `path`.

        Each file is written atomically and other files in the folder (a model checkpoint) are left alone.
        `eos_token` is what transformers' `generate` stops on: <|endoftext|> for a base model, <|im_end|> for a
        chat model (danlu itself always stops on both, see `stop_ids`).
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if eos_token not in ADDED_TOKENS:
            raise DanluError(f"eos_token {eos_token!r}: must be one of {', '.join(ADDED_TOKENS)}")
        max_len = model_max_length if model_max_length is not None else self.model_max_length
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
        if max_len is not None:
            config["model_max_length"] = int(max_len)
        special_map = {
            "bos_token": ENDOFTEXT,
            "eos_token": eos_token,
            "pad_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT,
            "additional_special_tokens": [IM_START, IM_END],
        }
        with atomic_path(folder / "tokenizer.json") as tmp:
            self._tk.save(str(tmp), pretty=True)
        write_json_atomic(folder / "tokenizer_config.json", config)
        write_json_atomic(folder / "special_tokens_map.json", special_map)

    # ── encoding and decoding ────────────────────────────────────────────────────────────────────────────────
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: the minimum embedding size."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def backend(self) -> Any:
        """The underlying tokenizers.Tokenizer (for callers that need offsets or the Rust API)."""
        return self._tk

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """vocab_size rounded up to a multiple (embedding rows; 64 keeps matmuls and GGUF blocks aligned)."""
        return -(-self.vocab_size // multiple) * multiple

    def check_fits(self, model_vocab_size: int, where: str) -> None:
        """Raises if the model's embedding has fewer rows than this tokenizer has tokens."""
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
        """Token ids of `text`; special-token strings in the text become their ids (as in transformers)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts at once in Rust (threads when TOKENIZERS_PARALLELISM allows)."""
        fast = getattr(self._tk, "encode_batch_fast", None) or self._tk.encode_batch
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def piece_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` stands for (a token may hold part of a UTF-8 character)."""
        if self._piece_bytes is None:
            inverse = {c: b for b, c in _bytes_to_unicode().items()}
            added = {self._tk.token_to_id(t): t for t in ADDED_TOKENS}
            table: list[bytes] = []
            for j in range(self.vocab_size):
                tok = self._tk.id_to_token(j) or ""
                if j in added or any(c not in inverse for c in tok):
                    table.append(tok.encode("utf-8"))
                else:
                    table.append(bytes(inverse[c] for c in tok))
            self._piece_bytes = table
        return self._piece_bytes[int(i)]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ── chat ──────────────────────────────────────────────────────────────────────────────────────────────────
    def _render(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt
            )
        except jinja2.exceptions.TemplateError as e:
            raise DanluError(f"chat template: {e}") from None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The conversation as the model sees it (ChatML text)."""
        return self._render(_normalize_messages(messages), _check_tools(tools), add_generation_prompt)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and its assistant-loss mask (1 = train on this token).

        The mask is 1 on each assistant message's content, tool calls and closing <|im_end|>, and 0 elsewhere
        (headers, the newline after <|im_end|>, other roles). A token that straddles a boundary (possible only
        when content starts with a newline) counts as assistant.
        """
        msgs = _normalize_messages(messages)
        tools = _check_tools(tools)
        text = self._render(msgs, tools, add_generation_prompt)
        spans = []  # character ranges to train on
        header, footer = f"{IM_START}assistant\n", f"{IM_END}\n"
        prefix_len: dict[
            int, int
        ] = {}  # rendered length of messages[:n]; ChatML renders prefixes as prefixes

        def upto(n: int) -> int:
            if n not in prefix_len:
                prefix = self._render(msgs[:n], tools, False)
                prefix_len[n] = len(prefix) if text.startswith(prefix) else -1
            return prefix_len[n]

        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start, end = upto(i), upto(i + 1)
            if (
                start < 0
                or end < 0
                or not text.startswith(header, start)
                or text[start:end][-len(footer) :] != footer
            ):
                raise DanluError(
                    f"chat template: cannot locate assistant message {i} in the rendered text "
                    "(render_chat needs a ChatML template whose rendering of a conversation extends its prefixes)"
                )
            spans.append((start + len(header), end - 1))
        enc = self._tk.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        k = 0
        for t, (a, b) in enumerate(enc.offsets):
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            if k < len(spans) and a < spans[k][1] and b > spans[k][0]:
                mask[t] = 1
        return list(enc.ids), mask


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise DanluError("tools must be a list of JSON tool schemas (objects)")
    return [dict(t) for t in tools]


class StreamDecoder:
    """Turns token ids, fed one at a time, into text deltas, holding back incomplete UTF-8.

    Byte-level BPE splits Chinese characters and emoji across tokens; a delta is only emitted once its bytes
    form whole characters. `"".join(deltas) + flush()` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """Feeds one id; returns the newly completed text ("" while a character is incomplete)."""
        if self._skip and int(token_id) in self._special:
            return ""
        return self._utf8.decode(self._tok.piece_bytes(token_id))

    def feed(self, ids: Iterable[int]) -> str:
        return "".join(self.step(i) for i in ids)

    def flush(self) -> str:
        """Ends the stream: incomplete trailing bytes become U+FFFD, as decode() renders them."""
        return self._utf8.decode(b"", final=True)
