"""Training tokens/s with ``torch.compile`` ÷ eager, for CALM and the token baseline (CPU presets).

Each model (``calm-cpu`` on a frozen ``ae-cpu``-sized autoencoder, and ``transformer-cpu``) is
built twice from the same seed; one copy trains eagerly, the other through
``torch.compile(model.loss, fullgraph=True)`` (what ``calm train --compile`` does in one
process). A training step is the trainer's own (`calm.train_step.StepRunner`: forward, backward,
clipping, fused AdamW, on-device bookkeeping). After warm-up (the compiled copy's first steps
compile, timed separately), the four runners are timed in turns — eager CALM, compiled CALM,
eager AR, compiled AR, again and again — so machine noise hits all alike, and the median step
is reported in text tokens/s, with the process CPU time as the steadier measure on a shared
machine (``--threads 1`` makes it the work itself).

Usage::

    python benchmarks/bench_compile.py [--batch-size 8] [--block-size 256] [--steps 8]
        [--threads 1] [--out bench_out/]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from calm.config import TrainConfig, preset
from calm.models import build_model
from calm.train import _train_flops_per_token, build_optimizer
from calm.train_step import DeviceSchedule, StepRunner


def make_runner(model, compiled: bool, cfg: TrainConfig, device) -> StepRunner:
    model.to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    loss = torch.compile(model.loss, fullgraph=True) if compiled else model.loss
    params = [p for p in model.parameters() if p.requires_grad]
    return StepRunner(model, loss, optimizer, DeviceSchedule(optimizer, cfg, device), params, cfg, device,
                      contextlib.nullcontext())  # fmt: skip


def models(vocab: int, block: int) -> dict:
    ae = preset("ae-cpu").replace(vocab_size=vocab)
    calm_cfg = preset("calm-cpu").replace(
        vocab_size=vocab, latent_dim=ae.latent_dim, autoencoder=ae.to_dict(), max_seq_len=block // 4
    )
    return {"calm": calm_cfg, "ar": preset("transformer-cpu").replace(vocab_size=vocab, max_seq_len=block)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per window")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per runner (in turns)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner (compilation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = TrainConfig(batch_size=args.batch_size, block_size=args.block_size, warmup_steps=2)
    configs = models(8192, args.block_size)
    runners, compile_s = {}, {}
    for kind, config in configs.items():
        for compiled in (False, True):
            torch.manual_seed(0)
            runners[(kind, compiled)] = make_runner(build_model(config), compiled, cfg, device)
    tokens = torch.randint(0, 8192, (args.batch_size, args.block_size), generator=torch.Generator().manual_seed(0))
    command = shlex.join([sys.executable, "benchmarks/bench_compile.py", *sys.argv[1:]])
    meta = {
        "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "load_avg_1min_start": os.getloadavg()[0],
    }
    for key, runner in runners.items():  # warm-up; the first compiled step compiles
        t0 = time.perf_counter()
        for step in range(args.warmup):
            runner.run(step, tokens)
        compile_s[key] = time.perf_counter() - t0
        print(f"warm-up {key[0]:4s} {'compiled' if key[1] else 'eager':8s}: {compile_s[key]:.1f} s", flush=True)
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for step in range(args.warmup, args.warmup + args.steps):
        for key, runner in runners.items():
            w0, c0 = time.perf_counter(), time.process_time()
            runner.run(step, tokens)
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    meta["load_avg_1min_end"] = os.getloadavg()[0]
    n_tokens = args.batch_size * args.block_size
    results = {}
    for kind in configs:
        eager, comp = (kind, False), (kind, True)
        results[kind] = {
            "preset": "calm-cpu" if kind == "calm" else "transformer-cpu",
            "eager_tokens_per_s": n_tokens / statistics.median(wall[eager]),
            "compiled_tokens_per_s": n_tokens / statistics.median(wall[comp]),
            "ratio_wall": statistics.median(wall[eager]) / statistics.median(wall[comp]),
            "ratio_cpu": statistics.median(cpu[eager]) / statistics.median(cpu[comp]),
            "warmup_s_eager": compile_s[eager],
            "warmup_s_compiled": compile_s[comp],
            "train_flops_per_token": _train_flops_per_token(configs[kind], cfg),
        }
        r = results[kind]
        print(
            f"{r['preset']:16s} eager {r['eager_tokens_per_s']:8,.0f} tok/s  compiled {r['compiled_tokens_per_s']:8,.0f} "
            f"tok/s  compiled/eager wall {r['ratio_wall']:.2f}  cpu {r['ratio_cpu']:.2f}  "
            f"(first {args.warmup} compiled steps {r['warmup_s_compiled']:.0f} s)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"load average {meta['load_avg_1min_start']:.1f} -> {meta['load_avg_1min_end']:.1f}; wrote {out / 'compile.json'}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
