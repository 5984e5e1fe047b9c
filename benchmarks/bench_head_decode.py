"""CALM's head + decoder + argmax for one step, alone: the fused kernel vs torch.compile vs eager.

The part of a T = 1 decoding step after the backbone: the energy head turns h [B, d] and one
noise vector per row into a latent, the autoencoder decodes it to K tokens (float32 argmax over
the vocabulary). Variants, timed interleaved (kernel, compiled, eager, then again) so that
machine noise hits all alike; the median of ``--reps`` rounds of ``--calls`` calls each:

  kernel     `calm.fused_decode` (the native extension, `kernel_for(head, autoencoder)`)
  compiled   ``torch.compile(fullgraph=True)`` of ``autoencoder.decode(head(h, noise))``
             (``--compile-mode``: default, max-autotune-no-cudagraphs, ...)
  eager      the same two modules without compilation

Each variant's chunks are compared with eager's first (equal up to float32 near-ties). Reports ms per call, process CPU ms
per call, and the kernel's speed-up. With ``--calm CKPT`` a trained checkpoint, else the CPU
presets with random weights (d 256, vocab 8192).

Usage::

    python benchmarks/bench_head_decode.py [--calm RUN/checkpoint] [--batch 1] [--reps 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from calm import fused_decode
from calm.config import preset
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM


def _model(path: str | None) -> CALM:
    if path:
        from calm.checkpoint import load_model

        return load_model(path).eval()
    torch.manual_seed(0)
    model = CALM.from_autoencoder(preset("calm-cpu"), ChunkAutoencoder(preset("ae-cpu")))
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=0.02)
    return model.eval()


def _time(fn, h, noise, calls: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) per call."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn(h, noise)
    return (time.perf_counter() - w0) / calls * 1e3, (time.process_time() - c0) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calm", default=None, help="trained CALM checkpoint (default: random CPU presets)")
    parser.add_argument("--batch", type=int, default=1, help="rows (positions) per call, one sample each")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _model(args.calm)
    head, ae = model.head, model.autoencoder
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.batch, model.config.d_model, generator=g)
    noise = torch.rand(args.batch, 1, head.noise_dim, generator=g) - 0.5

    def eager(h, noise):
        return ae.decode(head(h, noise))

    mode = None if args.compile_mode == "default" else args.compile_mode
    variants = {
        "kernel": fused_decode.kernel_for(head, ae),
        "compiled": torch.compile(eager, fullgraph=True, mode=mode),
        "eager": eager,
    }
    with torch.inference_mode():
        reference = eager(h, noise)
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn(h, noise)  # compiles the compiled variant
            for _ in range(10):
                fn(h, noise)
            same = (out == reference).all(-1).float().mean().item()
            print(
                f"{name}: first calls {time.perf_counter() - t0:.1f} s; chunks equal to eager's: {same:.0%}"
            )
        rounds = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, fn in variants.items():
                rounds[name].append(_time(fn, h, noise, args.calls))
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "model": args.calm or "calm-cpu + ae-cpu (random)",
        "batch": args.batch,
        "ms_per_call": {n: statistics.median(w for w, _ in r) for n, r in rounds.items()},
        "cpu_ms_per_call": {n: statistics.median(c for _, c in r) for n, r in rounds.items()},
        "ms_range": {n: [min(w for w, _ in r), max(w for w, _ in r)] for n, r in rounds.items()},
    }
    k = result["ms_per_call"]["kernel"]
    print(f"{result['machine']}; {result['model']}; batch {args.batch}, one sample per row")
    print("| variant | ms/call (median) | range | CPU ms/call | ÷ kernel |")
    print("|---|---:|---:|---:|---:|")
    for n in variants:
        lo, hi = result["ms_range"][n]
        ms, cpu = result["ms_per_call"][n], result["cpu_ms_per_call"][n]
        print(f"| {n} | {ms:.3f} | {lo:.3f}–{hi:.3f} | {cpu:.3f} | {ms / k:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
