"""`calm convert-official`: the command line of `calm.official.convert_official`.

Importing this module needs no torch (`calm convert-official --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_convert_official_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert the CALM authors' released checkpoints (Hugging Face layout: config.json + "
        "pytorch_model*.bin or model*.safetensors) to this library's checkpoint format. "
        "`--calm DIR --ae DIR` converts a CALM model with its autoencoder; `--ae DIR` alone converts "
        "an autoencoder. calm.load(), calm eval and calm generate also read release directories directly."
    )
    parser.add_argument(
        "--calm", metavar="DIR", help="CALM model directory (e.g. a download of cccczshao/CALM-M)"
    )
    parser.add_argument(
        "--ae",
        metavar="DIR",
        help="autoencoder directory (cccczshao/CALM-Autoencoder); optional for --calm when the checkpoint "
        "holds its own ae_model. copy",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="directory (or file) with the Llama-3 tokenizer.json; default: the one in --calm or --ae",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--dtype",
        choices=("keep", "float32", "bfloat16", "float16"),
        default="keep",
        help="weight dtype of the converted checkpoint",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON summary on stdout (progress on stderr)"
    )


def run_convert_official(args: argparse.Namespace) -> int:
    import torch

    from calm.official import OfficialFormatError, convert_official

    if args.calm is None and args.ae is None:
        raise OfficialFormatError(
            "give --calm DIR (with --ae DIR unless it holds its autoencoder) or --ae DIR"
        )
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    stream = sys.stderr if args.json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=stream, flush=True)

    summary = convert_official(args.calm, args.ae, args.out, args.tokenizer, dtype=dtype, log=log)
    if args.json:
        print(json.dumps(summary))
    return 0
