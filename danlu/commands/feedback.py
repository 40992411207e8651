"""Feedback collected by `danlu serve`: statistics, and export as training data.

`danlu feedback export --out DIR` writes DIR/sft.jsonl (the users' corrected answers, OpenAI `messages`) and
DIR/preference.jsonl (prompt/chosen/rejected: a correction over the original answer, a thumbs-up answer over a
thumbs-down answer to the same prompt), which `danlu sft` and `danlu dpo` read directly.
"""

from __future__ import annotations

import argparse

HELP = "show or export the served models' feedback (ratings, corrections) as SFT and preference data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="feedback_command", metavar="SUBCOMMAND", required=True)
    exp = sub.add_parser("export", help="write sft.jsonl and preference.jsonl from the feedback database")
    exp.add_argument(
        "--db", default="danlu-feedback.sqlite3", help="feedback SQLite file (as given to serve)"
    )
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--include-upvoted", action="store_true",
                     help="also put thumbs-up answers into sft.jsonl (not only corrections)")  # fmt: skip
    exp.set_defaults(_sub=_export)
    st = sub.add_parser("stats", help="count conversations, answers, ratings and corrections")
    st.add_argument("--db", default="danlu-feedback.sqlite3")
    st.set_defaults(_sub=_stats)


def run(args: argparse.Namespace) -> int:
    return args._sub(args)


def _open(path: str):
    from pathlib import Path

    from danlu import DanluError
    from danlu.serve.feedback import FeedbackStore

    if not Path(path).is_file():
        raise DanluError(
            f"{path}: no such feedback database (start `danlu serve --feedback-db {path}` first)"
        )
    return FeedbackStore(path)


def _export(args: argparse.Namespace) -> int:
    counts = _open(args.db).export(args.out, include_upvoted=args.include_upvoted)
    print(f"[danlu] {counts['sft']} SFT dialogs → {args.out}/sft.jsonl")
    print(f"[danlu] {counts['preference']} preference pairs → {args.out}/preference.jsonl")
    return 0


def _stats(args: argparse.Namespace) -> int:
    for k, v in _open(args.db).stats().items():
        print(f"{k:>14}  {v}")
    return 0
