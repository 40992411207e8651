"""Exports of checkpoint folders to other runtimes: GGUF for llama.cpp and Ollama (`danlu.export.gguf`).

Importing this package is light; numpy, torch, safetensors and gguf are imported when an export runs.
"""

from danlu.export.gguf import QUANTS, ExportReport, TensorFallback, export_gguf

__all__ = ["QUANTS", "ExportReport", "TensorFallback", "export_gguf"]
