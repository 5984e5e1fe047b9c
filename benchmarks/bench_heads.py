"""Energy, flow-matching and diffusion heads compared on the same runs (the paper's Fig. 9).

The three CALM heads (``CALMConfig.head``) are trained on the same frozen autoencoder, the
same backbone, the same data order (the batch of a step is a function of the seed and the
step) and the same number of steps, one after the other. Then, on the validation split:

* BrierLM during training (every ``--eval-every`` steps, on the first ``--curve-tokens``
  validation tokens, at each head's default sampling steps), and at the end of training on
  ``--eval-tokens`` tokens with a 95% confidence interval;
* BrierLM against the sampling steps of the flow head (``--flow-steps``, midpoint rule) and
  the diffusion head (``--diffusion-steps``, ancestral DDPM), the energy head's single pass
  beside them; the same weights and the same evaluation seed for every setting;
* head time per generated token: `generate` with ``profile=True`` (the "head" phase: the
  head's noise and its network evaluations), T = 1, batch 1 and 16, all three heads on the
  PyTorch path (``fused_kernel=False``), timed alternately in one run (median of ``--reps``).

Usage::

    python benchmarks/bench_heads.py --data DATA --ae AE_CKPT --steps 600 --out bench_out/heads

Writes ``results.json``, ``results.md`` and ``heads.png`` (BrierLM against sampling steps and
against training steps, beside the paper's numbers read off its Fig. 9) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from calm.checkpoint import load_model
from calm.config import CALMConfig, TrainConfig
from calm.evaluate import brier_eval_fn, evaluate_model, load_eval_tokens
from calm.generation import generate
from calm.train import PreparedData, build_calm_from_autoencoder, read_metrics, train

# BrierLM at 50k training steps, read off the paper's Fig. 9 (CALM-M scale), and the sampling
# steps each head needs there (energy: 1; flow: ~4 to approach its best; diffusion: ~100).
PAPER_FIG9 = {"energy": 4.70, "flow": 4.08, "diffusion": 3.07}
# run name -> CALMConfig changes; "diffusion-eps" is the diffusion head with the authors' target
VARIANTS = {
    "energy": {"head": "energy"},
    "flow": {"head": "flow"},
    "diffusion": {"head": "diffusion"},
    "diffusion-eps": {"head": "diffusion", "diffusion_target": "eps"},
}
STEPS_FIELD = {"flow": "flow_steps", "diffusion": "diffusion_steps"}
COLORS = {"energy": "C0", "flow": "C1", "diffusion": "C2", "diffusion-eps": "C3"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared data directory (calm prepare)")
    p.add_argument("--ae", required=True, help="trained autoencoder checkpoint (same tokenizer)")
    p.add_argument("--heads", default="energy,flow,diffusion", help=f"runs, of: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=600, help="training steps per head")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=344)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--curve-tokens", type=int, default=8192, help="validation tokens per curve point")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens of the final scores")
    p.add_argument("--flow-steps", default="1,2,4,10")
    p.add_argument("--diffusion-steps", default="10,25,50,100")
    p.add_argument("--gen-tokens", type=int, default=128, help="new tokens per timed generate call")
    p.add_argument("--gen-batches", default="1,16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (training uses TrainConfig's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out/heads")
    p.add_argument(
        "--reuse", action="store_true", help="skip training where OUT/<head> has a final checkpoint"
    )
    p.add_argument(
        "--replot", action="store_true", help="only rewrite results.md and heads.png from results.json"
    )
    args = p.parse_args(argv)
    if args.replot:
        res = json.loads((Path(args.out) / "results.json").read_text())
        (Path(args.out) / "results.md").write_text(_markdown(res))
        _plot(res, Path(args.out) / "heads.png")
        return 0
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = [h for h in args.heads.split(",") if h]
    unknown = [h for h in heads if h not in VARIANTS]
    if unknown:
        p.error(f"unknown --heads {unknown}; choose from {', '.join(VARIANTS)}")

    data = PreparedData(args.data)
    tok = data.tokenizer()
    ae = load_model(args.ae)
    val_tokens, _ = load_eval_tokens([args.data], tok, split="val", max_tokens=args.eval_tokens)
    K = ae.config.chunk_size
    base = CALMConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.attn_heads,
        ffn_dim=args.ffn,
        max_seq_len=args.block_size // K,
        vocab_size=ae.config.vocab_size,
        chunk_size=K,
        latent_dim=ae.config.latent_dim,
        autoencoder=ae.config.to_dict(),
    )
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_every=args.eval_every,
        eval_batches=2,
        save_every=args.steps,
        log_every=20,
    )
    curve_windows = data.val_windows(args.block_size, max(1, args.curve_tokens // args.block_size))
    results: dict = {
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.processor() or ''}".strip(
            ", "
        ),
        "torch": torch.__version__,
        "backbone": {k: getattr(base, k) for k in ("d_model", "num_layers", "num_heads", "ffn_dim")},
        "train": train_cfg.to_dict(),
        "autoencoder": str(args.ae),
        "eval_tokens": int(val_tokens.numel()),
        "curve_tokens": int(curve_windows.numel()),
        "block_size": args.block_size,
        "paper_fig9_50k_steps": PAPER_FIG9,
        "heads": {},
    }
    models = {}
    for head in heads:
        run = out / head
        cfg = base.replace(**VARIANTS[head])
        reused = args.reuse and (run / "checkpoint" / "COMPLETE").exists()
        if not reused:
            torch.manual_seed(train_cfg.seed)
            model = build_calm_from_autoencoder(cfg, ae)
            eval_fn = brier_eval_fn(curve_windows, seed=args.seed)
            train(model, train_cfg, data, run, tokenizer=tok, eval_fn=eval_fn, quiet=True)
        train_s = [r["elapsed_s"] for r in read_metrics(run) if r.get("split") == "train"][-1]
        model = load_model(run / "checkpoint")
        for key, value in VARIANTS[head].items():
            if getattr(model.config, key) != value:
                raise SystemExit(
                    f"{run / 'checkpoint'} has {key}={getattr(model.config, key)!r}, not {value!r}"
                )
        models[head] = model
        curve = [
            {"step": r["step"], "brier_lm": r["brier_lm"], "brier_1": r["brier_1"], "brier_2": r["brier_2"]}
            for r in read_metrics(run)
            if r.get("split") == "val" and "brier_lm" in r
        ]
        last_loss = [r["loss"] for r in read_metrics(run) if r.get("split") == "train"][-1]
        results["heads"][head] = {
            "kind": model.config.head,
            "reused_checkpoint": reused,
            "train_seconds": train_s,
            "final_train_loss": last_loss,
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "curve": curve,
            "by_sampling_steps": [],
        }
        print(f"[{head}] trained in {train_s:.0f} s; curve {curve}", file=sys.stderr, flush=True)

    # BrierLM at the end of training, against the sampling steps
    settings = {
        h: {"flow": _ints(args.flow_steps), "diffusion": _ints(args.diffusion_steps)}.get(
            m.config.head, [None]
        )
        for h, m in models.items()
    }
    probe = val_tokens[: 8 * args.block_size].view(8, args.block_size)
    for head, model in models.items():
        with torch.no_grad():  # the size of the latents a head should produce
            chunks = model.to_chunks(probe)
            h_probe = model.hidden(chunks[:, :-1])
            mu_norm = float(model.autoencoder.encode(chunks[:, 1:])[0].norm(dim=-1).mean())
        results["heads"][head]["posterior_mean_norm"] = mu_norm
        for steps in settings[head]:
            if steps is not None:
                model.set_head_sampling(steps=steps)
            t0 = time.perf_counter()
            r = evaluate_model(model, val_tokens, block_size=args.block_size, seed=args.seed)
            with torch.no_grad():
                z = model.sample_latents(h_probe, 2, generator=torch.Generator().manual_seed(args.seed))
            row = {
                "sample_norm": float(z.norm(dim=-1).mean()),
                "sampling_steps": steps or 1,
                "evals_per_sample": model.head.evals_per_sample,
                "brier_lm": r["brier_lm"],
                "brier_lm_ci": r.get("brier_lm_ci"),
                **{f"brier_{n}": r[f"brier_{n}"] for n in range(1, 5)},
                **{f"brier_{n}_se": r[f"brier_{n}_se"] for n in range(1, 5)},
                "positions": r["positions"],
                "eval_seconds": time.perf_counter() - t0,
                "head_ms_per_token": {},
            }
            results["heads"][head]["by_sampling_steps"].append(row)
            print(
                f"[{head}] steps {row['sampling_steps']}: BrierLM {row['brier_lm']:.3f} {row['brier_lm_ci']}, "
                f"Brier-1 {row['brier_1']:.4f}",
                file=sys.stderr,
                flush=True,
            )

    # head time per generated token at every sampling setting, all settings timed alternately
    prompt = val_tokens[:32].tolist()
    for batch in _ints(args.gen_batches):
        times: dict[tuple[str, int], list[float]] = {}
        for rep in range(args.reps + 1):  # the first round warms up
            for head, model in models.items():
                for steps in settings[head]:
                    if steps is not None:
                        model.set_head_sampling(steps=steps)
                    _, stats = generate(
                        model,
                        [prompt] * batch,
                        max_new_tokens=args.gen_tokens,
                        seed=rep,
                        eos_id=None,
                        fused_kernel=False,
                        profile=True,
                        return_stats=True,
                    )
                    if rep:
                        per_token = stats.phases.get("head", 0.0) / stats.total_new_tokens
                        times.setdefault((head, steps or 1), []).append(per_token)
        for head in models:
            for row in results["heads"][head]["by_sampling_steps"]:
                row["head_ms_per_token"][batch] = 1e3 * statistics.median(times[head, row["sampling_steps"]])
    for head, model in models.items():
        if model.config.head in STEPS_FIELD:  # back to the trained default
            model.set_head_sampling(steps=getattr(base, STEPS_FIELD[model.config.head]))
        results["heads"][head]["head"] = model.head.describe()

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(results))
    _plot(results, out / "heads.png")
    print(_markdown(results))
    return 0


def _default_row(h: dict) -> dict:
    """The row at the head's default sampling steps (else the one with the most steps)."""
    rows = h["by_sampling_steps"]
    default = h["head"].get("steps", 1)
    return next((r for r in rows if r["sampling_steps"] == default), rows[-1])


def _fmt_ci(row) -> str:
    ci = row.get("brier_lm_ci")
    return f"{row['brier_lm']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{row['brier_lm']:.2f}"


def _markdown(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}, torch {res['torch']}; BrierLM on {res['eval_tokens']:,} validation "
        f"tokens, context {res['block_size']} tokens, 95% CI.",
        "",
        "| head | sampling steps | network evals / sample | BrierLM [95% CI] | Brier-1 | Brier-2 | "
        "‖z̃‖ / ‖μ‖ | head ms / token (batch 1) | head ms / token (batch 16) | paper, 50k steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for head, h in res["heads"].items():
        default = h["head"].get("steps", 1)
        for row in h["by_sampling_steps"]:
            ms = {int(k): v for k, v in row["head_ms_per_token"].items()}
            paper = res["paper_fig9_50k_steps"].get(head, "") if row["sampling_steps"] == default else ""
            ratio = row["sample_norm"] / h["posterior_mean_norm"]
            lines.append(
                f"| {head} | {row['sampling_steps']} | {row['evals_per_sample']} | {_fmt_ci(row)} | "
                f"{row['brier_1']:.4f} ± {row['brier_1_se']:.4f} | {row['brier_2']:.4f} | {ratio:.3g} | "
                f"{ms.get(1, float('nan')):.3f} | {ms.get(16, float('nan')):.3f} | {paper} |"
            )
    lines += ["", "BrierLM during training (first {:,} validation tokens):".format(res["curve_tokens"]), ""]
    steps = sorted({p["step"] for h in res["heads"].values() for p in h["curve"]})
    lines.append("| head | " + " | ".join(f"step {s}" for s in steps) + " | final train loss |")
    lines.append("|---|" + "---:|" * (len(steps) + 1))
    for head, h in res["heads"].items():
        by = {p["step"]: p for p in h["curve"]}
        cells = [f"{by[s]['brier_lm']:.2f} (B1 {by[s]['brier_1']:.3f})" if s in by else "" for s in steps]
        lines.append(f"| {head} | " + " | ".join(cells) + f" | {h['final_train_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def _step_ticks(ax, res: dict) -> None:
    """Log x axis labelled at exactly the sampling steps that were measured."""
    import matplotlib.ticker

    steps = sorted({r["sampling_steps"] for h in res["heads"].values() for r in h["by_sampling_steps"]})
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(steps, [str(s) for s in steps])


def _note_if_all_zero(ax, values) -> None:
    if values and all(v == 0 for v in values):
        ax.text(0.5, 0.3, "all 0: no head predicted a 4-token span\n(Brier-4 = 0, so BrierLM clamps to 0)",
                transform=ax.transAxes, ha="center", fontsize=9, color="0.3")  # fmt: skip


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = COLORS
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 7.4))
    for i, (key, label) in enumerate((("brier_lm", "BrierLM"), ("brier_1", "Brier-1"))):
        ax = axes[i, 0]
        for head, h in res["heads"].items():
            rows = h["by_sampling_steps"]
            xs, ys = [r["sampling_steps"] for r in rows], [r[key] for r in rows]
            if key == "brier_lm":
                cis = [r["brier_lm_ci"] or [r["brier_lm"]] * 2 for r in rows]
                err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            else:
                err = [1.96 * r["brier_1_se"] for r in rows]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=colors.get(head), capsize=3, label=head)
        _step_ticks(ax, res)
        _note_if_all_zero(ax, [r[key] for h in res["heads"].values() for r in h["by_sampling_steps"]])
        ax.set_xlabel("sampling steps per vector")
        ax.set_ylabel(f"{label} (context {res['block_size']})")
        ax.set_title(f"ours after {res['train']['steps']} training steps (95% CI)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax = axes[i, 1]
        for head, h in res["heads"].items():
            pts = h["curve"]
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], "o-", color=colors.get(head), label=head)
        _note_if_all_zero(ax, [p[key] for h in res["heads"].values() for p in h["curve"]])
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label} ({res['curve_tokens']:,} val tokens)")
        ax.set_title("ours during training (default sampling steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0, 2]
    names = [n for n in res["heads"] if n in res["paper_fig9_50k_steps"]]
    x = list(range(len(names)))
    paper = [res["paper_fig9_50k_steps"][n] for n in names]
    ours = [_default_row(res["heads"][n])["brier_lm"] for n in names]
    ax.bar([i - 0.2 for i in x], paper, 0.4, label="paper, 50k steps (Fig. 9)", color="0.6")
    ax.bar([i + 0.2 for i in x], ours, 0.4, label=f"ours, {res['train']['steps']} steps",
           color=[colors[n] for n in names])  # fmt: skip
    for i, (a, b) in enumerate(zip(paper, ours)):
        ax.text(i - 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("BrierLM")
    ax.set_title("paper vs ours (default sampling steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 2]
    for head, h in res["heads"].items():
        rows = h["by_sampling_steps"]
        for batch, style in ((1, "o-"), (16, "s--")):
            ys = [{int(k): v for k, v in r["head_ms_per_token"].items()}.get(batch) for r in rows]
            if all(y is not None for y in ys):
                xs = [r["evals_per_sample"] for r in rows]
                ax.plot(xs, ys, style, color=colors.get(head), label=f"{head}, batch {batch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("head ms per generated token")
    ax.set_title("head time (generate, T = 1, PyTorch path)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
