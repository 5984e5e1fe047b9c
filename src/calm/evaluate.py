"""`calm eval`: BrierLM for CALM and the token baseline, reconstruction for autoencoders.

Language models are scored on consecutive, non-overlapping windows of ``block_size`` tokens
(default 256, the same for both kinds), each window on its own: at position t the context is
the window's first t tokens. The estimators are in `calm.brier`:

* CALM: chunk-aligned positions t = K, 2K, ... <= block_size - 4 (it cannot condition on half a
  chunk); two head samples per position, decoded by the frozen autoencoder.
* token baseline: every position t = 1 .. block_size - 4, exact accuracy term, sampled
  collision term; also cross-entropy and perplexity over all next-token predictions.

Context: both kinds see the same windows, so the same block size bounds every context, and the
context lengths they are scored at are spread evenly over the same range [1, block_size - 4]
(CALM on a grid of step K, the baseline on every token): their mean context differs by less than
K / 2 tokens. The baseline's extra positions are a finer sample of the same range, not easier
ones (its positions with the shortest contexts, t < K, are the hardest). ``ar_stride=K``
(``--ar-stride K``) scores the baseline at exactly CALM's positions, at a higher variance.
Every result states the block size, the position rule and the context lengths.

`evaluate_model` is the Python entry point (used by the quickstart); `brier_eval_fn` makes the
``eval_fn(model, step)`` hook of `calm.train.train`, so training logs BrierLM next to the
validation cross-entropy.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm.brier import COLLISION_ESTIMATORS, DEFAULT_MAX_CACHE_BYTES, NGRAM, window_scores
from calm.data import check_token_ids, make_windows
from calm.metrics import BrierAccumulator

DEFAULT_BLOCK_SIZE = 256
DEFAULT_BATCH_SIZE = 8


# ---------------------------------------------------------------------------------------------
# Windows


def model_context_tokens(model) -> int:
    """The longest window (in tokens) the model can condition on."""
    c = model.config
    if c.kind == "calm":
        return int(c.max_seq_len) * int(c.chunk_size)
    return int(c.max_seq_len)


def _as_windows(
    data, block_size: int | None, max_tokens: int | None, default_block: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Windows [N, T] of `data`; a flat stream is cut at ``block_size or default_block``."""
    if hasattr(data, "tokens") and hasattr(data, "split"):  # calm.data.TokenShards: read only what is used
        return make_windows(data.tokens, block_size or default_block, max_tokens)
    if not torch.is_tensor(data) and not isinstance(data, np.ndarray):
        data = np.asarray(data)
    if data.ndim == 2:
        t = data if torch.is_tensor(data) else torch.from_numpy(np.asarray(data).astype(np.int64))
        if block_size is not None and block_size != t.shape[1]:
            raise ValueError(f"windows have {t.shape[1]} tokens but block_size={block_size} was asked for")
        if max_tokens is not None:
            t = t[: int(max_tokens) // t.shape[1]]
        if len(t) == 0:
            raise ValueError(
                "no windows to evaluate" + (f" within max_tokens={max_tokens}" if max_tokens else "")
            )
        return t.long()
    if data.ndim != 1:
        raise ValueError(f"expected a flat token stream or windows [N, T], got shape {tuple(data.shape)}")
    return make_windows(data, block_size or default_block, max_tokens)


def check_block_size(model, block_size: int) -> None:
    """Clear errors for a block size the model cannot be scored at."""
    limit = model_context_tokens(model)
    if block_size > limit:
        unit = (
            f" ({model.config.max_seq_len} chunks of {model.config.chunk_size})"
            if model.config.kind == "calm"
            else ""
        )
        raise ValueError(
            f"block size {block_size} exceeds the model's context of {limit} tokens{unit}; "
            f"use --block-size {limit} or less"
        )
    least = (model.config.chunk_size if model.config.kind == "calm" else 1) + NGRAM
    if block_size < least:
        raise ValueError(
            f"block size {block_size} is too small: need at least {least} tokens "
            f"(context plus the {NGRAM} tokens Brier-{NGRAM} predicts)"
        )


# ---------------------------------------------------------------------------------------------
# Scoring


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


def _score(
    model,
    windows: torch.Tensor,
    *,
    seed: int,
    batch_size: int,
    ar_stride: int,
    collision: str,
    max_cache_bytes: int,
    progress: bool,
    shared_prefix: bool | None = None,
) -> tuple[BrierAccumulator, _Stats]:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    acc, stats = BrierAccumulator(NGRAM), _Stats()
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=windows.numel(),
        unit="tok",
        unit_scale=True,
        desc=f"eval {model.config.kind}",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for batch in windows.split(max(1, int(batch_size))):
            scores = window_scores(
                model,
                batch,
                generator=gen,
                stride=ar_stride,
                collision=collision,
                max_cache_bytes=max_cache_bytes,
                shared_prefix=shared_prefix,
            )
            acc.add(scores.estimates)
            stats.add(scores, len(batch))
            bar.update(batch.numel())
            if stats.positions > 1:
                bar.set_postfix(brier_lm=f"{acc.brier_lm():.3g}")
    finally:
        bar.close()
        model.train(was_training)
    return acc, stats


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


def evaluate_model(
    model,
    data,
    *,
    block_size: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ar_stride: int = 1,
    collision: str = "pair",
    level: float = 0.95,
    progress: bool = False,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    shared_prefix: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model on tokens; returns a plain dict (JSON-ready).

    data: a flat token stream (1-D tensor / array, or a `calm.data.TokenShards`), cut into
        consecutive windows of ``block_size`` tokens (default: 256, or the model's context if
        that is shorter, as in `calm eval`); or windows [N, T] as they are (then ``block_size``
        defaults to T).
    max_tokens: evaluate at most this many tokens (whole windows).
    seed: the samples drawn (head samples, rollouts) come from a generator seeded with it, so a
        result is reproducible on the same device.
    max_cache_bytes / shared_prefix: memory bound of a rollout group, and the rollout attention
        path (see `calm.brier`; None picks the shared-prefix path for our models).

    For CALM and the token baseline: brier_1..4 with standard errors (``brier_n_se``), brier_lm
    with its delta-method standard error and a ``level`` confidence interval (`BrierAccumulator`),
    block_size, windows, tokens, positions, the context lengths scored, tokens per second; the
    baseline also ce (nats/token) and ppl. For an autoencoder: `reconstruction_report`.
    """
    kind = getattr(model.config, "kind", None)
    if kind == "autoencoder":
        from calm.eval_autoencoder import reconstruction_report

        flat = _as_windows(data, block_size, max_tokens).reshape(-1)
        report = reconstruction_report(model, flat, seed=seed, progress=progress)
        return {"kind": "autoencoder", **report}
    if kind not in ("calm", "ar"):
        raise ValueError(f"cannot evaluate a model of kind {kind!r}")
    if collision not in COLLISION_ESTIMATORS:
        raise ValueError(f"collision must be one of {COLLISION_ESTIMATORS}, got {collision!r}")
    # as `calm eval`: a flat stream's default window follows the model's context
    windows = _as_windows(data, block_size, max_tokens, min(DEFAULT_BLOCK_SIZE, model_context_tokens(model)))
    T = windows.shape[1]
    check_block_size(model, T)
    check_token_ids(windows, int(model.config.vocab_size), "evaluation data (the model's vocabulary)")
    t0 = time.perf_counter()
    acc, stats = _score(
        model,
        windows,
        seed=seed,
        batch_size=batch_size,
        ar_stride=ar_stride,
        collision=collision,
        max_cache_bytes=max_cache_bytes,
        progress=progress,
        shared_prefix=shared_prefix,
    )
    return _result(
        model,
        acc,
        stats,
        block_size=T,
        seed=seed,
        ar_stride=ar_stride,
        collision=collision,
        level=level,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# Training hook


def brier_eval_fn(
    val_windows: torch.Tensor,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ar_stride: int = 1,
    collision: str = "pair",
) -> Callable[[Any, int], dict[str, float]]:
    """An ``eval_fn(model, step) -> dict`` for `calm.train.train` that logs BrierLM.

    val_windows: LongTensor [N, T] (T is the evaluation block size), e.g. the windows the loop
    computes the validation loss on, so the two are measured on the same text. The same seed at
    every call: differences between steps are the model's, not the sampling noise's. Under
    torchrun each rank scores an equal share of the windows and the sums are all-reduced.

    The returned dict holds floats only: brier_lm, brier_lm_ci_low/high, brier_1..4 and their
    ``_se``, brier_positions and brier_block_size (plus brier_ce for the token baseline).
    """
    windows = _as_windows(val_windows, None, max_tokens)

    def eval_fn(model, step: int) -> dict[str, float]:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        mine = windows
        rank_seed = seed
        if distributed:
            world, rank = dist.get_world_size(), dist.get_rank()
            usable = len(windows) - len(windows) % world
            if usable == 0:
                raise ValueError(f"{len(windows)} validation windows cannot be shared by {world} processes")
            mine = windows[:usable][rank::world]
            rank_seed = seed + 7919 * rank
        check_block_size(model, windows.shape[1])
        with torch.no_grad():
            acc, stats = _score(
                model,
                mine,
                seed=rank_seed,
                batch_size=batch_size,
                ar_stride=ar_stride,
                collision=collision,
                max_cache_bytes=DEFAULT_MAX_CACHE_BYTES,
                progress=False,
            )
        if distributed:
            device = next(model.parameters()).device
            state = acc.to_tensor().to(device)
            extra = torch.tensor(
                [stats.positions, stats.nll_sum, stats.nll_count], dtype=torch.float64, device=device
            )
            dist.all_reduce(state)
            dist.all_reduce(extra)
            acc = BrierAccumulator.from_tensor(state.cpu())
            stats.positions, stats.nll_sum, stats.nll_count = int(extra[0]), float(extra[1]), int(extra[2])
        summary = acc.summary()
        out = {"brier_lm": summary["brier_lm"]}
        if "brier_lm_ci" in summary:
            out["brier_lm_ci_low"], out["brier_lm_ci_high"] = summary["brier_lm_ci"]
        for n in range(1, NGRAM + 1):
            out[f"brier_{n}"] = summary[f"brier_{n}"]
            out[f"brier_{n}_se"] = summary[f"brier_{n}_se"]
        out["brier_positions"] = float(stats.positions)
        out["brier_block_size"] = float(windows.shape[1])
        if stats.nll_count:
            out["brier_ce"] = stats.nll_sum / stats.nll_count
        return out

    return eval_fn


# ---------------------------------------------------------------------------------------------
# Reading evaluation data


def _is_prepared(path: Path) -> bool:
    from calm.data import META_FILE

    return path.is_dir() and (path / META_FILE).is_file()


def load_eval_tokens(
    paths: Iterable[str | os.PathLike],
    tokenizer=None,
    *,
    split: str = "val",
    max_tokens: int | None = None,
    text_field: str = "text",
    doc_split: str = "auto",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A flat token stream from a prepared data directory (its ``split``) or from text/JSONL
    files and directories (tokenized with ``tokenizer``, documents each followed by eot).

    Returns (LongTensor [N], description). Stops reading once ``max_tokens`` are collected.
    """
    from calm.data import DataError, TokenShards, encode_documents, read_documents, resolve_inputs

    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no evaluation data given (--data PATH)")
    for p in paths:
        if not p.exists():
            raise DataError(f"evaluation data not found: {p}")
    prepared = [p for p in paths if _is_prepared(p)]
    if prepared:
        if len(paths) > 1:
            raise DataError("give either one prepared data directory or text/JSONL files, not both / several")
        shards = TokenShards(prepared[0], split)
        n = len(shards) if max_tokens is None else min(len(shards), int(max_tokens))
        tokens = torch.from_numpy(shards.read(0, n).astype(np.int64))
        desc = {
            "source": str(prepared[0]),
            "format": "prepared",
            "split": split,
            "data_vocab_size": shards.vocab_size,
        }
        if tokenizer is not None:
            try:
                same = shards.tokenizer().to_str() == tokenizer.to_str()
            except Exception:  # noqa: BLE001 - a data set without a readable tokenizer: cannot compare
                same = None
            desc["same_tokenizer"] = same
            if same is False:
                warnings.warn(
                    f"{prepared[0]} was tokenized with a different tokenizer than the model's; "
                    "the scores are only meaningful if the ids mean the same tokens",
                    stacklevel=2,
                )
    else:
        if tokenizer is None:
            raise DataError(
                "this checkpoint has no tokenizer, so text files cannot be tokenized; "
                "give a prepared data directory (calm prepare) instead"
            )
        files = resolve_inputs(paths, "val")
        docs_read = [0]

        def documents():
            for f in files:
                for doc in read_documents(f, text_field=text_field, doc_split=doc_split):
                    docs_read[0] += 1
                    yield doc

        ids, _ = encode_documents(tokenizer, documents(), max_tokens=max_tokens)
        tokens = torch.from_numpy(ids)
        docs = docs_read[0]
        desc = {
            "source": ", ".join(map(str, paths)),
            "format": "text",
            "files": len(files),
            "documents": docs,
        }
    if tokens.numel() == 0:
        raise DataError(f"no tokens to evaluate in {', '.join(map(str, paths))}")
    desc["tokens_read"] = int(tokens.numel())
    return tokens, desc


# ---------------------------------------------------------------------------------------------
# Command line



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


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "brier_eval_fn",
    "check_block_size",
    "evaluate_model",
    "format_result",
    "load_eval_tokens",
    "make_windows",
]
