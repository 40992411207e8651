"""Does teacher-made data help? A student fine-tuned on hand-written + Self-Instruct data vs hand-written only.

    python benchmarks/synth_experiment.py --run runs/smoke --teacher-context 512 --out /tmp/synth_exp \
        --n 40 --hand 300 --answers 200 --steps 60
    python benchmarks/synth_experiment.py --run runs/tiny --recipe tiny --out /tmp/synth_tiny --n 200 --answers 500

`--run` is a `danlu run` folder with `world/` (sft.jsonl, eval/), `pretrain/` (the student's base) and `sft/`
(the teacher, unless --teacher names another chat checkpoint). The teacher is served by `danlu serve` on a free
loopback port and `danlu synth instruct` asks it through the OpenAI API, seeded with user turns of the
hand-written set; both students start from the same base with the same steps and seed; the held-out chat sets of
danlu/eval/world.py score them. With --answers K, a third student adds the teacher's answers (`danlu synth answer`)
to K other world prompts (sequence-level distillation). Printed: the held-out deltas, the synth run's kept/generated ratio, and the
duplicate rate, distinct-n and language mix of both data sets. Not a test: the numbers are whatever they are.

Why --teacher-context: the smoke recipe's models have a 128-token context, shorter than a Self-Instruct prompt
(~180 tokens with two examples). With it the teacher is served from a copy whose config.json allows that many
positions (RoPE extrapolation, untrained): it runs, and the results say how little such a teacher gives.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

# preference_chat is left out: its prompts exceed a 128-token context, which danlu/eval/loglik.py does not handle
CHAT_SETS = ["facts_chat", "arithmetic_chat", "translation", "summary"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from danlu.files import write_jsonl_atomic

    write_jsonl_atomic(path, rows)


def danlu(*args: str, log: Path, timeout: float) -> int:
    cmd = [sys.executable, "-m", "danlu", *args]
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


def teacher_copy(src: Path, dst: Path, context: int | None) -> Path:
    if not context:
        return src
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("trainer_state"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = max(context, int(cfg["max_position_embeddings"]))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def serve(ckpt: Path, port: int, log: Path) -> subprocess.Popen:
    f = open(log, "a", encoding="utf-8")  # noqa: SIM115 - the server's log for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", str(ckpt), "--host", "127.0.0.1", "--port",
                             str(port), "--no-feedback", "--no-date", "--no-tools", "--log-level", "warning"], stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"danlu serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"danlu serve did not come up in 180 s; see {log}")


def evaluate(ckpt: Path, eval_dir: Path, limit: int) -> dict[str, Any]:
    from danlu.eval.world import evaluate_world
    from danlu.io import load_checkpoint

    c = load_checkpoint(ckpt, quiet=True)
    res = evaluate_world(c.model, c.tokenizer, CHAT_SETS, data=eval_dir, limit=limit, batch_size=32)
    return {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in res.items()}


def synth_run(
    kind: str, args: list[str], out_file: Path, port: int, log: Path, timeout: float, reuse: bool
) -> dict:
    """One `danlu synth KIND` run against the served teacher: its exit code, seconds, and yield."""
    from danlu.synth.stats import run_yield

    journal = out_file.with_name(out_file.stem + ".log.jsonl")
    t = time.time()
    if not (reuse and out_file.exists()):
        for f in (out_file, journal):
            f.unlink(missing_ok=True)
        try:
            rc = danlu("synth", kind, "--teacher", f"http://127.0.0.1:{port}", "--out", str(out_file), *args,
                       log=log, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    else:
        rc = 0
    y = run_yield(out_file) if journal.exists() else {"generated": 0, "kept": 0}
    return {"rc": rc, "seconds": round(time.time() - t, 1), "yield": y}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--teacher", type=Path, help="chat checkpoint (default: RUN/sft)")
    ap.add_argument("--teacher-context", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=40, help="Self-Instruct rows to keep")
    ap.add_argument(
        "--hand", type=int, default=300, help="hand-written dialogs (a seeded sample of world/sft)"
    )
    ap.add_argument("--answers", type=int, default=0, help="also: the teacher answers this many other world/sft "
                    "prompts (`danlu synth answer`, sequence-level distillation), a third student")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=24, help="seed tasks (user turns of the hand-written set)")
    ap.add_argument("--steps", type=int, default=60, help="SFT steps of each student")
    ap.add_argument("--limit", type=int, default=64, help="rows per held-out set")
    ap.add_argument("--synth-timeout", type=float, default=600)
    ap.add_argument(
        "--recipe", default="smoke", help="recipe whose sft section the students use (tiny for runs/tiny)"
    )
    ap.add_argument("--reuse", action="store_true", help="keep synth outputs and students already in --out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from danlu.synth.stats import dialog_stats

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    t0 = time.time()
    rng = random.Random(a.seed)
    world = read_jsonl(a.run / "world" / "sft.jsonl")
    order = rng.sample(range(len(world)), len(world))
    hand = [world[i] for i in order[: a.hand]]
    rest = [world[i] for i in order[a.hand :]]
    write_jsonl(out / "hand.jsonl", hand)
    short = [r["messages"][0]["content"] for r in hand if r["messages"][0]["role"] == "user"]
    short = sorted({t for t in short if len(t) <= 40 and "\n" not in t})
    seeds = rng.sample(short, min(a.seeds, len(short)))
    (out / "seeds.txt").write_text("\n".join(seeds) + "\n", encoding="utf-8")
    prompts = [{"messages": r["messages"][:1]} for r in rest if r["messages"][0]["role"] == "user"][
        : a.answers
    ]
    if prompts:
        write_jsonl(out / "prompts.jsonl", prompts)

    teacher = teacher_copy(a.teacher or a.run / "sft", out / "teacher", a.teacher_context)
    port = free_port()
    synth, answers = out / "synth.jsonl", out / "answers.jsonl"
    proc = serve(teacher, port, out / "serve.log")
    runs: dict[str, Any] = {}
    try:
        runs["instruct"] = synth_run("instruct", ["--seed", str(out / "seeds.txt"), "--n", str(a.n), "--examples", "2",
                                                  "--per-request", "2", "--max-tokens", "48", "--batch-size", "4",
                                                  "--min-words", "2", "--random-seed", str(a.seed)],
                                     synth, port, log, a.synth_timeout, a.reuse)  # fmt: skip
        if prompts:
            runs["answer"] = synth_run("answer", ["--prompts", str(out / "prompts.jsonl"), "--max-tokens", "64",
                                                  "--batch-size", "8", "--random-seed", str(a.seed)],
                                       answers, port, log, a.synth_timeout, a.reuse)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
    data_sets = {"hand": hand}
    if synth.exists():
        data_sets["synth"] = read_jsonl(synth)
    if answers.exists():
        data_sets["answers"] = read_jsonl(answers)
    result: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(a).items()}, "synth": runs,
        "stats": {k: dialog_stats(v) for k, v in data_sets.items() if v},
    }  # fmt: skip
    students: dict[str, list[Path]] = {"hand": [out / "hand.jsonl"]}
    if data_sets.get("synth"):
        students["hand+synth"] = [out / "hand.jsonl", synth]
    if data_sets.get("answers"):
        students["hand+answers"] = [out / "hand.jsonl", answers]
    evals = {}
    for name, data in students.items():
        ckpt = out / f"student_{name.replace('+', '_')}"
        if not (a.reuse and (ckpt / "model.safetensors").exists()):
            shutil.rmtree(ckpt, ignore_errors=True)
            code = danlu("sft", "--from", str(a.run / "pretrain"), "--data", *map(str, data), "--out", str(ckpt),
                         "--recipe", a.recipe, f"sft.train.steps={a.steps}", "sft.train.eval_every=0",
                         "sft.train.sample_every=0", f"seed={a.seed}", log=log, timeout=1800)  # fmt: skip
            if code != 0:
                raise SystemExit(f"danlu sft for {name} failed ({code}); see {log}")
        evals[name] = evaluate(ckpt, a.run / "world" / "eval", a.limit)
    result["eval"] = evals
    result["delta"] = {
        name: {k: round(evals[name][k]["accuracy"] - evals["hand"][k]["accuracy"], 4) for k in CHAT_SETS}
        for name in evals if name != "hand"
    }  # fmt: skip
    result["seconds"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
