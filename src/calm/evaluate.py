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
validation cross-entropy. Reading the data and cutting it into windows is `calm.eval_data`; the
result record and its text are `calm.eval_result` (both re-exported here).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from calm.brier import COLLISION_ESTIMATORS, DEFAULT_MAX_CACHE_BYTES, NGRAM, window_scores
from calm.data import check_token_ids, make_windows
from calm.eval_data import DEFAULT_BLOCK_SIZE, _as_windows, _is_prepared, load_eval_tokens  # noqa: F401 - re-exported
from calm.eval_result import _brier_lm_se, _num, _result, _Stats, format_result  # noqa: F401 - re-exported
from calm.metrics import BrierAccumulator

DEFAULT_BATCH_SIZE = 8


# ---------------------------------------------------------------------------------------------
# Block sizes a model can be scored at


def model_context_tokens(model) -> int:
    """The longest window (in tokens) the model can condition on."""
    c = model.config
    if c.kind == "calm":
        return int(c.max_seq_len) * int(c.chunk_size)
    return int(c.max_seq_len)


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


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "brier_eval_fn",
    "check_block_size",
    "evaluate_model",
    "format_result",
    "load_eval_tokens",
    "make_windows",
]
