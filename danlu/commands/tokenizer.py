"""Tokenizer commands: `danlu tokenizer train` (byte-level BPE on your text) and `danlu tokenizer encode`.

Examples:
  danlu tokenizer train data/text/ --vocab-size 32000 --out runs/tok
  danlu tokenizer encode runs/tok "中国最高的山是珠穆朗玛峰。"
"""

from __future__ import annotations

import argparse

HELP = "train a byte-level BPE tokenizer on text files, or show how a text is tokenized"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    train = sub.add_parser("train", help="train on .jsonl/.json/.parquet/.txt files or folders")
    train.add_argument("inputs", nargs="+", help="files or folders (searched recursively)")
    train.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    train.add_argument("--vocab-size", type=int, default=4096, help="total tokens, added tokens included")
    train.add_argument("--text-field", default="text", help="record field holding the text (default: text)")
    train.add_argument("--min-frequency", type=int, default=2, help="minimum count of a pair to merge it")
    train.add_argument(
        "--max-chars", type=int, default=50_000_000, help="cap on training text, in characters"
    )
    train.add_argument(
        "--max-token-length", type=int, default=16, help="longest token in bytes (0: no limit; default 16)"
    )
    train.set_defaults(_sub=_train)

    enc = sub.add_parser("encode", help="print the token ids and pieces of a text")
    enc.add_argument("tokenizer", help="tokenizer folder (or a model checkpoint folder)")
    enc.add_argument("text", help="the text to encode")
    enc.set_defaults(_sub=_encode)


def run(args: argparse.Namespace) -> int:
    return args._sub(args)


def _train(args: argparse.Namespace) -> int:
    from danlu import DanluError
    from danlu.files import expand_inputs
    from danlu.stages.tokenizer import capped_texts
    from danlu.tokenizer import Tokenizer

    if args.max_chars <= 0:
        raise DanluError(f"--max-chars must be positive, got {args.max_chars}")
    files = expand_inputs(args.inputs)
    counter = {"chars": 0, "docs": 0}
    tok = Tokenizer.train(
        capped_texts(files, args.text_field, args.max_chars, counter),
        args.vocab_size,
        args.min_frequency,
        max_token_length=args.max_token_length or None,
    )
    if counter["docs"] == 0:
        raise DanluError(f"no text found in field {args.text_field!r} of {len(files)} input file(s)")
    tok.save(args.out)
    print(
        f"tokenizer: {tok.vocab_size} tokens trained on {counter['chars']:,} chars "
        f"({counter['docs']:,} documents, {len(files)} files) → {args.out}"
    )
    return 0


def _piece(tok, i: int) -> str:
    raw = tok.piece_bytes(i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character
        return "<" + " ".join(f"0x{b:02X}" for b in raw) + ">"


def _encode(args: argparse.Namespace) -> int:
    from danlu.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    rate = f" ({len(args.text) / len(ids):.2f} chars/token)" if ids else ""
    print(f"{len(ids)} tokens, {len(args.text)} chars{rate}")
    print("ids:", " ".join(map(str, ids)))
    print("pieces:", " ".join(repr(_piece(tok, i)) for i in ids))
    return 0
