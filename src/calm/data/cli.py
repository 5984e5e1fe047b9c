"""The `calm prepare` command line: options, run, summary."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from typing import Any

from calm.data.encode import default_workers
from calm.data.errors import DataWarning
from calm.data.preparation import prepare
from calm.data.shards import DEFAULT_SHARD_BYTES
from calm.data.text import BINARY_THRESHOLD, DOC_SPLITS, SNIFF_BYTES

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``512M``, ``1G``, ``1GiB``, ``64k`` (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 512M, 1073741824)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return n


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `calm prepare`."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="training text: .txt, .jsonl/.json (one JSON object per line), either compressed as .gz or "
        ".zst (e.g. the Pile's *.jsonl.zst), .parquet, .arrow, Hugging Face datasets directories "
        "(save_to_disk), or directories searched recursively for all of those (sorted order); "
        "Parquet/Arrow/.zst need `pip install 'calm[data]'`",
    )
    parser.add_argument(
        "--out", required=True, help="output directory for the token shards, meta.json and tokenizer"
    )
    parser.add_argument(
        "--val",
        nargs="+",
        default=None,
        metavar="INPUT",
        help="explicit validation inputs (then --val-fraction is not used); a DatasetDict directory "
        "gives its validation split",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of training documents set aside for validation when --val is not given "
        "(every 1/f-th whole document; deterministic)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.json, or a directory holding one, to use instead of training a BPE "
        "(e.g. Llama-3's; a pad and a mask token are added if missing)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size of the byte-level BPE to train"
    )
    parser.add_argument(
        "--tokenizer-train-bytes",
        type=int,
        default=None,
        metavar="N",
        help="train the BPE on at most about N characters of training documents (None: all of them)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="JSONL field / Parquet, Arrow or datasets column holding the text",
    )
    parser.add_argument(
        "--doc-split",
        choices=DOC_SPLITS,
        default="auto",
        help="how plain text files split into documents: blank = blank lines separate documents, "
        "file = one document per file, wikitext = WikiText top-level ' = Title = ' lines start articles, "
        "auto = wikitext for files that look like WikiText, else blank",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="stop reading training inputs once the training split holds N tokens (whole documents)",
    )
    parser.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="BYTES",
        help="largest token shard file (e.g. 1G, 256M); each split is written as numbered shards",
    )
    parser.add_argument(
        "--allow-binary",
        action="store_true",
        help=f"read text files that look binary: by default a file whose first {SNIFF_BYTES // 1024} KiB "
        f"are more than {round(100 * BINARY_THRESHOLD)}%% NUL bytes or invalid UTF-8 is refused",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="tokenization workers: N >= 1 = N single-threaded worker processes (default: cores - 1, "
        "at most 8; measured fastest), 0 = the tokenizer's own Rust threads in this process",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (once the new one is done)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object on stdout (progress and messages go to stderr)",
    )


def run_prepare(args: argparse.Namespace) -> int:
    """`calm prepare`: returns the exit status (errors raise DataError with a readable message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        summary = prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_inputs=args.val,
            val_fraction=args.val_fraction,
            workers=args.workers,
            text_field=args.text_field,
            doc_split=args.doc_split,
            tokenizer_train_bytes=args.tokenizer_train_bytes,
            max_tokens=getattr(args, "max_tokens", None),
            shard_bytes=getattr(args, "shard_size", DEFAULT_SHARD_BYTES),
            allow_binary=getattr(args, "allow_binary", False),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    summary["warnings"] = messages
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary `calm prepare` prints at the end."""
    tr, va = summary["splits"]["train"], summary["splits"]["val"]

    def shards(s):
        n = s.get("shards", 1)
        return f" in {n} shard{'s' if n != 1 else ''}"

    lines = [
        f"prepared {summary['out_dir']}",
        f"  files     {summary['files']} ({summary['bytes_read'] / 1e6:.2f} MB read; "
        f"{summary['skipped']['empty_files']} empty skipped, "
        f"{summary['invalid_utf8_replacements']} invalid UTF-8 replaced)",
        f"  train     {tr['documents']:,} documents, {tr['tokens']:,} tokens{shards(tr)}"
        + (" (stopped at --max-tokens)" if summary.get("stopped_at_max_tokens") else ""),
        f"  val       {va['documents']:,} documents, {va['tokens']:,} tokens{shards(va)}",
        f"  tokenizer vocab {summary['vocab_size']:,} ({'trained' if summary['tokenizer_trained'] else 'loaded'}); "
        f"eot={summary['eot_id']} pad={summary['pad_id']} mask={summary['mask_id']}; dtype {summary['dtype']}",
        f"  time      {summary['seconds']:.2f} s ({summary['mb_per_s']:.2f} MB/s overall; "
        f"tokenizer {summary['tokenizer_seconds']:.2f} s, tokenize {summary['tokenize_mb_per_s']:.2f} MB/s, "
        f"{summary.get('tokens_per_s', 0):,.0f} tokens/s)",
    ]
    return "\n".join(lines)
