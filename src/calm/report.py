"""Plots and the markdown report of a quickstart (or any set of runs).

Plots are written with matplotlib's non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calm.train_log import read_metrics  # noqa: E402  (the training run's own JSONL reader)


def _series(records, split: str, key: str):
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(runs: dict[str, tuple[Path, str]], path: Path) -> Path:
    """One panel per run: training and validation loss against steps.

    runs: title -> (run directory, label of the loss, e.g. "energy loss").
    """
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (title, (run_dir, label)) in zip(axes[0], runs.items()):
        records = read_metrics(run_dir)
        ax.plot(*_series(records, "train", "loss"), label="train", lw=1)
        ax.plot(*_series(records, "val", "val_loss"), "o-", label="validation", ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_brier_vs_flops(curves: dict[str, list], path: Path, block_size: int) -> Path:
    """BrierLM (with its 95% CI as a band) and Brier-1..4 against training FLOPs, one colour per
    model. curves: name -> points, each a dict with ``flops`` and ``brier_lm`` and optionally
    ``brier_lm_ci_low``/``brier_lm_ci_high`` and ``brier_1``..``brier_4`` (or a (flops,
    brier_lm) pair)."""
    fig, (ax, axn) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted(
            ({"flops": p[0], "brier_lm": p[1]} if isinstance(p, (tuple, list)) else p for p in pts),
            key=lambda p: p["flops"],
        )
        if not pts:
            continue
        color = f"C{i}"
        xs = [p["flops"] for p in pts]
        ax.plot(xs, [p["brier_lm"] for p in pts], "o-", color=color, label=name, ms=4)
        if all("brier_lm_ci_low" in p and "brier_lm_ci_high" in p for p in pts):
            ax.fill_between(
                xs,
                [p["brier_lm_ci_low"] for p in pts],
                [p["brier_lm_ci_high"] for p in pts],
                color=color,
                alpha=0.2,
            )
        for n, style in zip(range(1, 5), ("-", "--", "-.", ":")):
            if all(f"brier_{n}" in p for p in pts):
                axn.plot(xs, [p[f"brier_{n}"] for p in pts], style, color=color, label=f"{name} Brier-{n}")
    for a in (ax, axn):
        a.set_xscale("log")
        a.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+", "e"))
        )
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xlabel("training FLOPs")
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel(f"BrierLM (context {block_size} tokens)")
    ax.set_title("BrierLM (band: 95% CI)")
    ax.legend(fontsize=8)
    axn.set_ylabel("Brier-n")
    axn.set_title("Brier-1..4 (BrierLM is their clamped geometric mean)")
    axn.axhline(0, color="gray", lw=0.8)
    axn.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reconstruction_vs_noise(recon: dict, path: Path) -> Path:
    """Autoencoder token accuracy against the scale of Gaussian noise added to μ."""
    settings = recon["settings"]
    xs, ys, cs = [0.0], [100 * settings["mu"]["token_acc"]], [100 * settings["mu"]["chunk_acc"]]
    for name, row in settings.items():
        if name.startswith("noise_"):
            xs.append(float(name.removeprefix("noise_")))
            ys.append(100 * row["token_acc"])
            cs.append(100 * row["chunk_acc"])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.plot(xs, ys, "o-", label="token accuracy")
    ax.plot(xs, cs, "s--", label="chunk exact match")
    post = 100 * settings["posterior"]["token_acc"]
    ax.axhline(
        post, color="gray", ls=":", label=f"posterior sample (σ̄={recon['mean_sigma']:.2f}): {post:.2f}%"
    )
    ax.set_xlabel("σ of Gaussian noise added to μ")
    ax.set_ylabel("% reconstructed")
    ax.set_title("Autoencoder robustness to latent noise")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
