"""BrierLM evaluation: speed on this machine, and the standard error of BrierLM on WikiText-2.

Part 1, speed (``--speed``): tokens scored per second by `calm.evaluate.evaluate_model` at the
CPU presets, block size 256, on the first ``--speed-windows`` windows of the validation split of
``--data``. Weights are random (seeded): the estimators' cost does not depend on what the weights
are. Rows:

* ``ar``            transformer-cpu, every position, collision "pair" (the default)
* ``ar-expected``   the same with the Rao-Blackwellised collision term
* ``ar-forked``     the same as ``ar`` with per-position KV-cache copies instead of the
                    shared-prefix attention (the design that was replaced; for comparison)
* ``ar-forward``    for scale: one teacher-forced forward pass over the windows (what a
                    validation cross-entropy costs)
* ``calm-k4``       calm-cpu (K = 4, autoencoder of the ae-cpu sizes): one backbone pass
* ``calm-k2``       calm-cpu with K = 2: one extra chunk rolled out per sample

"tokens/s" counts window tokens (``windows × block_size``) per second; "positions/s" the
positions scored (CALM scores one position per chunk). Each row is timed ``--reps`` times
alternately with the others after a warm-up, and the fastest run is reported; the process CPU
time is reported too (steadier on a shared machine).

Part 2, standard error (``--se``): BrierLM of a briefly trained token baseline (``--checkpoint``)
on the whole WikiText-2 validation split, with its delta-method standard error, the 95% interval,
and the standard error of each Brier-n; both collision estimators. Also the spread over
``--seeds`` sampling seeds on the same windows (the part of the error due to sampling alone).

Usage::

    python benchmarks/bench_eval.py --data /work/runs/wt2-8k \\
        --checkpoint /work/runs/ar-brier-eval-300/checkpoint [--speed] [--se] [--threads 1] \\
        [--speed-windows 8] [--reps 2] [--se-max-tokens N] [--seeds 0,1] [--out bench_out/eval]
    python benchmarks/bench_eval.py --render bench_out/eval/bench_eval.json

Both parts run when neither --speed nor --se is given. ``--data`` is a `calm prepare` directory
of WikiText-2 (train.txt as training, valid.txt as validation: ``calm prepare
wikitext2/train.txt --val wikitext2/valid.txt --out DIR``). The checkpoint used for the figures in
the closing note of issue 4 was trained with ``calm train --model ar --data DIR --out RUN
--steps 300 --batch-size 16 --block-size 256 --lr 1e-3 --set warmup_steps=30`` (transformer-cpu).
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

from calm.config import preset
from calm.data import TokenShards, eval_windows
from calm.evaluate import evaluate_model

BLOCK = 256


def _models(vocab_size: int) -> dict[str, tuple[torch.nn.Module, dict]]:
    from calm.models.ar import TokenTransformer
    from calm.models.calm import CALM

    torch.manual_seed(0)
    ar = TokenTransformer(preset("transformer-cpu").replace(vocab_size=vocab_size)).eval()
    out: dict[str, tuple[torch.nn.Module, dict]] = {
        "ar": (ar, {}),
        "ar-expected": (ar, {"collision": "expected"}),
        "ar-forked": (ar, {"shared_prefix": False}),
    }
    for K in (4, 2):
        ae = preset("ae-cpu").replace(vocab_size=vocab_size, chunk_size=K)
        cfg = preset("calm-cpu").replace(vocab_size=vocab_size, chunk_size=K, autoencoder=ae.to_dict())
        torch.manual_seed(0)
        out[f"calm-k{K}"] = (CALM(cfg).eval(), {})
    return out


def _evaluate(model, windows, **kw) -> dict:
    return evaluate_model(model, windows, **kw)


def bench_speed(shards: TokenShards, windows_n: int, reps: int, batch_size: int) -> list[dict]:
    windows = next(eval_windows(shards, BLOCK, max_tokens=windows_n * BLOCK, batch_size=windows_n))
    models = _models(shards.vocab_size)
    for model, kw in models.values():  # warm-up (allocator, thread pool)
        _evaluate(model, windows[:1], batch_size=1, **kw)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    results: dict[str, dict] = {}
    ar = models["ar"][0]
    times["ar-forward"] = []
    for _ in range(reps):
        for name, (model, kw) in models.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = _evaluate(model, windows, batch_size=batch_size, **kw)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            for batch in windows.split(batch_size):
                ar.logits(batch)
        times["ar-forward"].append((time.perf_counter() - t0, time.process_time() - c0))
    results["ar-forward"] = {"kind": "ar", "windows": len(windows), "tokens": windows.numel(), "positions": 0}
    models = {**models, "ar-forward": (ar, {})}
    rows = []
    for name, (model, _) in models.items():
        wall = min(t for t, _ in times[name])
        cpu = min(c for _, c in times[name])
        r = results[name]
        rows.append(
            {
                "name": name,
                "kind": r["kind"],
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "windows": r["windows"],
                "tokens": r["tokens"],
                "positions": r["positions"],
                "wall_s": wall,
                "wall_runs_s": [t for t, _ in times[name]],
                "cpu_s": cpu,
                "tokens_per_s": r["tokens"] / wall,
                "positions_per_s": r["positions"] / wall if r["positions"] else None,
                "tokens_per_cpu_s": r["tokens"] / cpu,
            }
        )
    return rows


def bench_se(shards: TokenShards, checkpoint: str, max_tokens: int | None, seeds: list[int], batch_size: int):
    from calm.checkpoint import load_model

    model = load_model(checkpoint)
    rows = []
    for collision in ("pair", "expected"):
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = evaluate_model(
                model,
                shards,
                block_size=BLOCK,
                max_tokens=max_tokens,
                seed=seed,
                batch_size=batch_size,
                collision=collision,
                progress=True,
            )
            r["wall_s"] = time.perf_counter() - t0
            per_seed.append(r)
        first = per_seed[0]
        rows.append(
            {
                "collision": collision,
                "seeds": seeds,
                "brier_lm": [r["brier_lm"] for r in per_seed],
                "brier_lm_se": first["brier_lm_se"],
                "brier_lm_ci": first["brier_lm_ci"],
                "seed_sd": statistics.stdev([r["brier_lm"] for r in per_seed]) if len(seeds) > 1 else None,
                **{f"brier_{n}": first[f"brier_{n}"] for n in range(1, 5)},
                **{f"brier_{n}_se": first[f"brier_{n}_se"] for n in range(1, 5)},
                "ce": first["ce"],
                "ppl": first["ppl"],
                "windows": first["windows"],
                "tokens": first["tokens"],
                "positions": first["positions"],
                "wall_s": first["wall_s"],
            }
        )
    return rows, {"checkpoint": checkpoint, "kind": model.config.kind, "config": model.config.to_dict()}


def markdown(speed: list[dict] | None, se: list[dict] | None, meta: dict) -> str:
    lines = [f"# BrierLM evaluation benchmark ({meta['date']})", ""]
    lines.append(
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average at start "
        f"{meta['load_average_1_5_15']} (a shared machine: the CPU-time column is the steadier one); "
        f"block size {BLOCK} tokens; data {meta['data']}."
    )
    if speed:
        lines += [
            "",
            f"## Speed (random weights, CPU presets, {speed[0]['windows']} windows, fastest of "
            f"{meta['reps']} runs)",
            "",
            "| estimator | params (M) | positions | wall s | tokens/s | positions/s | tokens/CPU-s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            lines.append(
                f"| {r['name']} | {r['params_m']:.1f} | {r['positions']:,} | {r['wall_s']:.2f} | "
                f"{r['tokens_per_s']:,.0f} | {r['positions_per_s'] or 0:,.0f} | {r['tokens_per_cpu_s']:,.0f} |"
            )
    if se:
        info = meta["se_model"]
        lines += [
            "",
            f"## Standard error on WikiText-2 validation ({se[0]['tokens']:,} tokens, "
            f"{se[0]['positions']:,} positions; {info['checkpoint']})",
            "",
            "| collision | BrierLM | SE | 95% CI | seed SD | Brier-1 ± SE | Brier-2 ± SE | Brier-3 ± SE | "
            "Brier-4 ± SE | CE | ppl | wall s |",
            "|---|---:|---:|---|---:|---|---|---|---|---:|---:|---:|",
        ]
        for r in se:
            ci = r["brier_lm_ci"]
            sd = "" if r["seed_sd"] is None else f"{r['seed_sd']:.4f}"
            cells = " | ".join(f"{r[f'brier_{n}']:.4g} ± {r[f'brier_{n}_se']:.2g}" for n in range(1, 5))
            lines.append(
                f"| {r['collision']} | {r['brier_lm'][0]:.3f} | {r['brier_lm_se']:.3f} | "
                f"{ci[0]:.3f} .. {ci[1]:.3f} | {sd} | {cells} | {r['ce']:.3f} | {r['ppl']:.1f} | {r['wall_s']:.0f} |"
            )
    lines += ["", "Reproduce:", "", "    " + meta["command"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared WikiText-2 data directory (its val split is used)")
    p.add_argument("--checkpoint", help="a trained token-baseline (or CALM) checkpoint for --se")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--se", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-windows", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--se-max-tokens", type=int, default=None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="bench_out/eval")
    p.add_argument(
        "--render", metavar="JSON", help="only re-print the markdown of an earlier bench_eval.json"
    )
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(markdown(report["speed"], report["se"], report["meta"]))
        return 0
    if not args.speed and not args.se:
        args.speed = args.se = True
    torch.set_num_threads(args.threads)
    shards = TokenShards(args.data, "val")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": f"{args.data} [val, {len(shards):,} tokens]",
        "reps": args.reps,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
    }
    speed = bench_speed(shards, args.speed_windows, args.reps, args.batch_size) if args.speed else None
    se = None
    if args.se:
        if not args.checkpoint:
            p.error("--se needs --checkpoint (a trained model)")
        seeds = [int(s) for s in args.seeds.split(",") if s]
        se, meta["se_model"] = bench_se(shards, args.checkpoint, args.se_max_tokens, seeds, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "speed": speed, "se": se}
    (out / "bench_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(speed, se, meta)
    (out / "bench_eval.md").write_text(md)
    print(md)
    print(f"wrote {out / 'bench_eval.json'} and {out / 'bench_eval.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
