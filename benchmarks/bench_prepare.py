"""Benchmark `calm prepare` on the shared corpora: throughput (MB/s) and peak memory.

Each configuration runs `python -m calm prepare ... --json` in a fresh process, so its peak
resident memory is that process's own: ``ru_maxrss`` from ``os.wait4`` (the largest of the
process and its worker processes, in MiB). Configurations (the first three with the default
``--workers``, :func:`calm.data.default_workers`):

- ``all/bpe``: every corpus in the shared folder (wikitext2 train + valid, tinyshakespeare,
  grimm), 1% validation by documents, training the 8,192-entry byte-level BPE first;
- ``all/tok``: the same with the tokenizer from ``all/bpe`` (tokenization only);
- ``std/bpe``: the standard split, ``wikitext2/train.txt`` with ``--val wikitext2/valid.txt``;
- ``std/tok-wN``: the standard split with a pre-trained tokenizer and ``--workers N``
  (0 = the tokenizer's Rust threads in-process, N >= 1 = N processes), to pick the default.

MB/s is input bytes over the wall time of the whole command (start-up included); the
``prepare`` column is the same over the time reported by ``prepare`` itself. CPU s is the
command's user + system time (workers included): on a shared machine, where wall time depends
on what else runs (the 1-minute load average before each configuration is recorded), MB per
CPU-second is the steadier figure.

Usage::

    python benchmarks/bench_prepare.py [--data ../shared/data] [--out bench_out/prepare] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def run_prepare(cmd: list[str], scratch: Path) -> dict:
    """Run one `calm prepare --json` command; its wall time and its own ru_maxrss (from wait4)."""
    out_path, err_path = scratch / "stdout.txt", scratch / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's (and its workers') peak RSS
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{err_path.read_text()[-3000:]}")
    summary = json.loads(out_path.read_text())
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared corpora folder")
    parser.add_argument(
        "--out", default=str(REPO / "bench_out" / "prepare"), help="scratch and results folder"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the fastest is reported"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated --workers values to compare")
    parser.add_argument("--json", action="store_true", help="print the JSON results on stdout")
    args = parser.parse_args()

    data, out = Path(args.data), Path(args.out)
    wt = data / "wikitext2"
    all_inputs = [
        wt / "train.txt",
        wt / "valid.txt",
        data / "tinyshakespeare" / "input.txt",
        data / "grimm" / "tales.txt",
    ]
    for p in all_inputs:
        if not p.is_file():
            raise SystemExit(f"missing corpus file {p}")
    out.mkdir(parents=True, exist_ok=True)
    calm = [sys.executable, "-m", "calm", "prepare"]
    common = ["--json", "--no-progress", "--overwrite", "--vocab-size", str(args.vocab_size)]

    configs: list[tuple[str, list[str]]] = [
        ("all/bpe", [*map(str, all_inputs), "--out", str(out / "all_bpe")]),
        (
            "all/tok",
            [*map(str, all_inputs), "--out", str(out / "all_tok"), "--tokenizer", str(out / "all_bpe")],
        ),
        ("std/bpe", [str(wt / "train.txt"), "--val", str(wt / "valid.txt"), "--out", str(out / "std_bpe")]),
    ]
    for w in [int(x) for x in args.workers.split(",") if x.strip()]:
        configs.append(
            (
                f"std/tok-w{w}",
                [str(wt / "train.txt"), "--val", str(wt / "valid.txt"), "--out", str(out / f"std_tok_w{w}")]
                + ["--tokenizer", str(out / "std_bpe"), "--workers", str(w)],
            )
        )

    rows = []
    for name, extra in configs:
        cmd = calm + extra + common
        load = os.getloadavg()[0]
        runs = [run_prepare(cmd, out) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        s = best["summary"]
        rows.append(
            {
                "config": name,
                "command": shlex.join(cmd),
                "input_mb": s["bytes_read"] / 1e6,
                "files": s["files"],
                "train_tokens": s["splits"]["train"]["tokens"],
                "val_tokens": s["splits"]["val"]["tokens"],
                "train_docs": s["splits"]["train"]["documents"],
                "val_docs": s["splits"]["val"]["documents"],
                "workers": s["workers"],
                "bpe_s": s["tokenizer_seconds"] if s["tokenizer_trained"] else 0.0,
                "tokenize_s": s["tokenize_seconds"],
                "prepare_s": s["seconds"],
                "wall_s": round(best["wall_s"], 3),
                "cpu_s": round(best["cpu_s"], 3),
                "mb_per_cpu_s": round(s["bytes_read"] / 1e6 / best["cpu_s"], 3),
                "mb_per_s_wall": round(s["bytes_read"] / 1e6 / best["wall_s"], 3),
                "mb_per_s_prepare": s["mb_per_s"],
                "tokenize_mb_per_s": s["tokenize_mb_per_s"],
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
                "wall_s_all_runs": [round(r["wall_s"], 3) for r in runs],
                "cpu_s_all_runs": [round(r["cpu_s"], 3) for r in runs],
                "load_avg_1min_before": round(load, 2),
            }
        )
        print(f"{name}: {rows[-1]['wall_s']:.2f} s, {rows[-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    reproduce = shlex.join([sys.executable, *sys.argv])
    result = {
        "benchmark": "calm prepare",
        "reproduce": reproduce,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "vocab_size": args.vocab_size,
        "repeats": args.repeats,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| config | input MB | train / val tokens | workers | BPE s | tokenize s | wall s | CPU s | MB/s (wall) "
        "| MB/s (prepare) | tokenize MB/s | MB per CPU-s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['config']} | {r['input_mb']:.2f} | {r['train_tokens']:,} / {r['val_tokens']:,} | {r['workers']} "
            f"| {r['bpe_s']:.2f} | {r['tokenize_s']:.2f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
            f"| {r['mb_per_s_wall']:.2f} | {r['mb_per_s_prepare']:.2f} | {r['tokenize_mb_per_s']:.2f} "
            f"| {r['mb_per_cpu_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    markdown = "\n".join(table)
    (out / "results.md").write_text(markdown + f"\n\nReproduce: `{reproduce}`\n")
    for name in ("all_bpe", "all_tok", "std_bpe", *(f"std_tok_w{w}" for w in args.workers.split(","))):
        if name not in ("all_bpe", "std_bpe"):  # keep the tokenizers' data sets, drop the copies
            shutil.rmtree(out / name, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown)
    print(f"\nreproduce: {reproduce}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
