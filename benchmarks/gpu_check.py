"""GPU check of the training path at paper shapes: tokens/s, MFU, CALM ÷ baseline, no host syncs.

Run on one CUDA GPU (written for an H200; estimated at 5-8 minutes there, not yet run on one)::

    python benchmarks/gpu_check.py [--batch-size 16] [--block-size 2048] [--out bench_out/gpu_check]

For each of two models, built on the meta device and trained by `calm.train.train` exactly as
``calm train --compile`` trains (one process, bf16 autocast, ``torch.compile(fullgraph=True)`` of
the whole loss, fused AdamW, on-device bookkeeping):

* ``transformer-s``: the paper's Transformer-S baseline (d 768, 12 layers, Llama-3 vocabulary);
* ``calm-m``: the paper's CALM-M (d 1024, SwiGLU 2752, 16 layers, K = 4) on a frozen
  autoencoder of the paper's size (``ae-paper``, randomly initialised: throughput only);

both on windows of ``--block-size`` tokens (CALM: block/4 chunks), ``--batch-size`` windows per
step. The run of 60 steps is laid out as: steps 1-5 compile; steps 6-25 run under
``torch.cuda.set_sync_debug_mode("error")``, so any host-device synchronisation inside the
training loop (the trainer, the models, the optimizer) raises and is reported with its stack;
a log line at step 30 (a host read, outside that window); steps 31-60 are the measurement,
whose tokens/s and MFU come from the trainer's own log line at step 60 (metrics.jsonl).

Reported: tokens/s and MFU per model (MFU from `calm flops` training FLOPs per token at the
training window and the device's peak dense bf16 FLOP/s: 989e12 on H100 SXM / H200, 312e12 on
A100, ``--peak-tflops`` otherwise), and CALM ÷ baseline tokens/s against the ratio `calm flops`
predicts (baseline ÷ CALM training FLOPs per token). Targets: baseline MFU >= 40%; CALM ÷
baseline >= 0.85 × predicted. ``--layers-ar`` / ``--layers-calm`` reduce the depth if memory or
time requires (the report says so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import calm  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from calm.config import TrainConfig, preset  # noqa: E402
from calm.flops import peak_flops, predicted_speed_ratio  # noqa: E402
from calm.models import build_model  # noqa: E402
from calm.train import _train_flops_per_token, read_metrics, train  # noqa: E402

WARM, SYNC_STEPS, LOG_EVERY = 5, 20, 30


class RandomWindows:
    """Random token windows; turns the sync debug mode to "error" for steps [start, end)."""

    def __init__(self, vocab: int, start: int, end: int, cuda: bool = True):
        self.vocab, self.start, self.end, self.cuda = vocab, start, end, cuda

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        if self.cuda and step == self.start:
            torch.cuda.set_sync_debug_mode("error")
        elif self.cuda and step == self.end:
            torch.cuda.set_sync_debug_mode(0)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, self.vocab, (batch_size, block_size), generator=g)

    def val_windows(self, block_size, count):
        return torch.zeros(0, block_size, dtype=torch.long)


def configs(block: int, layers_ar: int | None, layers_calm: int | None, smoke: bool = False):
    ar = preset("transformer-tiny" if smoke else "transformer-s").replace(max_seq_len=block)
    ae = preset("ae-tiny" if smoke else "ae-paper")
    cm = preset("calm-tiny" if smoke else "calm-m").replace(
        max_seq_len=block // 4, autoencoder=ae.to_dict(), latent_dim=ae.latent_dim, vocab_size=ae.vocab_size
    )
    if layers_ar:
        ar = ar.replace(num_layers=layers_ar)
    if layers_calm:
        cm = cm.replace(num_layers=layers_calm)
    return {"transformer-s": ar, "calm-m": cm}


def run_model(name, config, args, out: Path) -> dict:
    run_dir = out / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(
        steps=2 * LOG_EVERY, batch_size=args.batch_size, block_size=args.block_size, log_every=LOG_EVERY,
        eval_every=0, save_every=0, warmup_steps=10, compile=True, dtype="bf16", peak_tflops=args.peak_tflops,
    )  # fmt: skip
    model = build_model(config, device="meta")
    result = {"model": name, "layers": config.num_layers, "batch_tokens": args.batch_size * args.block_size}
    cuda = not args.smoke
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        data = RandomWindows(config.vocab_size, WARM, WARM + SYNC_STEPS, cuda)
        train(model, cfg, data, run_dir, quiet=True, device="cuda" if cuda else "cpu")
        result["sync_check"] = (
            f"passed: {SYNC_STEPS} steps under set_sync_debug_mode('error')" if cuda else "not run (CPU smoke test)"
        )
    except RuntimeError as err:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        result["sync_check"] = "FAILED: " + str(err).splitlines()[0]
        result["sync_traceback"] = traceback.format_exc()[-4000:]
        print(result["sync_traceback"], file=sys.stderr)
        return result
    finally:
        result["seconds"] = time.perf_counter() - t0
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    last = records[-1]
    result.update(
        tokens_per_s=last["tokens_per_s"], mfu=last.get("mfu"), loss=last.get("loss"),
        train_flops_per_token=_train_flops_per_token(config, cfg),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
    )  # fmt: skip
    (out / f"metrics-{name}.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoint is GBs and of no further use
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step (both models)")
    parser.add_argument("--block-size", type=int, default=2048, help="tokens per window")
    parser.add_argument("--layers-ar", type=int, help="fewer baseline layers (memory/time)")
    parser.add_argument("--layers-calm", type=int, help="fewer CALM backbone layers (memory/time)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s if not known from the name")
    parser.add_argument("--out", default="bench_out/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="test this script on the CPU with tiny models")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.block_size = min(args.batch_size, 2), min(args.block_size, 32)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check needs a GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = "cpu (smoke test)" if args.smoke else torch.cuda.get_device_name()
    peak = None if args.smoke else peak_flops("cuda", args.peak_tflops)
    print(f"device: {device_name}; peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; torch {torch.__version__}")
    t_start = time.perf_counter()
    cfgs = configs(args.block_size, args.layers_ar, args.layers_calm, args.smoke)
    results = {}
    for name, config in cfgs.items():
        r = run_model(name, config, args, out)
        results[name] = r
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "n/a"
        print(
            f"{name:14s} {config.num_layers} layers: {tps} tokens/s, MFU {mfu}, "
            f"{r.get('peak_memory_gb', float('nan')):.1f} GB peak, {r['seconds']:.0f} s; sync check {r['sync_check']}",
            flush=True,
        )
    ar, cm = results["transformer-s"], results["calm-m"]
    summary = {"device": device_name, "peak_flops": peak, "torch": torch.__version__, "args": vars(args),
               "results": results, "seconds": time.perf_counter() - t_start}  # fmt: skip
    if "tokens_per_s" in ar and "tokens_per_s" in cm:
        predicted = predicted_speed_ratio(cfgs["calm-m"], cfgs["transformer-s"], "train", context_tokens=args.block_size)
        measured = cm["tokens_per_s"] / ar["tokens_per_s"]
        summary.update(measured_ratio=measured, predicted_ratio=predicted, ratio_of_predicted=measured / predicted)
        print(
            f"CALM ÷ baseline tokens/s: {measured:.2f} measured, {predicted:.2f} predicted by calm flops "
            f"({measured / predicted:.2f} of predicted; target >= 0.85: {'met' if measured >= 0.85 * predicted else 'MISSED'})"
        )
    if ar.get("mfu") is not None:
        print(f"baseline MFU {100 * ar['mfu']:.1f}% (target >= 40%: {'met' if ar['mfu'] >= 0.40 else 'MISSED'})")
    if args.layers_ar or args.layers_calm:
        print(f"note: reduced depth (baseline {cfgs['transformer-s'].num_layers}, CALM {cfgs['calm-m'].num_layers} layers)")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"total {summary['seconds']:.0f} s on {device_name}; wrote {out / 'gpu_check.json'}")
    ok = args.smoke or all(r["sync_check"].startswith("passed") for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
