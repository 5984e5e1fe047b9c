"""Accuracy against diversity for CALM's temperature samplers (and the token baseline's T).

The paper compares samplers by the curve they trace when their knob moves: how often a sample
is right (accuracy) against how often two independent samples agree (the collision rate; the
lower, the more diverse). Exact temperature sampling, P(x)^(1/T)/Z, traces the reference curve.
This benchmark draws two independent samples at every chunk-aligned position of validation
windows and measures, per sampler setting:

  acc_1 / agree_1   the first token of the chunk: P(x1 = y), P(x1 = x2)
  acc_K / agree_K   the whole chunk of K tokens
  brier_1           2·acc_1 − agree_1 (an unbiased Brier-1 estimate for that sampler)

Settings: ``exact`` (the default sampler, `calm.sampling.sample_exact`, at most 200 draws per
step; the share of positions that reached the bound and used the approximation is reported),
``approx`` (N = 200 candidates) and ``noise`` (one head sample with the head's input noise
scaled by s, done here by hand: the library offers no such sampler, see the outcome in the
README). The token baseline (``--ar``) at the same positions:
acc_1 = E p_T(y), agree_1 = E Σ_v p_T(v)², exact from its logits.

If the noise sampler's curve lies on the exact sampler's, it is an approximation of exact
temperature with the cost of T = 1; if not, it is a different knob.

Usage::

    python benchmarks/bench_sampler_curves.py --calm RUN/checkpoint [--ar RUN_AR/checkpoint] --data DATA \\
        [--positions 512] [--out bench_out/curves]

Writes ``curves.json``, ``curves.md`` and ``curves.png`` into ``--out``.
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

TEMPERATURES = (1.0, 0.8, 2 / 3, 0.5, 0.4, 1 / 3, 0.25)
NOISE_SCALES = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def _hidden_positions(model, windows: torch.Tensor, positions: int):
    """Backbone states [R, d] at chunk-aligned positions and the true next chunks [R, K]."""
    K = model.config.chunk_size
    with torch.inference_mode():
        chunks = model.to_chunks(windows)
        h = model.hidden(chunks[:, :-1])  # h[:, i] predicts chunk i + 1
    h, y = h.reshape(-1, h.shape[-1]), chunks[:, 1:].reshape(-1, K)
    return h[:positions], y[:positions]


def calm_point(model, h, y, *, sampler: str, temperature: float, seed: int) -> dict:
    from calm.calm_sampler import ChunkSampler
    from calm.decoding import ChunkDecoder
    from calm.rng import RowRandom

    class Stats:
        draws = decoded_positions = exact_hit_limit = fused_draws = 0

    stats = Stats()
    pair = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(2):  # two independent samples per position (different row seeds)
            rng = RowRandom([seed + 1_000_003 * k + r for r in range(len(h))])
            if sampler == "noise":  # one head sample, its input noise scaled by s = `temperature`
                u = rng.uniform((2, 0), (1, model.head.noise_dim), model.head.noise_dtype)
                noise = model.head.noise_from_uniform(u) * temperature
                pair.append(ChunkDecoder.for_model(model).sample(h, noise)[:, 0])
                stats.draws += len(h)
                continue
            s = ChunkSampler(
                model, rng, temperature=temperature, sampler=sampler, num_samples=200, stats=stats
            )
            pair.append(s(h, 0))
    x1, x2 = pair
    R = len(h)
    return {
        "sampler": sampler,
        "knob": temperature,
        "acc_1": float((x1[:, 0] == y[:, 0]).double().mean()),
        "agree_1": float((x1[:, 0] == x2[:, 0]).double().mean()),
        "acc_K": float((x1 == y).all(-1).double().mean()),
        "agree_K": float((x1 == x2).all(-1).double().mean()),
        "draws_per_position": stats.draws / (2 * R),
        "bound_share": stats.exact_hit_limit / (2 * R),
        "seconds": time.perf_counter() - t0,
        "positions": R,
    }


def ar_points(model, windows: torch.Tensor, K: int, positions: int) -> list[dict]:
    """The token baseline at CALM's positions: exact acc/agree of the next token under p_T."""
    with torch.inference_mode():
        logits = model.logits(windows).float()  # [B, T, V]; logits[:, t] predicts token t + 1
    T = windows.shape[1]
    t = torch.arange(K, T, K)  # CALM's positions: contexts of K, 2K, ... tokens
    lg = logits[:, t - 1].reshape(-1, logits.shape[-1])[:positions]
    y = windows[:, t].reshape(-1)[:positions]
    out = []
    for temp in TEMPERATURES:
        p = torch.softmax(lg / temp, -1, dtype=torch.float64)
        out.append(
            {
                "sampler": "ar",
                "knob": temp,
                "acc_1": float(p.gather(1, y[:, None]).mean()),
                "agree_1": float(p.square().sum(-1).mean()),
                "positions": len(y),
            }
        )
    return out


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"exact": "o-", "approx": "s--", "noise": "^-", "ar": "x:"}
    labels = {
        "exact": "CALM exact temperature",
        "approx": "CALM batch approximation (N = 200)",
        "noise": "CALM head noise × s",
        "ar": "Transformer softmax(logits / T)",
    }
    for name in ("ar", "exact", "approx", "noise"):
        pts = [p for p in points if p["sampler"] == name]
        if not pts:
            continue
        ax.plot([p["agree_1"] for p in pts], [p["acc_1"] for p in pts], styles[name], label=labels[name])
        if name != "approx":  # its knobs sit on the exact sampler's; labels would overprint
            for p in pts:
                ax.annotate(
                    f"{p['knob']:.2g}",
                    (p["agree_1"], p["acc_1"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    # log axes: a small model's CALM points sit near zero where a linear axis stacks them
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("P(two samples agree), first token of the chunk (log)")
    ax.set_ylabel("P(sample is right), first token (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calm", required=True, help="trained CALM checkpoint")
    p.add_argument("--ar", default=None, help="trained token-baseline checkpoint (optional)")
    p.add_argument("--data", required=True, help="prepared data (validation windows)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--positions", type=int, default=512, help="chunk positions scored")
    p.add_argument("--samplers", default="exact,approx,noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out/curves")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/bench_sampler_curves.py", *(argv or sys.argv[1:])])
    from calm.checkpoint import load_model
    from calm.train import PreparedData

    calm = load_model(args.calm).eval()
    K = calm.config.chunk_size
    data = PreparedData(args.data)
    n_windows = -(-args.positions // (args.block_size // K - 1))
    windows = data.val_windows(args.block_size, n_windows)
    h, y = _hidden_positions(calm, windows, args.positions)
    points = []
    for sampler in args.samplers.split(","):
        knobs = NOISE_SCALES if sampler == "noise" else TEMPERATURES
        for knob in knobs:
            if sampler == "approx" and knob == 1.0:
                continue  # T = 1 is one head sample, the same for every sampler
            pt = calm_point(calm, h, y, sampler=sampler, temperature=knob, seed=args.seed)
            points.append(pt)
            print(json.dumps(pt), flush=True)
    if args.ar:
        ar = load_model(args.ar).eval()
        for pt in ar_points(ar, windows, K, args.positions):
            points.append(pt)
            print(json.dumps(pt), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "machine": f"{platform.machine()} {platform.processor()}, {args.threads} thread(s), torch {torch.__version__}",
        "calm": args.calm,
        "ar": args.ar,
        "positions": len(h),
        "block_size": args.block_size,
    }
    (out / "curves.json").write_text(json.dumps({"meta": meta, "points": points}, indent=2))
    title = f"{Path(args.calm).parent.name}: {len(h)} validation positions"
    plot(points, out / "curves.png", title)
    lines = [
        f"Accuracy vs agreement, {len(h)} chunk positions of validation windows ({args.block_size} tokens).",
        "",
        "| sampler | knob (T or s) | acc_1 | agree_1 | Brier-1 | acc_K | agree_K | draws / position | at bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pt in points:
        b1 = 2 * pt["acc_1"] - pt["agree_1"]
        lines.append(
            f"| {pt['sampler']} | {pt['knob']:.3g} | {pt['acc_1']:.4f} | {pt['agree_1']:.4f} | {b1:.4f} | "
            + (
                f"{pt['acc_K']:.4f} | {pt['agree_K']:.4f} | {pt['draws_per_position']:.1f} | {100 * pt['bound_share']:.0f}% |"
                if "acc_K" in pt
                else " |  |  |  |"
            )
        )
    lines += ["", f"Machine: {meta['machine']}.", f"Command: `{command}`"]
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
