"""Data commands: `danlu data prepare` (clean/filter/dedup/mix raw sources) and `danlu data tokenize`."""

from __future__ import annotations

import argparse

HELP = "prepare raw text (clean, filter, dedup, mix) or tokenize it into packed shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prep = sub.add_parser("prepare", help="run a data pipeline recipe (datatrove: local, Slurm or Ray)")
    prep.add_argument("recipe", help="recipe YAML with a `data:` section, or a built-in recipe name")
    prep.add_argument("--out", help="output folder (default: runs/<recipe>/data)")
    prep.add_argument("--workers", type=int, help="local worker processes (overrides data.executor.workers)")
    prep.add_argument(
        "--encoding", help="text encoding of the inputs (default: detected: UTF-8/16 BOM, GB18030)"
    )
    prep.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.dedup.minhash=false")
    prep.set_defaults(_sub=_prepare)

    tok = sub.add_parser("tokenize", help="JSONL/Parquet/txt → packed memory-mapped token shards")
    tok.add_argument("inputs", nargs="+", help="files or folders of .jsonl/.json/.parquet/.txt")
    tok.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    tok.add_argument("--out", required=True, help="output folder for the shards")
    tok.add_argument(
        "--text-field",
        default="text",
        help="field holding the text (dotted for nested; a list of strings is joined)",
    )
    tok.add_argument(
        "--encoding", help="text encoding of the inputs (default: detected: UTF-8/16 BOM, GB18030)"
    )
    tok.add_argument("--workers", type=int, default=2)
    tok.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    tok.add_argument(
        "--val-fraction", type=float, default=0.0, help="share of documents held out for validation"
    )
    tok.set_defaults(_sub=_tokenize)


def run(args: argparse.Namespace) -> int:
    return args._sub(args)


def _prepare(args: argparse.Namespace) -> int:
    from danlu.data.pipeline import prepare_command

    _use_encoding(args.encoding)
    return prepare_command(args.recipe, out=args.out, workers=args.workers, overrides=args.overrides)


def _tokenize(args: argparse.Namespace) -> int:
    from danlu.data.shards import tokenize_command

    _use_encoding(args.encoding)
    return tokenize_command(args)


def _use_encoding(name: str | None) -> None:
    """--encoding: every reader, in this process and its workers, decodes the inputs with it."""
    import os

    from danlu.files import ENCODING_ENV, chosen_encoding

    if name:
        os.environ[ENCODING_ENV] = chosen_encoding(name) or "auto"
