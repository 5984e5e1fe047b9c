"""`calm --help` and `calm COMMAND --help`: no torch import, help text that says what is true.

The help of every subcommand is built with torch made unimportable, so a command-line module
that imports torch at module level (which made `--help` take 12-18 s) fails here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from calm.cli import COMMANDS, HelpFormatter, apply_threads, build_command_parser

COMPUTE_COMMANDS = ("train-ae", "train", "eval", "generate", "serve", "quickstart")

_NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.argv = ['calm'] + sys.argv[1:]\n"
    "from calm.cli import main\n"
    "main()\n"
)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_needs_no_torch(command):
    args = [sys.executable, "-c", _NO_TORCH] + ([command] if command else []) + ["--help"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: calm" in out.stdout


def _help(command: str) -> str:
    parser, _ = build_command_parser(command)
    return parser.format_help()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_only_meaningful_defaults(command):
    text = " ".join(_help(command).split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "(default: )" not in text
    assert "(default: False)" not in text
    assert "(default: [])" not in text


def test_help_formatter_rules():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--req", required=True, default="x", help="required")
    parser.add_argument("--said", default=3, help="count (default: cores - 1)")
    parser.add_argument("--plain", default=7, help="a number")
    parser.add_argument("--flag", action="store_true", help="a switch")
    text = " ".join(parser.format_help().split())
    assert "required (default" not in text
    assert text.count("default") == 2  # the one --said states itself, and --plain's
    assert "a number (default: 7)" in text
    assert "a switch (default" not in text


@pytest.mark.parametrize("command", COMPUTE_COMMANDS)
def test_compute_commands_take_threads(command):
    parser, _ = build_command_parser(command)
    dests = {a.dest: a.default for a in parser._actions}
    assert dests.get("threads") == 0


def test_apply_threads():
    import torch

    before = torch.get_num_threads()
    try:
        apply_threads(argparse.Namespace(threads=1))
        assert torch.get_num_threads() == 1
        apply_threads(argparse.Namespace(threads=0))  # 0 leaves it alone
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 0"):
            apply_threads(argparse.Namespace(threads=-2))
    finally:
        torch.set_num_threads(before)


def test_threads_negative_is_a_clear_cli_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "calm", "eval", str(tmp_path), "--data", str(tmp_path), "--threads", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--threads must be >= 0" in out.stderr


def test_cli_constants_match_the_library():
    from calm import brier, evaluate, evaluate_cli

    assert evaluate_cli.DEFAULT_BLOCK_SIZE == evaluate.DEFAULT_BLOCK_SIZE
    assert evaluate_cli.DEFAULT_BATCH_SIZE == evaluate.DEFAULT_BATCH_SIZE
    assert evaluate_cli.COLLISION_ESTIMATORS == brier.COLLISION_ESTIMATORS
