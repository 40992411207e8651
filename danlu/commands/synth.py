"""Data a teacher model makes, as SFT rows (OpenAI `messages` + `meta`: teacher, prompt, filters passed).

  danlu synth instruct --teacher URL|CKPT --seed seed_tasks.jsonl --n 1000 --out synth.jsonl   (Self-Instruct)
  danlu synth answer   --teacher URL|CKPT --prompts prompts.jsonl --out answers.jsonl         (distillation data)
  danlu synth magpie   --teacher CKPT --n 500 --out magpie.jsonl                               (Magpie)

A teacher is an OpenAI-compatible API root (`danlu serve`, vLLM, Ollama, a hosted API; key from the environment
variable --api-key-env names) or a local chat checkpoint. Runs resume: run the same command again after a kill.
Rejected rows, with the filter they failed, go to OUT's journal (synth.log.jsonl beside synth.jsonl).
"""

from __future__ import annotations

import argparse

from danlu.commands._device import add_device_argument

HELP = "make SFT data with a teacher model: self-instruct, answers to prompts (distillation), Magpie"


def _common(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--teacher", required=True, help="http(s)://host:port[/v1] of an OpenAI-compatible API, or a "
                   "chat checkpoint folder")  # fmt: skip
    p.add_argument("--out", required=True, help="output .jsonl (kept rows; resumed if it exists)")
    p.add_argument("--model", help="model name at the endpoint (default: the first it lists)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key "
                   "(default: $OPENAI_API_KEY if set, else no key)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at an endpoint (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried")
    p.add_argument(
        "--retries", type=int, default=4, help="tries after the first on 5xx/429/timeouts (default 4)"
    )
    p.add_argument("--rps", type=float, help="at most this many requests per second (default: no limit)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per round (a local teacher's batch)")
    add_device_argument(p, what="device of a local teacher: ")
    p.add_argument("--max-tokens", type=int, default=512, help="token limit of an answer")
    p.add_argument("--temperature", type=float, default=0.7, help="answer temperature")
    p.add_argument("--random-seed", type=int, default=0, help="seed of example sampling and of the teacher")
    p.add_argument("--system", help="system prompt put before every user turn")
    p.add_argument("--max-answer-words", type=int, default=2000)


def _instruction_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rouge", type=float, default=0.7, help="drop an instruction whose ROUGE-L with a kept one "
                   "exceeds this (default 0.7, Self-Instruct's)")  # fmt: skip
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--max-words", type=int, default=150)
    p.add_argument("--lang", help="comma-separated languages to keep (zh,en); default: any")
    p.add_argument("--block-word", action="append", default=[], help="also drop instructions with WORD")
    p.add_argument("--no-default-blocklist", action="store_true",
                   help="drop Self-Instruct's image/file/audio words (and their Chinese) from the blocklist")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="synth_command", metavar="SUBCOMMAND", required=True)
    ins = sub.add_parser("instruct", help="Self-Instruct: new instructions from seed tasks, then answers",
                         description=__doc__)  # fmt: skip
    _common(ins)
    _instruction_filters(ins)
    ins.add_argument(
        "--seed", required=True, help="seed tasks (messages/ShareGPT/Alpaca/instruction .jsonl, .txt)"
    )
    ins.add_argument("--n", type=int, required=True, help="rows to keep")
    ins.add_argument("--per-request", type=int, default=8, help="new instructions asked per request")
    ins.add_argument("--examples", type=int, default=8, help="example tasks shown per request")
    ins.set_defaults(_sub=_instruct)
    ans = sub.add_parser(
        "answer", help="the teacher's answers to prompts (distillation data)", description=__doc__
    )
    _common(ans)
    ans.add_argument(
        "--prompts", required=True, help="prompts (messages/ShareGPT/Alpaca/prompt .jsonl, .txt)"
    )
    ans.add_argument("--n", type=int, help="answer only the first N prompts")
    ans.set_defaults(_sub=_answer)
    mag = sub.add_parser(
        "magpie", help="Magpie: a chat model writes user turns from its template", description=__doc__
    )
    _common(mag)
    _instruction_filters(mag)
    mag.add_argument("--n", type=int, required=True, help="rows to keep")
    mag.add_argument("--template", help="tokenizer/checkpoint folder whose chat template an endpoint teacher uses "
                     "(default: ChatML)")  # fmt: skip
    mag.set_defaults(_sub=_magpie)


def run(args: argparse.Namespace) -> int:
    from danlu import DanluError

    if getattr(args, "n", None) is not None and args.n < 1:
        raise DanluError(f"--n {args.n}: must be at least 1")
    return args._sub(args)


def _settings(args: argparse.Namespace, **extra: object) -> dict:
    keys = ("synth_command", "teacher", "model", "system", "max_tokens", "temperature", "random_seed",
            "max_answer_words", "rouge", "min_words", "max_words", "lang", "block_word", "no_default_blocklist",
            "per_request", "examples", "template")  # fmt: skip
    return {k: getattr(args, k) for k in keys if hasattr(args, k)} | dict(extra)


def _filters(args: argparse.Namespace):
    from danlu import DanluError
    from danlu.synth.filters import BLOCKED_EN, BLOCKED_ZH, Filters

    if not 0 < getattr(args, "rouge", 0.7) <= 1:
        raise DanluError(f"--rouge {args.rouge}: must be in (0, 1]")
    langs = None
    if getattr(args, "lang", None):
        langs = frozenset(x.strip() for x in args.lang.split(",") if x.strip())
        unknown = langs - {"zh", "en", "ja", "ko", "other"}
        if unknown:
            raise DanluError(
                f"--lang {args.lang}: unknown language(s) {', '.join(sorted(unknown))} (zh, en, ja, ko)"
            )
    blocked = () if getattr(args, "no_default_blocklist", False) else BLOCKED_EN + BLOCKED_ZH
    return Filters(
        min_words=getattr(args, "min_words", 3), max_words=getattr(args, "max_words", 150),
        max_answer_words=args.max_answer_words, languages=langs,
        blocked=blocked + tuple(getattr(args, "block_word", [])), rouge_threshold=getattr(args, "rouge", 0.7),
    )  # fmt: skip


def _teacher(args: argparse.Namespace):
    from danlu.synth.teacher import open_teacher

    return open_teacher(
        args.teacher, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout=args.timeout, retries=args.retries, rps=args.rps, batch_size=args.batch_size, device=args.device,
    )  # fmt: skip


def _answer_sampling(args: argparse.Namespace):
    from danlu.synth.teacher import Sampling

    return Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.random_seed)


def _report(store) -> int:  # noqa: ANN001
    rejected = ", ".join(f"{k} {v}" for k, v in store.rejected.most_common()) or "none"
    print(f"[danlu] synth: {store.kept} rows in {store.out}; rejected: {rejected} (why: {store.log})")
    return 0


def _instruct(args: argparse.Namespace) -> int:
    from danlu.synth.instruct import InstructConfig, run_instruct
    from danlu.synth.prompts import read_prompts
    from danlu.synth.store import SynthStore
    from danlu.synth.teacher import Sampling

    seeds = [
        m[-1]["content"] for _, m in read_prompts(args.seed)
    ]  # before any request: a bad file costs nothing
    filters = _filters(args)
    store = SynthStore(args.out, _settings(args, seed_file=str(args.seed), seeds=len(seeds)))
    teacher = _teacher(args)
    cfg = InstructConfig(
        n=args.n, per_request=args.per_request, examples=args.examples, jobs_per_round=args.batch_size,
        seed=args.random_seed, system=args.system, answer_sampling=_answer_sampling(args),
        instruction_sampling=Sampling(max_tokens=max(256, 40 * args.per_request), temperature=1.0,
                                      seed=args.random_seed),
    )  # fmt: skip
    run_instruct(teacher, seeds, store, filters, cfg)
    return _report(store)


def _answer(args: argparse.Namespace) -> int:
    from danlu.synth.answer import run_answer
    from danlu.synth.prompts import read_prompts
    from danlu.synth.store import SynthStore

    prompts = read_prompts(args.prompts)
    filters = _filters(args)
    store = SynthStore(args.out, _settings(args, prompts_file=str(args.prompts), prompts=len(prompts)))
    teacher = _teacher(args)
    run_answer(
        teacher, prompts, store, filters, _answer_sampling(args), n=args.n, jobs_per_round=args.batch_size
    )
    return _report(store)


def _magpie(args: argparse.Namespace) -> int:
    from danlu.synth.magpie import MagpieConfig, resolve_prefix, run_magpie
    from danlu.synth.store import SynthStore
    from danlu.synth.teacher import Sampling

    filters = _filters(args)
    store = SynthStore(args.out, _settings(args))
    teacher = _teacher(args)
    prefix = resolve_prefix(teacher, args.template, args.system)
    cfg = MagpieConfig(
        n=args.n, jobs_per_round=args.batch_size, system=args.system, answer_sampling=_answer_sampling(args),
        user_sampling=Sampling(max_tokens=128, temperature=1.0, seed=args.random_seed),
    )  # fmt: skip
    run_magpie(teacher, prefix, store, filters, cfg)
    return _report(store)
