"""The Ollama Modelfile written beside an exported GGUF file.

Ollama renders prompts with its own Go templates, not the Jinja chat template stored in the GGUF, so for the two
conventions danlu's models and their bases use (ChatML, Llama-3 headers) the Modelfile carries the equivalent Go
template; any other template is left to Ollama's own detection from the GGUF metadata. Stop strings are the
text of every stop token (eos plus generation_config's), so Ollama ends a turn exactly where transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

HEADER = "# Written by `danlu export`"

# Ollama collects system messages into .System (older versions also drop them from .Messages, newer ones keep
# them there): the system prompt is rendered from .System once, and system entries in .Messages are skipped.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{- end }}<|im_start|>assistant\n"
)
LLAMA3_TEMPLATE = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{- end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    "{{ .Content }}<|eot_id|>{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def template_family(chat_template: str) -> str | None:
    """The template's convention, chatml or llama3 (None for others), from the markers the Jinja template writes."""
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    return None


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def render_modelfile(
    gguf_name: str, chat_template: str, stops: Sequence[str], generation: dict[str, Any]
) -> str:
    """Modelfile text: FROM, TEMPLATE (ChatML or Llama-3 only), PARAMETER stop/temperature/top_p/top_k."""
    lines = [HEADER, f"FROM ./{gguf_name}"]
    family = template_family(chat_template)
    if family is not None:
        body = CHATML_TEMPLATE if family == "chatml" else LLAMA3_TEMPLATE
        lines.append(f'TEMPLATE """{body}"""')
    elif chat_template:
        lines.append("# chat template is neither ChatML nor Llama-3: Ollama picks one from the GGUF metadata")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    for key in ("temperature", "top_p", "top_k"):
        if key in generation:
            lines.append(f"PARAMETER {key} {generation[key]}")
    return "\n".join(lines) + "\n"
