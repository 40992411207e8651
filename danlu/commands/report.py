"""Writes a run's report: `danlu report RUN_DIR` → RUN_DIR/report.md and the self-contained RUN_DIR/report.html."""

from __future__ import annotations

import argparse

HELP = "write report.md and report.html (loss curves, eval table, throughput, data, samples) for a run folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (danlu run --out DIR)")


def run(args: argparse.Namespace) -> int:
    from danlu.eval.report import write_report

    md, page = write_report(args.run_dir)
    print(f"wrote {md}\nwrote {page}")
    return 0
