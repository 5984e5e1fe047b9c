"""What a training run writes for people and tools: the metrics log ``out_dir/metrics.jsonl``
(one JSON object per line, train and val records in order; non-finite floats as null) and
messages on stderr above the progress bar.

Torch-free, so readers of a run's metrics (`calm.report`) need not import the training loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _json_value(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically replace the metrics log with `records` (empty for a fresh run)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` (train and val lines, in order)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
