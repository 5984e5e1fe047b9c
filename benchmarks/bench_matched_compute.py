"""Quality at matched training compute: CALM (K = 4) vs the token-level Transformer.

The small-scale version of the paper's claim that CALM reaches a Transformer's BrierLM with
markedly fewer training FLOPs. Both models share the backbone (``--backbone``), the data
(a `calm prepare` directory; the standard split is WikiText-2 train / valid), the batch, the
optimiser and a constant learning rate after warm-up. Each model is trained ONCE, and its
weights are evaluated when its cumulative training FLOPs (`calm.flops`, the same accounting
for both, including CALM's frozen-encoder forward for the targets) cross each budget. With a
constant schedule the weights after s steps of a longer run are exactly those of a run of s
steps (same data order, same RNG), so one run per model gives every budget; the run is
continued with the trainer's exact ``resume`` between budgets.

BrierLM is scored on the validation split with the same block size (context, in tokens) and
token count for both models.

Usage::

    python benchmarks/bench_matched_compute.py --data runs/wt2-8k --ae runs/bench_ae/checkpoint \
        --budgets 4e12,8e12,1.6e13,3.2e13 [--out bench_out/matched] [--device cpu]

Writes ``results.json``, ``results.md`` and ``brier_vs_flops.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from calm.checkpoint import load_model
from calm.config import ARConfig, CALMConfig, TrainConfig, apply_overrides
from calm.evaluate import evaluate_model, load_eval_tokens
from calm.flops import flops_report
from calm.models.ar import TokenTransformer
from calm.report import plot_brier_vs_flops
from calm.train import PreparedData, build_calm_from_autoencoder, train

BACKBONES = {
    "small": dict(d_model=128, num_layers=4, num_heads=4, ffn_dim=344),
    "cpu": dict(d_model=256, num_layers=4, num_heads=4, ffn_dim=688),
    "gpu": dict(d_model=768, num_layers=12, num_heads=12, ffn_dim=2048),
}


@torch.no_grad()
def energy_metrics(model, windows: torch.Tensor, seed: int, batch: int = 16) -> dict:
    """CALM's validation energy loss with its oracle and context-free references and the fraction
    of the gap between the two that it closes (`CALM.derived_metrics`), on fixed windows/noise."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        for part in windows.split(batch):
            _, metrics = model.loss(part.to(device))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(part)
    means = {k: v / len(windows) for k, v in sums.items()}
    means.update(model.derived_metrics(means))
    return {
        f"val_{k}": means[k]
        for k in ("energy", "oracle_energy", "context_free_energy", "gap_closed")
        if k in means
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared data directory (calm prepare)")
    p.add_argument("--ae", required=True, help="trained autoencoder checkpoint (same tokenizer)")
    p.add_argument(
        "--budgets", default="4e12,8e12,1.6e13,3.2e13", help="training-FLOP budgets, comma-separated"
    )
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored per evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--models", default="calm,ar")
    p.add_argument(
        "--calm-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the CALM config (e.g. head_init=xavier aux_token_weight=1)",
    )
    p.add_argument(
        "--train-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of the TrainConfig (both)"
    )
    p.add_argument(
        "--energy-windows",
        type=int,
        default=64,
        help="validation windows for CALM's energy loss and its gap to the oracle / context-free references",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/matched")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted(float(b) for b in args.budgets.split(","))

    data = PreparedData(args.data)
    tok = data.tokenizer()
    ae = load_model(args.ae)
    val_tokens, _ = load_eval_tokens([args.data], tok, split="val", max_tokens=args.eval_tokens)
    energy_windows = data.val_windows(args.block_size, args.energy_windows)
    bb = BACKBONES[args.backbone]
    K = ae.config.chunk_size
    configs = {
        "calm": apply_overrides(
            CALMConfig(
                **bb,
                vocab_size=tok.vocab_size,
                chunk_size=K,
                latent_dim=ae.config.latent_dim,
                max_seq_len=args.block_size // K,
                autoencoder=ae.config.to_dict(),
            ),
            args.calm_set,
        ),
        "ar": ARConfig(**bb, vocab_size=tok.vocab_size, max_seq_len=args.block_size),
    }
    builders = {"calm": lambda c: build_calm_from_autoencoder(c, ae), "ar": TokenTransformer}
    tokens_per_step = args.batch_size * args.block_size
    results = {
        "command": command,
        "machine": f"{platform.machine()} {platform.processor()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "budgets": budgets,
        "block_size": args.block_size,
        "eval_tokens": int(val_tokens.numel()),
        "tokens_per_step": tokens_per_step,
        "models": {},
    }
    for name in args.models.split(","):
        cfg = configs[name]
        fpt = flops_report(cfg, context=cfg.max_seq_len)["train_flops_per_token"]
        run_dir = out / f"run_{name}"
        torch.manual_seed(args.seed)
        model = builders[name](cfg)
        rows, done, t_train = [], 0, 0.0
        previous = out / "results.json"
        if (run_dir / "checkpoint").exists() and previous.exists():
            # extend an earlier run to larger budgets: continue it exactly from its checkpoint
            old = json.loads(previous.read_text())["models"].get(name)
            if old and old["rows"]:
                rows = old["rows"]
                done, t_train = rows[-1]["steps"], rows[-1]["train_seconds"]
        for budget in budgets:
            steps = max(1, round(budget / (fpt * tokens_per_step)))
            if any(r["budget"] == budget for r in rows):
                continue
            if steps > done:
                tc = apply_overrides(
                    TrainConfig(
                        steps=steps,
                        batch_size=args.batch_size,
                        block_size=args.block_size,
                        lr=args.lr,
                        warmup_steps=args.warmup,
                        schedule="constant",
                        eval_every=10**9,
                        save_every=10**9,
                        log_every=50,
                        seed=args.seed,
                        dtype=args.dtype,
                    ),
                    args.train_set,
                )
                t0 = time.perf_counter()
                train(
                    model, tc, data, run_dir, tokenizer=tok, resume=done > 0, device=args.device, quiet=True
                )
                t_train += time.perf_counter() - t0
                done = steps  # the next leg resumes (exactly) from the checkpoint just written
            model.eval()
            score = evaluate_model(model, val_tokens, block_size=args.block_size, seed=args.seed)
            row = {
                "budget": budget,
                "steps": done,
                "tokens": done * tokens_per_step,
                "flops": done * tokens_per_step * fpt,
                "train_seconds": t_train,
                **{k: score[k] for k in ("brier_lm", "brier_1", "brier_2", "brier_3", "brier_4")},
                **{f"brier_{n}_se": score.get(f"brier_{n}_se") for n in range(1, 5)},
                "brier_lm_ci": score.get("brier_lm_ci"),
                "ce": score.get("ce"),
                **(energy_metrics(model, energy_windows, args.seed) if name == "calm" else {}),
            }
            rows.append(row)
            print(json.dumps({"model": name, **row}), flush=True)
        rows.sort(key=lambda r: r["budget"])
        results["models"][name] = {"config": cfg.to_dict(), "train_flops_per_token": fpt, "rows": rows}
        (out / "results.json").write_text(json.dumps(results, indent=2))

    curves = {
        (f"CALM (K={K})" if n == "calm" else "Transformer"): [
            {
                **{k: r[k] for k in ("flops", "brier_lm", "brier_1", "brier_2", "brier_3", "brier_4")},
                **(
                    {"brier_lm_ci_low": r["brier_lm_ci"][0], "brier_lm_ci_high": r["brier_lm_ci"][1]}
                    if r.get("brier_lm_ci")
                    else {}
                ),
            }
            for r in m["rows"]
        ]
        for n, m in results["models"].items()
    }
    plot_brier_vs_flops(curves, out / "brier_vs_flops.png", args.block_size)
    lines = [
        f"Matched-compute comparison (backbone {args.backbone}: {bb}); BrierLM on {results['eval_tokens']:,} "
        f"validation tokens, context {args.block_size} tokens.",
        "",
        "| model | budget (FLOPs) | steps | train tokens | BrierLM | 95% CI | Brier-1 | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in results["models"].items():
        for r in m["rows"]:
            ci = r["brier_lm_ci"] or [float("nan")] * 2
            lines.append(
                f"| {n} | {r['budget']:.2g} | {r['steps']} | {r['tokens']:,} | {r['brier_lm']:.2f} | "
                f"[{ci[0]:.2f}, {ci[1]:.2f}] | {r['brier_1']:.3f} | {r['train_seconds']:.0f} |"
            )
    lines += ["", f"Machine: {results['machine']}, torch {results['torch']}.", f"Command: `{command}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
