"""`calm quickstart`: the command line of `calm.quickstart` (the whole pipeline, with a report).

Importing this module needs no torch (`calm quickstart --help` stays fast); `run_quickstart`
imports the pipeline when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from calm.cli import add_threads_argument


def add_quickstart_arguments(parser) -> None:
    """Options of `calm quickstart`."""
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="training text/JSONL files or directories (default: the embedded corpus)",
    )
    parser.add_argument(
        "--val", nargs="+", metavar="PATH", help="held-out files (default with --data: 5%% of the documents)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: runs/quickstart, or runs/quickstart-tiny with --tiny)",
    )
    parser.add_argument("--tiny", action="store_true", help="a much smaller setting (~20 s on an idle 2-core CPU; scores near 0)")
    parser.add_argument("--device", default="auto", help="auto (GPU if available, else CPU), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    add_threads_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def run_quickstart(args) -> int:
    from calm.quickstart import jsonable, run_pipeline

    summary = run_pipeline(
        args.out or ("runs/quickstart-tiny" if args.tiny else "runs/quickstart"),
        data=args.data,
        val=args.val,
        tiny=args.tiny,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(jsonable(summary)))
    else:
        sc = summary["scores"]
        print(
            f"BrierLM (context {sc['calm']['block_size']} tokens): CALM {sc['calm']['brier_lm']:.2f}, "
            f"Transformer {sc['ar']['brier_lm']:.2f}"
        )
        print(f"report: {Path(summary['out']) / 'report' / 'report.md'}")
    return 0
