"""Decoding throughput of CALM vs the token baseline on the same backbone, in new tokens/s.

Both models use `calm.generation.generate` with a KV cache, 32-token prompts, 256 new tokens
and no stop at end of text. Speed claims about low temperature need **trained** models (a
random head's P is flat, so no sampler can exploit it): pass ``--calm CKPT --ar CKPT`` (e.g.
the two runs of `bench_matched_compute.py` at its largest budget) and ``--data DIR`` (their
prepared data; prompts are the first tokens of validation windows). Without them, the
``--settings`` build random-weight models (the CALM head's zero-initialised last layer gets
random weights so that its samples differ). Modes:

  ar               the token-level baseline, T = 1 (its cost does not depend on T)
  ar_compiled      the same through `torch.compile`d steps (``generate(compile=True)``)
  calm_t1          CALM at T = 1: one head sample per step (on CPU at batch <= 8: head +
                   decoder + argmax in one native call, `calm.fused_decode`)
  calm_t1_torch    the same through the PyTorch modules (``fused_kernel=False``)
  calm_t1_compiled the same through `torch.compile`d steps (``compile=True``, no kernel): the
                   kernel's rival
  calm_t1_compiled_kernel  compiled backbone step + the fused kernel for head and decoder
  calm_t05_exact   T = 0.5, the exact sampler (the default; draws in doubling blocks until it
                   accepts, at most N = 200; rows at the bound get the approximation), draws told
                   apart position by position (`calm.decoding.DrawClasses`)
  calm_t05_exact_full  the same with every draw decoded in full (``lazy_draws=False``): before/after
  calm_t033_exact  T = 1/3, the exact sampler
  calm_t05_approx  T = 0.5, the batch approximation over N = 200 candidates

Runs are interleaved (ar, calm_t1, ..., then again) so that machine noise hits all modes alike;
the median of ``--reps`` runs is reported, with wall time and process CPU time. Each ratio
(CALM tokens/s ÷ AR tokens/s, the AR mode of the same compilation) is printed next to the
ratio `calm.flops` predicts. Per mode: head samples drawn and vocabulary rows scored (token
positions decoded) per generated chunk, and (with ``generate(profile=True)``) a table of where
a step's time goes.

Settings (random weights): ``cpu`` = the CPU presets (d 256, 4 layers, 4 heads, SwiGLU 688,
vocab 8192; autoencoder ae-cpu); ``4x`` = 16 layers, 4 head blocks.

Usage::

    python benchmarks/bench_decode.py --calm RUN_CALM/checkpoint --ar RUN_AR/checkpoint --data DATA \
        [--batches 1,16] [--reps 3] [--modes ...] [--threads 1] [--out bench_out]
    python benchmarks/bench_decode.py --settings cpu,4x [--batches 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from calm.config import ARConfig, CALMConfig, preset
from calm.flops import flops_report
from calm.flops_counts import autoencoder_counts, energy_head_counts
from calm.generation import generate
from calm.models.ar import TokenTransformer
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM

SETTINGS = {
    "cpu": dict(num_layers=4, head_layers=1, vocab_size=8192),
    "4x": dict(num_layers=16, head_layers=4, vocab_size=8192),
}
MODES = {
    "ar": dict(),
    "ar_compiled": dict(compile=True),
    "calm_t1": dict(temperature=1.0),
    "calm_t1_torch": dict(temperature=1.0, fused_kernel=False),
    "calm_t1_compiled": dict(temperature=1.0, compile=True, fused_kernel=False),
    "calm_t1_compiled_kernel": dict(temperature=1.0, compile=True),
    "calm_t05_exact": dict(temperature=0.5, sampler="exact", num_samples=200),
    "calm_t05_exact_full": dict(temperature=0.5, sampler="exact", num_samples=200, lazy_draws=False),
    "calm_t033_exact": dict(temperature=1 / 3, sampler="exact", num_samples=200),
    "calm_t05_approx": dict(temperature=0.5, sampler="approx", num_samples=200),
}


def build_models(name: str, seed: int = 0) -> tuple[CALM, TokenTransformer]:
    over = SETTINGS[name]
    ae_cfg = preset("ae-cpu").replace(vocab_size=over["vocab_size"])
    calm_cfg = preset("calm-cpu").replace(
        num_layers=over["num_layers"],
        head_layers=over["head_layers"],
        vocab_size=over["vocab_size"],
        autoencoder=ae_cfg.to_dict(),
    )
    ar_cfg = preset("transformer-cpu").replace(num_layers=over["num_layers"], vocab_size=over["vocab_size"])
    for field in ("d_model", "num_heads", "ffn_dim", "vocab_size", "num_layers"):
        assert getattr(calm_cfg, field) == getattr(ar_cfg, field), field
    torch.manual_seed(seed)
    calm = CALM.from_autoencoder(calm_cfg, ChunkAutoencoder(ae_cfg)).eval()
    last = calm.head.final_layer.linears[-1]
    torch.nn.init.normal_(last.weight, std=1.0 / last.in_features**0.5)
    ar = TokenTransformer(ar_cfg).eval()
    return calm, ar


def predicted(calm_cfg: CALMConfig, ar_cfg: ARConfig, context_tokens: int, samples: int) -> float:
    """AR ÷ CALM inference FLOPs per token (`calm.flops`), with `samples` decoded per CALM step."""
    K = calm_cfg.chunk_size
    ar = flops_report(ar_cfg, context=context_tokens)["inference_flops_per_token"]
    calm = flops_report(calm_cfg, context=-(-context_tokens // K), inference_samples=samples)
    return ar / calm["inference_flops_per_token"]


def draw_macs(calm: CALM) -> int | None:
    """Multiply-adds of one energy-head sample and of its decoding up to the first token's final
    hidden state (the vocabulary projection left out; `calm.flops_counts`): the least every draw
    of the temperature samplers costs. None for heads other than the energy head."""
    if calm.config.head != "energy":
        return None
    _, per_sample, h_only = energy_head_counts(calm.config)  # the h-only part is paid once per row
    return per_sample - h_only + autoencoder_counts(calm.autoencoder.config)["decoder_first_token_matmul"]


def matmul_gflops(rows: int, dim: int, dtype: torch.dtype, device: str) -> float:
    """This machine's best rate (of 20 runs) for a [rows, dim] x [dim, dim] matmul, GFLOP/s."""
    a = torch.randn(rows, dim, dtype=dtype, device=device)
    w = torch.randn(dim, dim, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(25):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ w
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * rows * dim * dim / best / 1e9


def timed_run(model, prompts, new_tokens: int, mode: str) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    out, stats = generate(
        model,
        prompts,
        max_new_tokens=new_tokens,
        seed=0,
        eos_id=None,
        return_stats=True,
        profile=True,  # on CPU a clock read per phase: ~1 µs of a 2 ms step
        **MODES[mode],
    )
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = sum(len(r) for r in out)
    assert n == len(prompts) * new_tokens
    phases = {k: 1e3 * v / stats.steps for k, v in stats.phases.items() if k != "prefill"}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": stats.steps,
        "new_tokens": n,
        "draws": stats.draws,
        "draws_per_row_step": stats.draws_per_row_step,
        "positions_per_row_step": stats.decoded_positions / max(1, stats.steps * len(prompts)),
        "exact_hit_limit": stats.exact_hit_limit,
        "phase_ms_per_step": phases,
    }


def measure(name: str, batch: int, args) -> dict:
    if args.calm:
        calm, ar = args.trained
        windows = args.prompt_windows
        prompts = windows[torch.arange(batch) % len(windows), : args.prompt_tokens].tolist()
    else:
        calm, ar = build_models(name)
        calm, ar = (m.to(args.device, getattr(torch, args.dtype)) for m in (calm, ar))
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, calm.config.vocab_size, (batch, args.prompt_tokens), generator=gen).tolist()
    models = {m: (ar if m.startswith("ar") else calm) for m in args.modes}
    for mode, model in models.items():  # warm-up: allocator, oneDNN kernels, bf16 weight copies
        generate(model, prompts, max_new_tokens=8, seed=0, eos_id=None, **MODES[mode])
    runs = {m: [] for m in models}
    for _ in range(args.reps):
        for mode, model in models.items():
            runs[mode].append(timed_run(model, prompts, args.new_tokens, mode))
    res = {"setting": name, "batch": batch, "modes": {}}
    for mode, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        n = rs[0]["new_tokens"]
        res["modes"][mode] = {
            "tokens_per_s": n / wall,
            "tokens_per_cpu_s": n / cpu,
            "step_ms": 1e3 * wall / rs[0]["steps"],
            "draws_per_row_step": rs[0]["draws_per_row_step"] if not mode.startswith("ar") else None,
            "positions_per_row_step": rs[0]["positions_per_row_step"] if not mode.startswith("ar") else None,
            "exact_hit_limit_per_row_step": rs[0]["exact_hit_limit"] / (rs[0]["steps"] * batch),
            "phase_ms_per_step": {
                k: statistics.median(r["phase_ms_per_step"].get(k, 0.0) for r in rs)
                for k in rs[0]["phase_ms_per_step"]
            },
            "runs": rs,
        }
    context = args.prompt_tokens + args.new_tokens // 2
    for mode, r in res["modes"].items():
        base = res["modes"].get("ar_compiled" if MODES[mode].get("compile") else "ar")
        if mode.startswith("ar") or base is None:
            continue
        samples = max(1, round(r["draws_per_row_step"]))
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ratio_cpu"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        r["predicted"] = predicted(calm.config, ar.config, context, samples)
    # Ceiling: the ratio if the mode's draws cost only their matmuls at this machine's measured
    # matmul rate, on top of the fastest CALM backbone step measured here (no Python, no
    # elementwise work, no vocabulary projection): an upper bound on what any implementation of
    # this sampler in this dtype could reach on this machine with these models.
    macs = draw_macs(calm)
    backbones = [m["phase_ms_per_step"].get("backbone") for k, m in res["modes"].items() if not k.startswith("ar")]
    backbones = [b for b in backbones if b]
    if macs and backbones and "ar" in res["modes"]:
        rate = matmul_gflops(200 * batch, calm.config.d_model, next(calm.parameters()).dtype, args.device)
        res["matmul_gflops"], res["draw_macs"] = rate, macs
        for mode, r in res["modes"].items():
            if mode.startswith("ar"):
                continue
            floor_ms = min(backbones) + 2e3 * batch * r["draws_per_row_step"] * macs / (rate * 1e9)
            tokens_per_s = batch * calm.config.chunk_size / (floor_ms / 1e3)
            r["ceiling"] = tokens_per_s / res["modes"]["ar"]["tokens_per_s"]
    res["configs"] = {"calm": calm.config.to_dict(), "ar": ar.config.to_dict()}
    return res


_PHASES = ("backbone", "sample", "head+decode", "decode+select", "select", "bookkeeping")


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Decoding throughput: CALM (K = {meta['chunk_size']}) vs token baseline, same backbone, KV cache",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}, {meta['dtype']} weights, "
        f"{meta['weights']}, {meta['prompt_tokens']}-token prompts, {meta['new_tokens']} new tokens per row, no "
        f"end-of-text stop, median of {meta['reps']} interleaved runs; 1-min load average "
        f"{meta['load_average_start']:.1f} -> {meta['load_average_end']:.1f} on {meta['cpus']} CPUs. Ratio = CALM ÷ AR new tokens per second; "
        "predicted = AR ÷ CALM inference FLOPs per token (`calm.flops`, mean context prompt + new/2; "
        "as many decoded samples per step as the mode drew on average). Head samples and vocabulary "
        "rows (token positions decoded) are per generated chunk and row; bound = share of row-steps "
        "where the exact sampler reached its 200 draws and used the approximation. Ceiling = the ratio "
        "if every head sample cost only its matmuls (energy head + decoder to the first token, no "
        "vocabulary projection) at this machine's best measured matmul rate, on top of the fastest "
        "CALM backbone step measured: an upper bound for any implementation of the mode here.",
        "",
        "| setting | batch | mode | tok/s | AR tok/s | ratio (wall) | ratio (CPU) | predicted | ceiling | head samples / chunk "
        "| vocab rows / chunk | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for mode, m in r["modes"].items():
            if mode.startswith("ar"):
                continue
            ar = r["modes"].get("ar_compiled" if MODES[mode].get("compile") else "ar")
            lines.append(
                f"| {r['setting']} | {r['batch']} | {mode} | {m['tokens_per_s']:,.0f} "
                f"| {ar['tokens_per_s'] if ar else float('nan'):,.0f} | {m.get('ratio', float('nan')):.2f} "
                f"| {m.get('ratio_cpu', float('nan')):.2f} | {m.get('predicted', float('nan')):.3g} "
                f"| {m.get('ceiling', float('nan')):.2f} | {m['draws_per_row_step']:.1f} | {m['positions_per_row_step']:.1f} "
                f"| {100 * m['exact_hit_limit_per_row_step']:.0f}% |"
            )
    for r in results:
        if "matmul_gflops" in r:
            lines.append(
                f"\nBatch {r['batch']}: {r['draw_macs']:,} multiply-adds per head sample; matmul rate "
                f"{r['matmul_gflops']:.0f} GFLOP/s ([{200 * r['batch']}, d] x [d, d])."
            )
    lines += [
        "",
        "Where a decoding step's time goes (ms per step, median over the runs; `generate(profile=True)`): "
        "backbone = one backbone step (CALM: with its chunk input), sample = AR vocabulary projection "
        "and sampling, head = energy-head samples, decode = autoencoder decoder and vocabulary argmax, "
        "head+decode = both (in one call: the native kernel or a compiled graph), decode+select = the "
        "T < 1 samplers' head samples, decoding and choice, bookkeeping = recording outputs:",
        "",
        "| setting | batch | mode | step ms | " + " | ".join(_PHASES) + " |",
        "|---|---|---|---|" + "---|" * len(_PHASES),
    ]
    for r in results:
        for mode, m in r["modes"].items():
            ph = m["phase_ms_per_step"]
            cells = " | ".join(f"{ph[k]:.2f}" if k in ph else "" for k in _PHASES)
            lines.append(f"| {r['setting']} | {r['batch']} | {mode} | {m['step_ms']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="cpu,4x", help=f"comma-separated of {list(SETTINGS)}")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {list(MODES)}")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per mode (interleaved)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="bench_out", help="output folder for JSON and markdown")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: compiled modes use CUDA graphs)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of both models' weights"
    )
    parser.add_argument("--calm", default=None, help="trained CALM checkpoint (with --ar and --data)")
    parser.add_argument("--ar", default=None, help="trained token-baseline checkpoint on the same backbone")
    parser.add_argument("--data", default=None, help="prepared data of the trained models (validation prompts)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.calm) != bool(args.ar) or bool(args.calm) != bool(args.data):
        parser.error("--calm, --ar and --data go together (trained models and their data)")
    if args.calm:
        from calm.checkpoint import CheckpointError, load_model
        from calm.train import PreparedData

        try:
            calm, ar = load_model(args.calm).eval(), load_model(args.ar).eval()
        except CheckpointError as err:
            parser.error(str(err))
        if (calm.config.kind, ar.config.kind) != ("calm", "ar"):
            parser.error(f"--calm holds a {calm.config.kind} model and --ar a {ar.config.kind} model")
        for field in ("d_model", "num_layers", "num_heads", "ffn_dim", "vocab_size"):
            if getattr(calm.config, field) != getattr(ar.config, field):
                parser.error(f"the two models differ in {field}; compare models on the same backbone")
        dtype = getattr(torch, args.dtype)
        args.trained = (calm.to(args.device, dtype), ar.to(args.device, dtype))
        args.prompt_windows = PreparedData(args.data).val_windows(args.prompt_tokens + 1, 64)
        args.settings = "trained"
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    bad = [s for s in names if s not in SETTINGS and not args.calm] + [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown setting(s)/mode(s) {bad}; settings {list(SETTINGS)}, modes {list(MODES)}")
    command = shlex.join([sys.executable, "benchmarks/bench_decode.py", *sys.argv[1:]])
    meta = {
        "command": command,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine()),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "load_average_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "weights": f"trained models {args.calm} and {args.ar}" if args.calm else "random initialisation",
        "chunk_size": args.trained[0].config.chunk_size if args.calm else 4,
    }
    results = []
    for name in names:
        for batch in batches:
            r = measure(name, batch, args)
            results.append(r)
            line = " ".join(
                f"{mode} {m['tokens_per_s']:,.0f} tok/s"
                + (f" (x{m['ratio']:.2f}, pred {m['predicted']:.3g})" if "ratio" in m else "")
                for mode, m in r["modes"].items()
            )
            print(f"{name} batch {batch}: {line}", flush=True)
    meta["load_average_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    (out / "decode.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / 'decode.json'} and {out / 'decode.md'}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
