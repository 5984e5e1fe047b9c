"""The `calm` command line.

Each subcommand is a pair of plain functions, ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> int``, in a command-line module that imports no torch at module level
(`calm.train_cli`, `calm.evaluate_cli`, `calm.generate`, ...; the run function imports the
work when it runs). Only the subcommand being run is imported, so `calm --help` and
`calm COMMAND --help` answer in a fraction of a second (tests/test_cli_help.py holds this).

``--threads N`` (every command that computes) sets torch's CPU threads before the command
runs (`apply_threads`); 0 keeps torch's default (one per physical core).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function stem, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": (
        "calm.data",
        "prepare",
        "text/JSONL (plain, .gz, .zst), Parquet, Arrow, datasets dirs -> tokenizer (train BPE or load "
        "tokenizer.json) -> token shards",
    ),
    "train-ae": ("calm.train_cli", "train_ae", "train the chunk autoencoder (stage 1)"),
    "train": (
        "calm.train_cli",
        "train",
        "train the CALM model on a frozen autoencoder (stage 2), or the token baseline (--model ar)",
    ),
    "eval": (
        "calm.evaluate_cli",
        "eval",
        "evaluate a checkpoint: BrierLM for CALM/AR, cross-entropy for AR, reconstruction for autoencoders",
    ),
    "generate": ("calm.generate", "generate", "generate text from prompts (logit-free temperature for CALM)"),
    "serve": (
        "calm.serve.command",
        "serve",
        "serve a CALM or baseline checkpoint over HTTP (OpenAI-compatible completions, continuous batching)",
    ),
    "flops": ("calm.flops_cli", "flops", "parameter counts and FLOPs per token for a preset or checkpoint"),
    "quickstart": (
        "calm.quickstart_cli",
        "quickstart",
        "the whole pipeline end to end on a small default, with a report",
    ),
    "export": (
        "calm.export_cli",
        "export",
        "write an inference checkpoint (config.json + model.safetensors) from a training checkpoint, sharded or not",
    ),
    "convert-official": (
        "calm.official_cli",
        "convert_official",
        "convert the authors' released CALM/autoencoder checkpoints to this format",
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it says something: not for required options, flags,
    None or empty defaults, nor where the help text already states its default."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default in ("", [])
            or default is argparse.SUPPRESS
            or "default" in help_.lower()
        ):
            return help_
        return super()._get_help_string(action)


def add_threads_argument(parser) -> None:
    """``--threads N``: torch's CPU threads for the command (`apply_threads`)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="CPU threads for torch; 0 = torch's default (one per physical core, the fastest on an idle "
        "machine). On a busy shared machine 1 can be several times faster (benchmarks/bench_eval.py)",
    )


def apply_threads(args) -> None:
    """Set torch's CPU threads from ``args.threads`` (a ValueError for a negative count)."""
    threads = getattr(args, "threads", 0) or 0
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_official_ae_argument(parser) -> None:
    """``--ae DIR`` for a command that loads its model with `calm.checkpoint.load_model` (``ae_path``)."""
    parser.add_argument(
        "--ae",
        metavar="DIR",
        default=None,
        help="autoencoder directory (or Hub repo id in the local cache) for an official CALM release "
        "that holds no copy of it (our CALM checkpoints carry theirs)",
    )


def add_no_verify_argument(parser) -> None:
    """``--no-verify`` for a command that loads a checkpoint (`calm.checkpoint.load_model` ``verify``)."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check of the checkpoint's weights against its COMPLETE marker and the "
        "refusal of NaN/inf weights (sizes are still checked)",
    )


def add_head_sampling_arguments(parser) -> None:
    """``--head-steps N`` and ``--head-solver NAME``: a CALM flow / diffusion head's sampling
    settings at use time (see `apply_head_sampling`)."""
    parser.add_argument(
        "--head-steps",
        type=int,
        default=None,
        metavar="N",
        help="CALM flow or diffusion head: sampling steps (flow: ODE steps, diffusion: denoising "
        "steps); default: the checkpoint's flow_steps / diffusion_steps. The energy head has none",
    )
    parser.add_argument(
        "--head-solver",
        default=None,
        metavar="NAME",
        help="CALM flow head: midpoint or euler; diffusion head: ddpm or ddim; default: the checkpoint's",
    )


def apply_head_sampling(model, args) -> None:
    """Apply ``--head-steps`` / ``--head-solver`` to a loaded model (ConfigError naming the
    setting when it is bad, the head has no such setting, or the model is not a CALM model)."""
    steps, solver = getattr(args, "head_steps", None), getattr(args, "head_solver", None)
    if steps is None and solver is None:
        return
    if getattr(model.config, "kind", None) != "calm":
        from calm.config import ConfigError

        raise ConfigError(
            f"--head-steps / --head-solver apply to CALM models only, not {model.config.kind!r}"
        )
    model.set_head_sampling(steps=steps, solver=solver)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm",
        description="Continuous Autoregressive Language Models: train, evaluate, compare and run CALM "
        "(Shao et al., 2025) against a token-level Transformer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<17} {help_}" for name, (_, _, help_) in COMMANDS.items())
        + "\n\nRun `calm COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS)
    )
    return parser


def build_command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of one subcommand and its run function."""
    module_name, stem, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"calm {name}", description=help_, formatter_class=HelpFormatter)
    getattr(module, f"add_{stem}_arguments")(parser)
    return parser, getattr(module, f"run_{stem}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        sys.exit(0)
    if argv[0] == "--version":
        from calm import __version__

        print(__version__)
        sys.exit(0)
    if argv[0] not in COMMANDS:
        top.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    parser, run = build_command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    try:
        apply_threads(args)
        code = run(args)
    except KeyboardInterrupt as err:
        # calm.train.TrainingInterrupted has already said where its checkpoint is and carries the
        # exit code of its signal (130 SIGINT, 143 SIGTERM); a bare Ctrl-C elsewhere is 130.
        code = getattr(err, "exit_code", 130)
        if not hasattr(err, "exit_code"):
            print("interrupted", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as err:
        # Our own errors (DataError, ConfigError, CheckpointError, ...) derive from these and carry a
        # message meant for the user: show it without a traceback. CALM_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("CALM_DEBUG"):
            raise
        print(f"calm {argv[0]}: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
