"""Load test of `danlu serve`: 1, 4 and 16 concurrent streaming clients, continuous batching vs round robin.

The same model behind three workers, one after the other, on loopback only: `process` (what `danlu serve` runs:
the model in an engine process of its own, danlu.serve.engine_process, decoding all streams in one step), `thread`
(the same continuous batching in a thread of the server's process, sharing its GIL with the event loop) and
`round-robin` (the worker before batching: each stream its own cache, one token in turn; `ModelWorker(...,
batched=False)`). Greedy requests, so the batched answers must equal the round robin's, which are unbatched greedy
decoding (`Generator.stream` per request): checked, the run fails otherwise. Bounded in count (clients × requests)
and time (--time-limit); every stream must end with its finish chunk and `data: [DONE]`. Reports aggregate
tokens/s, its ratio to one client, and p50/p90/p99 of the time to first token and of the gaps between a stream's
chunks.

    python benchmarks/serve_load.py                      # a random-init depth-4 model (shape of the tiny recipe)
    python benchmarks/serve_load.py --checkpoint runs/tiny/sft/model --clients 1,4,16
    python benchmarks/serve_load.py --clients-apart      # the clients in a process of their own, as real users are

By default the clients run in the server's process (a third thread beside uvicorn's loop and the worker), so their
HTTP parsing takes the same interpreter lock as the server; `--clients-apart` measures the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
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
        "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    arrivals: list[float] = []
    done = finished = False
    tokens = 0
    text = ""
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
                if c["delta"].get("content"):
                    arrivals.append(time.perf_counter())
                    text += c["delta"]["content"]
                finished = finished or c.get("finish_reason") is not None
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if not (done and finished and tokens == max_tokens):
        raise RuntimeError(f"stream {i} incomplete (done={done}, finish chunk={finished}, tokens={tokens})")
    first = arrivals[0] if arrivals else end
    return {"i": i, "text": text, "ttft": first - t0, "latency": end - t0, "tokens": tokens,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else 0.0


async def run_clients(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(w: int) -> list[dict]:
            return [await one_stream(client, url, model, max_tokens, w * 1000 + k) for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "clients": clients, "streams": len(results), "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        **{f"ttft_p{q}_s": round(pct(ttft, q), 3) for q in (50, 90, 99)},
        **{f"gap_p{q}_ms": round(1000 * pct(gaps, q), 1) for q in (50, 90, 99)},
        "texts": {r["i"]: r["text"] for r in results},
    }  # fmt: skip


async def client_runs(url: str, counts: list[int], requests: int, max_tokens: int, apart: bool) -> list[dict]:
    """One `run_clients` per client count, in order: here, or in a child process of their own (`apart`)."""
    if not apart:
        return [await run_clients(url, "bench", n, requests, max_tokens) for n in counts]
    import subprocess

    command = [sys.executable, __file__, "--as-clients", url, "--clients", ",".join(map(str, counts)),
               "--requests", str(requests), "--max-tokens", str(max_tokens)]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random-init model, see --depth)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--context", type=int, default=512)
    p.add_argument(
        "--clients", default="1,4,16", help="client counts, comma-separated (the first is the base)"
    )
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--modes",
        default="process,thread,round-robin",
        help="workers to compare, comma-separated: process (danlu serve's: the model in an engine "
        "process, batched), thread (batched in a thread of the server), round-robin (in a thread)",
    )
    p.add_argument(
        "--time-limit", type=float, default=1800, help="give up (and fail) after this many seconds"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"], help="as `danlu serve --compile`"
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--clients-apart", action="store_true", help="run the clients in a process of their own")
    # the child process of --clients-apart
    p.add_argument("--as-clients", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if args.as_clients:
        runs = asyncio.run(client_runs(args.as_clients, counts, args.requests, args.max_tokens, False))
        print(json.dumps(runs))
        return 0
    modes = args.modes.split(",")

    import datetime as dt

    import torch

    from danlu.compiler import resolve_compile
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.engine import ModelWorker
    from danlu.serve.engine_process import freeze_heap
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    results: dict[str, list[dict]] = {}
    warm_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or str(random_checkpoint(Path(tmp) / "ckpt", args.depth, args.context))
        compiled = resolve_compile(args.compile, args.device)
        here = None  # the model loaded in this process, for the thread and round-robin workers
        for mode in modes:
            if mode == "process":
                served = load_served_model("bench", path, device=args.device, compile=compiled,
                                           max_active=max(counts), engine="process")  # fmt: skip
            else:
                if here is None:
                    here = load_served_model("bench", path, device=args.device, compile=compiled,
                                             max_active=max(counts))  # fmt: skip
                    gen = here.worker.generator
                    here.worker.close()
                served = dataclasses.replace(here, worker=ModelWorker(
                    gen, name="bench", max_active=max(counts), batched=mode == "thread"))  # fmt: skip
            t0 = time.perf_counter()  # load_served_model's warm_up compiled the decode steps already
            app = create_app([served], ServeOptions(now=lambda: dt.datetime(2026, 11, 21, 14, 5)))
            freeze_heap()  # as `danlu serve` does once its models are loaded
            try:
                with BackgroundServer(app) as url:  # 127.0.0.1, a free port

                    async def warm_up(url: str = url) -> None:  # compiles decode_step (round robin), prefills
                        await client_runs(url, counts, 1, 8, args.clients_apart)

                    async def measured(url: str = url) -> list[dict]:
                        apart = args.clients_apart
                        return await client_runs(url, counts, args.requests, args.max_tokens, apart)

                    asyncio.run(asyncio.wait_for(warm_up(), args.time_limit))
                    warm_s[mode] = round(time.perf_counter() - t0, 1)
                    results[mode] = asyncio.run(asyncio.wait_for(measured(), args.time_limit))
            finally:
                served.worker.close()
    same = None
    if len(results) > 1:
        texts = [{i: t for row in rows for i, t in row["texts"].items()} for rows in results.values()]
        same = all(t == texts[0] for t in texts[1:])
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads", "model": path if args.checkpoint else
            f"random-init depth {args.depth}, context {args.context}", "max_tokens": args.max_tokens,
            "compiled decode": compiled, "warm_up_s": warm_s, "same_greedy_texts": same,
            "load": os.getloadavg()}  # fmt: skip
    print(f"# serve load · {info['machine']} · {info['model']} · {args.max_tokens} tokens per answer · "
          f"{'compiled' if compiled else 'eager'} decode · {args.requests} requests per client · clients "
          f"{'in a process of their own' if args.clients_apart else 'in the server process'} · "
          f"load average {' '.join(f'{x:.2f}' for x in info['load'])}")  # fmt: skip
    keys = ["clients", "streams", "aggregate_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "gap_p50_ms",
            "gap_p90_ms", "gap_p99_ms"]  # fmt: skip
    print("| worker | " + " | ".join(keys) + " | × 1 client | × round robin |")
    print("|---|" + "---|" * (len(keys) + 2))
    for mode, rows in results.items():
        for k, row in enumerate(rows):
            other = results.get("round-robin", rows)[k]["aggregate_tokens_per_s"]
            print(f"| {mode} | " + " | ".join(str(row[key]) for key in keys) +
                  f" | ×{row['aggregate_tokens_per_s'] / rows[0]['aggregate_tokens_per_s']:.2f}"
                  f" | ×{row['aggregate_tokens_per_s'] / other:.2f} |")  # fmt: skip
    print(f"warm-up (compile + first requests), s: {warm_s}")
    if same is not None:
        print(
            f"greedy texts equal across the workers ({', '.join(results)}; round robin = unbatched "
            f"Generator.stream): {same}"
        )
    if args.json:
        for rows in results.values():
            for row in rows:
                row.pop("texts")
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2))
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
