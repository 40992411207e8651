"""`danlu --help` and every command's (and sub-command's) help render: argparse formats help strings with %, so a
stray "1%" in one command's help breaks `danlu --help` for every command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from danlu.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_help_renders() -> None:
    seen = []
    for path, parser in _parsers(build_parser()):
        assert parser.format_help(), path
        seen.append(" ".join(path))
    assert {"run", "export", "merge", "detect train", "synth instruct", "compress"} <= set(seen)


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"]])
def test_help_is_fast_and_light(argv: list[str]) -> None:
    """Commands import heavy modules lazily: --help must not import torch."""
    code = "import sys; from danlu.cli import main\ntry:\n    main(%r)\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code % argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout[-500:]


@pytest.mark.parametrize("flags", [["--max-active", "0"], ["--max-queued", "-1"]])
def test_serve_refuses_queue_bounds_that_admit_nothing(flags: list[str], tmp_path, capsys) -> None:
    """A server that could run no stream (or a negative queue) is refused before any model loads, naming both."""
    from danlu.cli import main

    assert main(["serve", str(tmp_path / "never-read"), *flags]) == 2
    assert "--max-active" in capsys.readouterr().err


def test_every_device_option_is_checked_when_read(capsys) -> None:
    """Each command that loads a model names a device this torch cannot reach in one line, before it loads
    anything (`danlu generate CKPT --device gpu` used to fail deep in load_checkpoint's first `.to()`)."""
    with_device = [path for path, parser in _parsers(build_parser())
                   if any("--device" in a.option_strings for a in parser._actions)]  # fmt: skip
    assert {("generate",), ("chat",), ("serve",), ("eval",), ("synth", "instruct"), ("detect", "score")} <= set(
        with_device
    )
    for path in with_device:
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args([*path, "--device", "gpu"])
        assert stopped.value.code == 2
        assert "argument --device: device 'gpu': not a device" in capsys.readouterr().err, path
