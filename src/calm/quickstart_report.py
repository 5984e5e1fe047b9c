"""The quickstart's report: ``report.md`` with plots and a written conclusion from its own numbers.

`write_report(summary, report_dir, runs, flops)` writes the markdown and the PNG plots;
`conclusions(summary, runs)` is the short verdict at the top, computed, never canned: which
model scored better at what training compute, what a BrierLM of 0 means when it comes from a
clamped Brier-n, whether a validation loss turned up (overfitting), why the autoencoder's
validation loss sits below its training loss, and how the samples were drawn.
"""

from __future__ import annotations

from pathlib import Path


def _fmt(x: float, digits: int = 3) -> str:
    """A number without the "-0.000" of a tiny negative value."""
    s = f"{x:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def brier_curve(run_dir: Path, flops_per_step: float) -> list[dict]:
    """Every evaluation of a run that logged BrierLM: training FLOPs so far, BrierLM with its CI
    and Brier-1..4 (`calm.report.plot_brier_vs_flops` draws them)."""
    from calm.train_log import read_metrics

    out = []
    for r in read_metrics(run_dir):
        if r.get("split") != "val" or "brier_lm" not in r:
            continue
        point = {"flops": max(r["step"], 1) * flops_per_step, "step": r["step"], "brier_lm": r["brier_lm"]}
        for k in ("brier_lm_ci_low", "brier_lm_ci_high", *(f"brier_{n}" for n in range(1, 5))):
            if r.get(k) is not None:
                point[k] = r[k]
        out.append(point)
    return out


def _val_turn(run_dir: Path) -> tuple[int, float, int, float] | None:
    """(best step, best val loss, last step, last val loss) if the last is > 1% above the best."""
    from calm.train_log import read_metrics

    vals = [
        (r["step"], r["val_loss"])
        for r in read_metrics(run_dir)
        if r.get("split") == "val" and "val_loss" in r
    ]
    if len(vals) < 3:
        return None
    best = min(vals, key=lambda v: v[1])
    last = vals[-1]
    if last[1] > best[1] + 0.01 * abs(best[1]) and best[0] != last[0]:
        return best[0], best[1], last[0], last[1]
    return None


def conclusions(summary: dict, runs: dict[str, Path]) -> list[str]:
    """The report's verdict, one bullet per finding, from the summary's own numbers."""
    sc, cfg, fl = summary["scores"], summary["configs"], summary["flops"]
    K = cfg["calm"]["chunk_size"]
    tokens = {n: summary["train_steps"][n] * summary["tokens_per_step"] for n in ("calm", "ar")}
    total = {n: tokens[n] * fl[n]["train_flops_per_token"] for n in ("calm", "ar")}
    c, a = sc["calm"], sc["ar"]
    lines = []
    ratio = total["calm"] / total["ar"]
    better = "CALM" if c["brier_lm"] > a["brier_lm"] else "the Transformer"
    lines.append(
        f"- **BrierLM: CALM {c['brier_lm']:.2f}, Transformer {a['brier_lm']:.2f}** ({better} is better), with CALM "
        f"trained on {ratio:.2g}× the Transformer's training FLOPs ({total['calm']:.2g} vs {total['ar']:.2g}; "
        f"{summary['train_steps']['calm']} vs {summary['train_steps']['ar']} steps of "
        f"{summary['tokens_per_step']:,} tokens)."
    )
    clamped = [n for n in range(1, 5) if c[f"brier_{n}"] <= 0]
    if clamped:
        lines.append(
            f"- CALM's Brier-{', '.join(map(str, clamped))} "
            f"{'is' if len(clamped) == 1 else 'are'} at or below 0 (no better than chance at that length), "
            "and BrierLM, a geometric mean with each Brier-n clamped at 0 first, is then 0 whatever the "
            "other terms: compare Brier-1 instead."
        )
    if a["brier_1"] > 0 and c["brier_1"] > 0:
        lines.append(
            f"- Next-token skill: CALM's Brier-1 is {_fmt(c['brier_1'])} against the Transformer's "
            f"{_fmt(a['brier_1'])} ({c['brier_1'] / a['brier_1']:.0%} of it)."
        )
    elif c["brier_1"] <= 0:
        lines.append(
            f"- CALM has no next-token skill yet: its Brier-1 is {_fmt(c['brier_1'])} (its two samples agree "
            f"more often than they are right), against the Transformer's {_fmt(a['brier_1'])}."
        )
    for name, label in (("calm", "CALM"), ("ar", "Transformer")):
        turn = _val_turn(runs[name])
        if turn:
            s0, v0, s1, v1 = turn
            lines.append(
                f"- {label}'s validation loss was lowest at step {s0} ({v0:.4g}) and rose to {v1:.4g} by step {s1}: "
                "it overfits this small corpus; fewer steps (or more text) would score better."
            )
    ae = summary["autoencoder"]["train"]
    if ae.get("loss") is not None and ae.get("val_loss") is not None and ae["val_loss"] < ae["loss"]:
        lines.append(
            f"- The autoencoder's validation loss ({ae['val_loss']:.3g}) is below its training loss "
            f"({ae['loss']:.3g}) by design: training masks 15% of the input tokens and drops out latent "
            "dimensions, validation decodes the posterior mean of clean input."
        )
    st = summary.get("sample_stats", {}).get("calm", {})
    for temp, s in st.items():
        if s.get("row_steps"):
            lines.append(
                f"- CALM samples at {temp}: the exact sampler reached its bound of {s['max_draws']} draws in "
                f"{s['hit_limit']} of {s['row_steps']} row-steps and used the batch approximation over those draws "
                f"there ({s['draws_per_row_step']:.0f} draws per chunk on average): a model this uncertain rarely "
                "draws the same chunk twice."
            )
    lines.append(
        f"- Decoding: CALM makes {K} tokens per step (K = {K}); its inference FLOPs per token are "
        f"{fl['calm']['inference_flops_per_token']:.3g} against the Transformer's {fl['ar']['inference_flops_per_token']:.3g}."
    )
    return lines


def write_report(summary: dict, report_dir: Path, runs: dict[str, Path], flops: dict) -> Path:
    """report.md plus three PNG plots in `report_dir`."""
    from calm.eval_autoencoder import format_reconstruction
    from calm.report import plot_brier_vs_flops, plot_reconstruction_vs_noise, plot_training_curves

    report_dir.mkdir(parents=True, exist_ok=True)
    cfg = summary["configs"]
    K = cfg["calm"]["chunk_size"]
    plot_training_curves(
        {
            "autoencoder": (runs["autoencoder"], "K·CE + β·KL"),
            "CALM": (runs["calm"], "energy loss"),
            "Transformer": (runs["ar"], "cross-entropy"),
        },
        report_dir / "training_curves.png",
    )
    sc = summary["scores"]
    block = sc["calm"]["block_size"]
    tps = summary["tokens_per_step"]
    plot_brier_vs_flops(
        {
            f"CALM (K={K})": brier_curve(runs["calm"], flops["calm"]["train_flops_per_token"] * tps),
            "Transformer": brier_curve(runs["ar"], flops["ar"]["train_flops_per_token"] * tps),
        },
        report_dir / "brier_vs_flops.png",
        block,
    )
    plot_reconstruction_vs_noise(summary["autoencoder"]["reconstruction"], report_dir / "ae_noise.png")

    rows = []
    for name, label in (("calm", f"CALM (K={K})"), ("ar", "Transformer")):
        s = sc[name]
        ci = s.get("brier_lm_ci", [float("nan"), float("nan")])
        rows.append(
            f"| {label} | {s['brier_lm']:.2f} | [{ci[0]:.2f}, {ci[1]:.2f}] | "
            + " | ".join(f"{_fmt(s[f'brier_{n}'])}" for n in range(1, 5))
            + f" | {summary['flops'][name]['train_flops_per_token']:.3g} | "
            f"{summary['flops'][name]['inference_flops_per_token']:.3g} |"
        )
    d = summary["data"]
    t = summary["timings_s"]
    head_blocks = cfg["calm"]["head_layers"] or max(1, cfg["calm"]["num_layers"] // 4)
    lines = [
        "# CALM quickstart report",
        "",
        f"Data: {d['source']} — {d['train_tokens']:,} training tokens, {d['val_tokens']:,} held-out tokens, "
        f"byte-level BPE vocabulary of {d['vocab_size']:,}. Setting: `{summary['setting']}`.",
        "",
        f"Backbone for both models: d {cfg['ar']['d_model']}, {cfg['ar']['num_layers']} layers, "
        f"{cfg['ar']['num_heads']} heads, SwiGLU {cfg['ar']['ffn_dim']}. CALM: K = {K}, "
        f"latent {cfg['calm']['latent_dim']}, {head_blocks} energy-head block(s), head initialisation "
        f"`{cfg['calm'].get('head_init', 'zero')}` (the small-scale recipe, docs/small_scale_study.md).",
        "",
        "## Conclusion",
        "",
        *conclusions(summary, runs),
        "",
        "## BrierLM on held-out text",
        "",
        f"Evaluation context: {block} tokens per window; {sc['calm']['positions']:,} CALM positions, "
        f"{sc['ar']['positions']:,} Transformer positions. Higher is better.",
        "",
        "| model | BrierLM | 95% CI | Brier-1 | Brier-2 | Brier-3 | Brier-4 | train FLOPs/token | inference FLOPs/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Transformer cross-entropy: {sc['ar'].get('ce', float('nan')):.3f} nats/token "
        f"(perplexity {sc['ar'].get('ppl', float('nan')):.1f}).",
        "",
        "![BrierLM and Brier-1..4 against training FLOPs](brier_vs_flops.png)",
        "",
        "## Autoencoder",
        "",
        format_reconstruction(summary["autoencoder"]["reconstruction"]),
        "",
        "![accuracy against latent noise](ae_noise.png)",
        "",
        "## Training curves",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Samples",
        "",
    ]
    stats = summary.get("sample_stats", {})
    for name, label in (("calm", "CALM"), ("ar", "Transformer")):
        for temp, texts in summary["samples"][name].items():
            how = "softmax(logits / T)" if name == "ar" else "one head sample per chunk"
            s = stats.get(name, {}).get(temp)
            if name == "calm" and s and s.get("row_steps"):
                exact = s["row_steps"] - s["hit_limit"]
                how = (
                    f"exact sampler in {exact} of {s['row_steps']} row-steps, the batch approximation over "
                    f"{s['max_draws']} draws in the other {s['hit_limit']}"
                )
            lines.append(f"**{label}, {temp}** ({how})")
            lines.append("")
            for text in texts:
                lines.append("> " + text.replace("\n", " ⏎ ").strip())
                lines.append("")
    total = sum(v for k, v in t.items() if k != "total")
    lines += [
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in t.items() if k != "total"),
        f"| **total** | **{total:.1f}** |",
        "",
        f"Reproduce: `calm quickstart{' --tiny' if summary['setting'] == 'tiny' else ''}`",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
