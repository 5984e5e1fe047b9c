"""What verifying a checkpoint on load costs: SHA-256 of the weights and the NaN/inf check.

Builds a token-baseline model of about 1 GB of fp32 weights (d 1024, 18 layers, ffn 2816,
vocabulary 8192, untied: ~248M parameters), saves it with `calm.checkpoint.save_checkpoint`
into a scratch folder (removed at the end unless ``--keep``), then measures, side by side in
this one process:

- hash throughput of the 1 GB ``model.safetensors`` with hashlib's sha256 and blake2b (and
  xxhash's xxh3_128 when that package is installed), file read from the page cache;
- the parts of a verified load: the SHA-256 of the weights and the finite check
  (`calm.checkpoint._nonfinite_tensors`: one aminmax pass per tensor);
  (hashing on a second thread while safetensors reads the file was tried and measured slower
  on the shared 2-core machine, 7.26 s against 6.86 s median of 4 alternated loads, so the hash
  runs before the read);
- ``load_model(verify=True)`` against ``load_model(verify=False)``, alternated ``--reps``
  times, with the weights file in the page cache ("warm") and after evicting it with
  ``posix_fadvise(DONTNEED)`` ("evicted"; on a virtual disk the host may still cache it).

Usage::

    python benchmarks/bench_verify.py [--scratch /tmp] [--reps 3] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from calm.checkpoint import WEIGHTS_FILE, _nonfinite_tensors, load_model, save_checkpoint
from calm.config import ARConfig
from calm.filesystem import file_digest
from calm.models import build_model

CONFIG = ARConfig(d_model=1024, num_layers=18, num_heads=16, ffn_dim=2816, vocab_size=8192, max_seq_len=256)


def _evict(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _hash_speeds(file: Path) -> dict[str, float]:
    """Seconds to hash `file` with each algorithm (file already in the page cache)."""
    out = {}
    for name in ("sha256", "blake2b"):
        out[name] = _timed(lambda name=name: file_digest(file, name))
    try:
        import xxhash
    except ImportError:
        return out
    def xxh():
        h = xxhash.xxh3_128()
        with open(file, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()
    out["xxh3_128"] = _timed(xxh)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_verify_", dir=args.scratch))
    try:
        torch.manual_seed(0)
        t = time.perf_counter()
        model = build_model(CONFIG)
        build_s = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        path = root / "checkpoint"
        t = time.perf_counter()
        save_checkpoint(path, model)
        save_s = time.perf_counter() - t
        model = None  # free the 1 GB before loading copies
        weights = path / WEIGHTS_FILE
        size = weights.stat().st_size
        file_digest(weights)  # warm the page cache
        hashes = _hash_speeds(weights)
        sha_s = hashes["sha256"]

        state = dict(load_model(path, verify=False).state_dict())
        finite_s = []
        for _ in range(3):
            t = time.perf_counter()
            _nonfinite_tensors(state)
            finite_s.append(time.perf_counter() - t)
        finite_s, state = min(finite_s), None

        runs: dict[str, list[float]] = {"warm_verify": [], "warm_no_verify": [], "evicted_verify": [], "evicted_no_verify": []}
        for _ in range(args.reps):
            for verify in (True, False):
                key = "verify" if verify else "no_verify"
                runs[f"warm_{key}"].append(_timed(lambda verify=verify: load_model(path, verify=verify)))
                _evict(weights)
                runs[f"evicted_{key}"].append(_timed(lambda verify=verify: load_model(path, verify=verify)))
        med = {k: statistics.median(v) for k, v in runs.items()}
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "params": params,
            "weights_bytes": size,
            "build_model_s": build_s,
            "save_s": save_s,
            "hash_s": hashes,
            "hash_gb_per_s": {k: size / v / 1e9 for k, v in hashes.items()},
            "finite_check_s": finite_s,
            "load_s_median": med,
            "load_s_all": runs,
            "verify_share_warm": (med["warm_verify"] - med["warm_no_verify"]) / med["warm_verify"],
            "verify_share_evicted": (med["evicted_verify"] - med["evicted_no_verify"]) / med["evicted_verify"],
            "sha256_share_of_save": sha_s / save_s,
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    gb = result["weights_bytes"] / 1e9
    print(f"checkpoint: {result['params'] / 1e6:.0f}M parameters, model.safetensors {gb:.2f} GB")
    print(f"machine: {result['machine']}, {result['cpus']} CPUs, torch threads {result['torch_threads']}")
    for name, s in result["hash_s"].items():
        print(f"  hash {name:<9} {s:6.2f} s  ({result['hash_gb_per_s'][name]:.2f} GB/s)")
    print(f"  finite check  {finite_s:6.2f} s")
    for cache in ("warm", "evicted"):
        v, n = med[f"{cache}_verify"], med[f"{cache}_no_verify"]
        share = result[f"verify_share_{cache}"]
        print(
            f"  load ({cache:<7}) verify {v:6.2f} s, --no-verify {n:6.2f} s: verification {v - n:5.2f} s "
            f"= {100 * share:.0f}% of the verified load"
        )
    print(f"  save {save_s:.2f} s, of which SHA-256 {sha_s:.2f} s ({100 * sha_s / save_s:.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
