"""`calm eval`: the command line of `calm.evaluate` (BrierLM, cross-entropy, reconstruction).

Importing this module needs no torch (`calm eval --help` stays fast); `run_eval` imports the
evaluation when it runs. The constants below are `calm.evaluate`'s and `calm.brier`'s
(tests/test_cli_help.py checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from calm.cli import (
    add_head_sampling_arguments,
    add_no_verify_argument,
    add_official_ae_argument,
    add_threads_argument,
    apply_head_sampling,
)

DEFAULT_BLOCK_SIZE = 256  # = calm.evaluate.DEFAULT_BLOCK_SIZE
DEFAULT_BATCH_SIZE = 8  # = calm.evaluate.DEFAULT_BATCH_SIZE
COLLISION_ESTIMATORS = ("pair", "expected")  # = calm.brier.COLLISION_ESTIMATORS


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `calm eval`."""
    parser.add_argument(
        "model",
        metavar="MODEL_DIR",
        help="checkpoint directory (CALM, token baseline or autoencoder; ours or the authors' layout), "
        "or a Hugging Face repo id in the local cache (e.g. cccczshao/CALM-M)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="a prepared data directory (calm prepare; see --split), or text / JSONL files or "
        "directories, tokenized with the model's tokenizer (documents joined with end-of-text)",
    )
    parser.add_argument(
        "--split", choices=("val", "train"), default="val", help="split of a prepared data directory"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="evaluate at most N tokens (whole windows); none = all",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluation window in tokens, the same for CALM and the baseline: each window is "
        f"scored on its own, so it bounds the context (default: {DEFAULT_BLOCK_SIZE}, or the model's "
        "context if that is shorter; compare models at the same value)",
    )
    add_official_ae_argument(parser)
    add_no_verify_argument(parser)
    add_head_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples the estimators draw")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help="windows per forward pass (lower it if memory is short)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ..."
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--ar-stride",
        type=int,
        default=1,
        metavar="N",
        help="token baseline: score only positions that are multiples of N (N = K gives exactly "
        "CALM's chunk-aligned positions); 1 = every position",
    )
    parser.add_argument(
        "--collision",
        choices=COLLISION_ESTIMATORS,
        default="pair",
        help="token baseline collision-term estimator: pair = two sampled prefixes agree x exact "
        "sum p^2 (DESIGN); expected = P(sampled prefix) x exact sum p^2 (Rao-Blackwellised, "
        "lower variance, same cost)",
    )
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the BrierLM interval")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    parser.add_argument(
        "--doc-split",
        choices=("auto", "blank", "file", "wikitext"),
        default="auto",
        help="how plain text files split into documents (as in calm prepare)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (the progress bar goes to stderr)",
    )


def run_eval(args: argparse.Namespace) -> int:
    """`calm eval`: returns the exit status (bad input raises ValueError with a readable message)."""
    from calm.checkpoint import load_model
    from calm.distributed import resolve_device
    from calm.evaluate import (
        check_block_size,
        evaluate_model,
        format_result,
        load_eval_tokens,
        model_context_tokens,
    )

    # A directory or a Hub repo id in the local cache: load_model judges (and resolves) it; it
    # also follows a save's .old-* copy.
    path = Path(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for p in args.data:
        if not Path(p).exists():
            from calm.data import DataError

            raise DataError(f"evaluation data not found: {p}")
    device = resolve_device(args.device)
    model = load_model(path, device=device, ae_path=args.ae, verify=not args.no_verify)
    apply_head_sampling(model, args)
    kind = model.config.kind
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if kind in ("calm", "ar"):
        if args.block_size is None:  # the default follows the model's context
            args.block_size = min(DEFAULT_BLOCK_SIZE, model_context_tokens(model))
            print(f"block size {args.block_size} tokens (--block-size to change it)", file=sys.stderr)
        check_block_size(model, args.block_size)  # before reading any data
    tokenizer = getattr(model, "tokenizer", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, desc = load_eval_tokens(
            args.data,
            tokenizer,
            split=args.split,
            max_tokens=args.max_tokens,
            text_field=args.text_field,
            doc_split=args.doc_split,
        )
    notes = [str(w.message) for w in caught]
    for msg in notes:
        print(f"warning: {msg}", file=sys.stderr)
    progress = not args.no_progress
    if kind == "autoencoder":
        from calm.eval_autoencoder import format_reconstruction, reconstruction_report

        result = {
            "kind": "autoencoder",
            **reconstruction_report(model, tokens, seed=args.seed, progress=progress),
        }
    else:
        result = evaluate_model(
            model,
            tokens,
            block_size=args.block_size,
            seed=args.seed,
            batch_size=args.batch_size,
            ar_stride=args.ar_stride,
            collision=args.collision,
            level=args.level,
            progress=progress,
        )
    result = {"model": str(path), **result, "data": desc, "device": str(device), "warnings": notes}
    if args.json:
        print(json.dumps(result))
    elif kind == "autoencoder":
        print(f"autoencoder {path} on {desc['source']}")
        print(format_reconstruction(result))
    else:
        print(format_result(result))
    return 0
