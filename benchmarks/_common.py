"""Shared bits of the side-by-side benchmarks: machine description and a Llama config twin for transformers."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    desc = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def random_model(vocab: int, depth: int, context: int):  # noqa: ANN201
    """danlu's Transformer of the recipes' shape (one knob: depth) with random weights from seed 0, in eval mode:
    decoding benchmarks need its speed, not its answers."""
    from danlu.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, depth=depth, max_position_embeddings=context)).eval()


def hf_twin(cfg):  # noqa: ANN001, ANN201 — transformers is optional
    """transformers' LlamaConfig with exactly our model's shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip


def timed(fn: Callable[[], None], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def timed_side_by_side(
    fns: dict[str, Callable[[], None]], warmup: int, rounds: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round.

    Shared machines slow down for seconds at a time; interleaving puts both sides under the same load and the
    median drops the rounds that caught a stall, so the ratio is steadier than two back-to-back means.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
