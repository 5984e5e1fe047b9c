"""Benchmark `calm prepare` at scale: a Pile-like ``.jsonl.zst`` corpus, 1 and 2 workers, against
`tokenizers` alone on the same text in the same run.

1. **Corpus** (built here, deleted at the end unless ``--keep``): the shared corpora's paragraphs
   (blank-line documents of WikiText-2 train + valid, Tiny Shakespeare, Grimm) as Pile-style JSONL
   lines ``{"text": ..., "meta": {"pile_set_name": ...}}``, repeated in a fresh shuffled order each
   pass until ``--gb`` GB of JSONL, written through a Zstandard stream (level 3) as
   ``corpus.jsonl.zst``; a ``--sample-mb`` MB prefix of the same lines is written as ``sample.jsonl.zst``.
2. **Tokenizer**: the project's byte-level BPE (``--vocab-size``, default 8,192) trained on
   WikiText-2 valid, saved once; every configuration uses it.
3. **tokenizers alone** on the sample: its documents are decoded and held in memory first (not
   timed), then ``Tokenizer.encode_batch_fast`` over batches of ~512K characters (the batch size
   `calm prepare` uses) with ``RAYON_NUM_THREADS`` = 1 and 2, each in a fresh process. This is the
   ceiling: the same tokenizer, the same text, the same number of cores, no reading or writing.
4. **calm prepare** on the sample with ``--workers 1`` and ``--workers 2`` (side by side with 3.),
   and on the whole corpus with 1 and 2 workers (``--shard-size`` default 1 GiB): wall time,
   MB/s of JSONL text, tokens/s, peak memory, shard sizes.

The ratio `calm prepare` / `tokenizers` alone is reported twice: tokens per wall-clock second,
and tokens per CPU-second (``calm prepare``: user + system time of the whole command and its
workers, from ``wait4``; ``tokenizers``: ``time.process_time`` around the timed encoding), which
holds steady on a shared machine where wall time depends on the other jobs. Both count the same
tokens (``calm prepare``'s end-of-text ids excluded).

Peak memory is the largest *sum* of the resident set sizes of the `calm prepare` process and its
worker processes, sampled from /proc every 0.1 s (plus ``ru_maxrss`` of the largest single
process). Every command runs under ``nice -n 19`` (the machine is shared); the 1-minute load
average before each is recorded.

Usage::

    python benchmarks/bench_prepare_scale.py [--gb 2] [--sample-mb 200] [--out /tmp/bench_prepare_scale]
    python benchmarks/bench_prepare_scale.py --skip-sample --workers 2 --shard-size 256M  # sharding
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SOURCES = {
    "Wikipedia (en)": ["wikitext2/train.txt", "wikitext2/valid.txt"],
    "Shakespeare": ["tinyshakespeare/input.txt"],
    "Gutenberg (PG-19)": ["grimm/tales.txt"],
}
NICE = ["nice", "-n", "19"]

TOKENIZERS_ALONE = r"""
import json, sys, time, io
import zstandard
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = []
with open(sys.argv[2], "rb") as f:
    for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
        texts.append(json.loads(line)["text"])
nbytes = sum(len(t.encode()) for t in texts)
batches, cur, size = [], [], 0
for t in texts:
    cur.append(t); size += len(t)
    if size >= 1 << 19:
        batches.append(cur); cur, size = [], 0
if cur:
    batches.append(cur)
t0, c0 = time.perf_counter(), time.process_time(); n = 0
for b in batches:
    n += sum(len(e.ids) for e in tok.encode_batch_fast(b, add_special_tokens=False))
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "text_bytes": nbytes, "tokens": n, "documents": len(texts)}))
"""


def paragraphs(data: Path) -> list[tuple[str, str]]:
    sys.path.insert(0, str(REPO / "src"))
    from calm.data import read_documents

    docs = []
    for name, files in SOURCES.items():
        for rel in files:
            docs += [(d, name) for d in read_documents(data / rel, doc_split="blank")]
    return docs


def build_corpus(data: Path, out: Path, gb: float, sample_mb: float, seed: int) -> dict:
    import zstandard

    docs = paragraphs(data)
    lines = [
        json.dumps({"text": d, "meta": {"pile_set_name": s}}, ensure_ascii=False).encode() + b"\n"
        for d, s in docs
    ]
    rng = random.Random(seed)
    target, sample_target = int(gb * 1e9), int(sample_mb * 1e6)
    written = sample_written = passes = 0
    cctx = zstandard.ZstdCompressor(level=3)
    with open(out / "corpus.jsonl.zst", "wb") as fc, open(out / "sample.jsonl.zst", "wb") as fs:
        wc, ws = cctx.stream_writer(fc), zstandard.ZstdCompressor(level=3).stream_writer(fs)
        while written < target:
            order = list(range(len(lines)))
            rng.shuffle(order)
            passes += 1
            buf = io.BytesIO()
            for i in order:
                buf.write(lines[i])
                if sample_written < sample_target:
                    ws.write(lines[i])
                    sample_written += len(lines[i])
                if buf.tell() >= 1 << 24:
                    written += buf.tell()
                    wc.write(buf.getvalue())
                    buf = io.BytesIO()
                if written + buf.tell() >= target:
                    break
            written += buf.tell()
            wc.write(buf.getvalue())
        wc.flush(zstandard.FLUSH_FRAME)
        ws.flush(zstandard.FLUSH_FRAME)
    return {
        "documents_distinct": len(lines),
        "passes": passes,
        "jsonl_bytes": written,
        "zst_bytes": (out / "corpus.jsonl.zst").stat().st_size,
        "sample_jsonl_bytes": sample_written,
        "sample_zst_bytes": (out / "sample.jsonl.zst").stat().st_size,
    }


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and all its descendants (parents from ``/proc/N/stat``)."""
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page_kib
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def run_measured(cmd: list[str], env: dict | None = None, scratch: Path | None = None) -> dict:
    """Run ``cmd``: wall time, CPU seconds of its whole process tree (``wait4``), peak tree RSS."""
    load = os.getloadavg()[0]
    scratch = scratch or Path("/tmp")
    out_path, err_path = scratch / "stdout.txt", scratch / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss_kib(proc.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}\n{err_path.read_text()[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_tree_rss_mib": peak / 1024,
        "max_single_rss_mib": usage.ru_maxrss / 1024,
        "load_avg_1min_before": load,
        "stdout": out_path.read_text(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared corpora folder")
    parser.add_argument(
        "--out", default="/tmp/bench_prepare_scale", help="scratch folder (deleted unless --keep)"
    )
    parser.add_argument("--gb", type=float, default=2.0, help="corpus size in GB of JSONL text (10^9 bytes)")
    parser.add_argument("--sample-mb", type=float, default=200.0, help="sample for the side-by-side ratio")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--skip-full", action="store_true", help="only the sample (no run on the whole corpus)"
    )
    parser.add_argument(
        "--skip-sample", action="store_true", help="only the whole corpus (no side-by-side ratio)"
    )
    parser.add_argument("--shard-size", default="1G", help="--shard-size of the runs on the whole corpus")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    parser.add_argument("--results", default=str(REPO / "bench_out" / "prepare_scale.json"))
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    workers = [int(w) for w in args.workers.split(",")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result: dict = {
        "benchmark": "calm prepare at scale (.jsonl.zst)",
        "reproduce": shlex.join([sys.executable, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    try:
        t0 = time.perf_counter()
        result["corpus"] = build_corpus(data, out, args.gb, args.sample_mb, seed=0)
        result["corpus"]["build_s"] = time.perf_counter() - t0
        print(f"corpus: {result['corpus']}", file=sys.stderr)
        sys.path.insert(0, str(REPO / "src"))
        from calm.data import read_documents
        from calm.tokenizer import Tokenizer

        tok = Tokenizer.train_bpe(read_documents(data / "wikitext2" / "valid.txt"), args.vocab_size)
        tok.save(out / "tok")
        calm = [*NICE, sys.executable, "-m", "calm", "prepare"]
        rows = []

        def prepare_row(name, corpus, w, extra=()):
            cmd = [
                *calm,
                str(out / corpus),
                "--out",
                str(out / f"out_{name}"),
                "--tokenizer",
                str(out / "tok"),
            ]
            cmd += ["--workers", str(w), "--val-fraction", "0.001", "--json", "--no-progress", *extra]
            r = run_measured(cmd, env, out)
            s = json.loads(r["stdout"])
            meta = json.loads((out / f"out_{name}" / "meta.json").read_text())
            tokens = s["splits"]["train"]["tokens"] + s["splits"]["val"]["tokens"]
            docs = s["splits"]["train"]["documents"] + s["splits"]["val"]["documents"]
            itemsize = 2 if meta["dtype"] == "uint16" else 4
            row = {
                "config": name,
                "command": shlex.join(cmd),
                "workers": w,
                "text_mb": s["bytes_read"] / 1e6,
                "tokens": tokens,
                "wall_s": round(r["wall_s"], 2),
                "tokenize_s": s["tokenize_seconds"],
                "mb_per_s": round(s["bytes_read"] / 1e6 / s["tokenize_seconds"], 3),
                "tokens_per_s": round(tokens / s["tokenize_seconds"]),
                # the same tokens tokenizers alone counts (no end-of-text ids), per CPU-second of the
                # whole command (start-up, reading, decompression, JSON, workers, writing)
                "text_tokens_per_cpu_s": round((tokens - docs) / r["cpu_s"]),
                "text_tokens_per_s": round((tokens - docs) / s["tokenize_seconds"]),
                "mb_per_s_wall": round(s["bytes_read"] / 1e6 / r["wall_s"], 3),
                "cpu_s": round(r["cpu_s"], 2),
                "mb_per_cpu_s": round(s["bytes_read"] / 1e6 / r["cpu_s"], 3),
                "peak_tree_rss_mib": round(r["peak_tree_rss_mib"], 1),
                "max_single_rss_mib": round(r["max_single_rss_mib"], 1),
                "shards_mib": {
                    sp: [round(x["tokens"] * itemsize / 2**20, 1) for x in meta["splits"][sp]["shards"]]
                    for sp in ("train", "val")
                },
                "load_avg_1min_before": r["load_avg_1min_before"],
            }
            shutil.rmtree(out / f"out_{name}")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            return row

        def alone_row(threads):
            cmd = [
                *NICE,
                sys.executable,
                "-c",
                TOKENIZERS_ALONE,
                str(out / "tok" / "tokenizer.json"),
                str(out / "sample.jsonl.zst"),
            ]
            r = run_measured(
                cmd, {**env, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
            )
            s = json.loads(r["stdout"])
            row = {
                "config": f"tokenizers alone, {threads} thread(s)",
                "workers": threads,
                "text_mb": s["text_bytes"] / 1e6,
                "tokens": s["tokens"],
                "seconds": round(s["seconds"], 2),
                "mb_per_s": round(s["text_bytes"] / 1e6 / s["seconds"], 3),
                "tokens_per_s": round(s["tokens"] / s["seconds"]),
                "encode_cpu_s": round(s["cpu_seconds"], 2),
                "text_tokens_per_cpu_s": round(s["tokens"] / s["cpu_seconds"]),
                "process_cpu_s": round(r["cpu_s"], 2),
                "load_avg_1min_before": r["load_avg_1min_before"],
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            return row

        ratios = {}
        for w in (
            [] if args.skip_sample else workers
        ):  # side by side on the sample: ceiling, then calm prepare
            a = alone_row(w)
            p = prepare_row(f"sample-w{w}", "sample.jsonl.zst", w)
            ratios[f"{w}_wall"] = round(p["text_tokens_per_s"] / a["tokens_per_s"], 3)
            ratios[f"{w}_cpu"] = round(p["text_tokens_per_cpu_s"] / a["text_tokens_per_cpu_s"], 3)
        result["ratio_prepare_to_tokenizers_alone"] = ratios
        if not args.skip_full:
            for w in workers:
                prepare_row(f"corpus-w{w}", "corpus.jsonl.zst", w, ["--shard-size", args.shard_size])
        result["rows"] = rows
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
