"""`danlu <command>`: one light module per command in `danlu.commands`, discovered at start-up.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args)`. Command modules must
not import torch or other heavy libraries at module level: `danlu --help` answers in well under a second.
A command with a distributed form says so with `EVERY_RANK` (True, or a function of its arguments): under torchrun
every process runs it. Any other command runs on rank 0 alone, as one process would, and the other ranks end.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from danlu import DanluError, __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="danlu",
        description="丹炉 danlu — build a ChatGPT-style assistant end to end "
        "(data → tokenizer → pretrain → SFT → preferences/RL → eval → serve).",
    )
    parser.add_argument("--version", action="version", version=f"danlu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"danlu.commands.{info.name}")
        name = getattr(module, "NAME", info.name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _every_rank=getattr(module, "EVERY_RANK", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `danlu run tiny --out X a.b=1`: key=value overrides may follow options, which argparse alone refuses.
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        result = _run_in_launch(args)
    except DanluError as e:
        print(f"danlu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndanlu {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # The torchrun process group (started by the first stage, shared by the rest) ends with the command, not
        # with the interpreter: see engine.close_distributed. No engine loaded means no group to close.
        engine = sys.modules.get("danlu.engine")
        if engine is not None:
            engine.close_distributed()
    return int(result or 0)


def _run_in_launch(args: argparse.Namespace) -> int:
    """The command, or under torchrun for a command without a distributed form (eval, export, data, merge …): rank
    0 alone runs it as a plain process would (`engine.single_process`), and the other ranks end at once. Every
    rank running it would do the work N times and race on its output files."""
    every_rank = args._every_rank(args) if callable(args._every_rank) else args._every_rank
    if every_rank or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return args._run(args)
    from danlu.commands._training import main_rank

    if not main_rank():
        return 0
    from danlu.engine import single_process

    print(f"[danlu] {args.command} has no distributed form: rank 0 runs it alone and the other ranks end",
          file=sys.stderr)  # fmt: skip
    with single_process():
        return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
