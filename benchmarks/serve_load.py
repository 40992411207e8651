"""Load test of `danlu serve`: 1 streaming client, then N concurrent streaming clients, on loopback only.

Bounded in count (clients × requests) and time (--time-limit); every stream must end with `data: [DONE]` and
its finish chunk, or the run fails. Reports time to first token, request latency, per-stream and aggregate
tokens/s, for the one-client and the concurrent runs side by side.

    python benchmarks/serve_load.py                      # a random-init depth-4 model (shape of the tiny recipe)
    python benchmarks/serve_load.py --checkpoint runs/tiny/sft/model --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_checkpoint(folder: Path, depth: int, context: int) -> Path:
    import torch

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer
    from danlu.tokenizer import Tokenizer

    text = [
        "中国最高的山是珠穆朗玛峰。中国最长的河是长江。The capital of Japan is Tokyo. 12 + 34 = 46."
    ] * 200
    tok = Tokenizer.train(text, vocab_size=2048)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=depth, max_position_embeddings=context)
    torch.manual_seed(0)
    save_model_dir(folder, Transformer(cfg).state_dict(), cfg, tok, {"stage": "benchmark"}, chat=True)
    return folder


async def one_stream(client, url: str, model: str, max_tokens: int, i: int) -> dict:
    body = {
        "model": model, "messages": [{"role": "user", "content": f"中国最高的山是什么? ({i})"}],
        "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    first = None
    done = finished = False
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk.get("choices", []):
                if c["delta"].get("content") and first is None:
                    first = time.perf_counter()
                finished = finished or c.get("finish_reason") is not None
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if not (done and finished and tokens == max_tokens):
        raise RuntimeError(f"stream {i} incomplete (done={done}, finish chunk={finished}, tokens={tokens})")
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens,
            "stream_tps": tokens / max(end - (first or t0), 1e-9)}  # fmt: skip


async def run_clients(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(w: int) -> list[dict]:
            return [await one_stream(client, url, model, max_tokens, w * 1000 + k) for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    return {
        "clients": clients, "streams": len(results), "errors": 0, "wall_s": round(wall, 2),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3),
        "ttft_max_s": round(max(r["ttft"] for r in results), 3),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "stream_tokens_per_s": round(statistics.median(r["stream_tps"] for r in results), 1),
        "aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random-init model, see --depth)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=300, help="give up (and fail) after this many seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"], help="as `danlu serve --compile`"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch

    from danlu.generate import resolve_compile
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or str(random_checkpoint(Path(tmp) / "ckpt", args.depth, args.context))
        compiled = resolve_compile(args.compile, args.device)
        model = load_served_model("bench", path, device=args.device, compile=compiled)
        app = create_app([model], ServeOptions())
        try:
            with BackgroundServer(app) as url:  # 127.0.0.1, a free port

                async def both() -> tuple[dict, dict]:
                    await run_clients(url, "bench", 1, 1, 8)  # warm-up
                    one = await run_clients(url, "bench", 1, args.requests, args.max_tokens)
                    many = await run_clients(url, "bench", args.clients, args.requests, args.max_tokens)
                    return one, many

                one, many = asyncio.run(asyncio.wait_for(both(), args.time_limit))
        finally:
            model.worker.close()
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads", "model": path if args.checkpoint else
            f"random-init depth {args.depth}, context {args.context}", "max_tokens": args.max_tokens,
            "compiled decode": compiled}  # fmt: skip
    print(f"# serve load · {info['machine']} · {info['model']} · {args.max_tokens} tokens per answer · "
          f"{'compiled' if compiled else 'eager'} decode")  # fmt: skip
    keys = ["clients", "streams", "errors", "ttft_p50_s", "ttft_max_s", "latency_p50_s", "latency_p95_s",
            "stream_tokens_per_s", "aggregate_tokens_per_s"]  # fmt: skip
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in (one, many):
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print(f"aggregate throughput ×{many['aggregate_tokens_per_s'] / one['aggregate_tokens_per_s']:.2f} with "
          f"{args.clients} clients vs 1")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "one": one, "many": many}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
