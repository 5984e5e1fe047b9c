"""`calm export`: the command line of `calm.sharded_checkpoint.export_checkpoint`.

Importing this module needs no torch (`calm export --help` stays fast).
"""

from __future__ import annotations

import argparse
import json


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write an inference checkpoint (config.json + model.safetensors + tokenizer) from a training "
        "checkpoint: a sharded (FSDP2/DCP) one is consolidated on this one process, an ordinary one "
        "is copied without its training state. The result loads with calm.load, calm eval, calm generate."
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="e.g. RUN_DIR/checkpoint")
    parser.add_argument("out", metavar="OUT_DIR", help="the new checkpoint directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks of the source files")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run_export(args: argparse.Namespace) -> int:
    from calm.sharded_checkpoint import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, verify=not args.no_verify)
    if args.json:
        print(json.dumps(summary))
    else:
        what = "sharded checkpoint" if summary["sharded"] else "checkpoint"
        print(
            f"exported the {summary['kind']} model of {what} {summary['source']} ({summary['params'] / 1e6:.2f}M "
            f"parameters) to {summary['out']} ({summary['bytes'] / 1e6:.1f} MB)"
        )
    return 0
