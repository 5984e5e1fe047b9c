"""The result of a BrierLM evaluation: what a scoring pass counts besides the Brier sums
(`_Stats`), the JSON-ready record `calm.evaluate.evaluate_model` returns (`_result`: estimates,
standard errors, the position rule and the context lengths scored) and its text (`format_result`).
"""

from __future__ import annotations

import math
from typing import Any

from calm.brier import NGRAM
from calm.metrics import BrierAccumulator


class _Stats:
    """What a scoring pass accumulates besides the Brier sums (additive across workers)."""

    def __init__(self):
        self.windows = 0
        self.positions = 0
        self.context_sum = 0.0
        self.context_min = math.inf
        self.context_max = 0
        self.nll_sum = 0.0
        self.nll_count = 0

    def add(self, scores, n_windows: int) -> None:
        ctx = scores.context
        self.windows += n_windows
        self.positions += n_windows * len(ctx)
        self.context_sum += n_windows * float(ctx.double().sum())
        self.context_min = min(self.context_min, int(ctx.min()))
        self.context_max = max(self.context_max, int(ctx.max()))
        self.nll_sum += scores.nll_sum
        self.nll_count += scores.nll_count


def _brier_lm_se(acc: BrierAccumulator) -> float | None:
    """Delta-method standard error of BrierLM (None unless every mean Brier-n is > 0)."""
    mu, cov = acc.means(), acc.covariance()
    if not bool((mu > 0).all()) or bool((acc.counts < 2).any()):
        return None
    var_log = float((cov / (mu[:, None] * mu[None, :])).sum()) / len(mu) ** 2
    return float(acc.brier_lm()) * math.sqrt(max(var_log, 0.0))


def _result(
    model,
    acc: BrierAccumulator,
    stats: _Stats,
    *,
    block_size: int,
    seed: int,
    ar_stride: int,
    collision: str,
    level: float,
    seconds: float,
) -> dict[str, Any]:
    c = model.config
    out: dict[str, Any] = {"kind": c.kind, "block_size": block_size}
    if c.kind == "calm":
        out["chunk_size"] = int(c.chunk_size)
        out["positions_rule"] = (
            f"chunk-aligned: t = {c.chunk_size}, {2 * c.chunk_size}, ... <= {block_size - NGRAM}"
        )
        out["estimator"] = "two head samples per position, decoded by the frozen autoencoder (argmax)"
        head = getattr(model, "head", None)
        if hasattr(head, "describe"):
            out["head"] = head.describe()
    else:
        out["positions_rule"] = (
            f"every position t = 1 .. {block_size - NGRAM}"
            if ar_stride == 1
            else f"every {ar_stride}th position t = {ar_stride}, {2 * ar_stride}, ... <= {block_size - NGRAM}"
        )
        out["ar_stride"] = ar_stride
        out["estimator"] = f"exact teacher-forced accuracy term, collision term '{collision}'"
        out["collision"] = collision
    out.update(
        {
            "windows": stats.windows,
            "tokens": stats.windows * block_size,
            "positions": stats.positions,
            "context_tokens": {
                "min": int(stats.context_min),
                "max": int(stats.context_max),
                "mean": stats.context_sum / max(stats.positions, 1),
            },
        }
    )
    summary = acc.summary(level)
    for n in range(1, NGRAM + 1):
        out[f"brier_{n}"] = summary[f"brier_{n}"]
        out[f"brier_{n}_se"] = summary[f"brier_{n}_se"]
    out["brier_lm"] = summary["brier_lm"]
    out["brier_lm_se"] = _brier_lm_se(acc)
    out["brier_lm_ci"] = summary.get("brier_lm_ci")
    out["ci_level"] = level
    if stats.nll_count:
        ce = stats.nll_sum / stats.nll_count
        out["ce"] = ce
        out["ppl"] = math.exp(min(ce, 700.0))
        out["ce_tokens"] = stats.nll_count
    out["seed"] = seed
    out["seconds"] = seconds
    out["tokens_per_s"] = out["tokens"] / max(seconds, 1e-9)
    out["positions_per_s"] = stats.positions / max(seconds, 1e-9)
    return out


def _num(x: float, digits: int = 4) -> str:
    """Fixed-point for ordinary values, scientific for the tiny ones an untrained model gets."""
    return f"{x:.{digits}f}" if x == 0 or abs(x) >= 10 ** (1 - digits) else f"{x:.{digits - 1}e}"


def format_result(result: dict[str, Any]) -> str:
    """Human-readable report of an `evaluate_model` result (LM kinds)."""
    kind = {"calm": f"CALM (K = {result.get('chunk_size')})", "ar": "token baseline"}[result["kind"]]
    head = result.get("head")
    if head and head.get("name") != "energy":
        kind += f", {head['name']} head: " + ", ".join(
            f"{k} {head[k]}" for k in ("steps", "solver", "evals_per_sample") if k in head
        )
    ctx = result["context_tokens"]
    lines = [
        f"{kind} on {result.get('data', {}).get('source', 'data')}",
        f"  block size   {result['block_size']} tokens per window (each scored on its own); "
        f"{result['windows']:,} windows = {result['tokens']:,} tokens",
        f"  positions    {result['positions']:,} scored ({result['positions_rule']}); "
        f"context {ctx['min']}..{ctx['max']} tokens, mean {ctx['mean']:.1f}",
    ]
    for n in range(1, NGRAM + 1):
        lines.append(f"  Brier-{n}      {_num(result[f'brier_{n}'])} ± {_num(result[f'brier_{n}_se'])}")
    bl = f"  BrierLM      {_num(result['brier_lm'], 3)}"
    if result.get("brier_lm_se") is not None:
        bl += f" ± {_num(result['brier_lm_se'], 3)}"
    if result.get("brier_lm_ci"):
        lo, hi = result["brier_lm_ci"]
        bl += f"   ({100 * result['ci_level']:g}% CI {_num(lo, 3)} .. {_num(hi, 3)})"
    lines.append(bl)
    if "ce" in result:
        lines.append(
            f"  cross-entropy {result['ce']:.4f} nats/token, perplexity {result['ppl']:.2f} "
            f"({result['ce_tokens']:,} predictions)"
        )
    lines.append(
        f"  speed        {result['tokens_per_s']:,.0f} tokens/s ({result['seconds']:.1f} s, seed {result['seed']})"
    )
    return "\n".join(lines)


__all__ = ["format_result"]
