"""BrierLM estimators for CALM and the token-level baseline (DESIGN §2.3).

Both estimators score *windows* of ``block_size`` tokens, each window on its own: at position
``t`` of a window the context is the window's tokens ``[0, t)`` and the outcome is the next four
tokens ``[t, t + 4)`` (Brier-n uses the first n of them). Only positions with all four true
tokens inside the window are scored, so ``t <= block_size - 4``.

**CALM** (:func:`calm_window_scores`). CALM conditions on whole chunks, so it is scored at the
chunk-aligned positions ``t = K, 2K, ...``. At each one the energy head is sampled twice, each
sample decoded (frozen autoencoder, argmax) into K tokens, and the two token sequences are
compared with the truth and with each other by :func:`calm.metrics.brier_from_samples`. With
K >= 4 one step gives the four tokens (the first four of the chunk are used) and the whole
window costs one backbone pass. With K < 4 each sample is continued on its *own* sampled
tokens for ``ceil(4 / K) - 1`` more chunks; all positions of a batch of windows are rolled out
at once from a copy of the window's KV cache (see "Rollouts" below).

**Token baseline** (:func:`ar_window_scores`), lower variance than sampling whole n-grams:
Brier-n = 2 P(y_{1..n}) - sum_x P(x_{1..n})^2 with

* the accuracy term exact, from one teacher-forced pass: P(y_{1..n}) = prod_{j<n} p(y_{j+1} | ctx, y_{1..j});
* the collision term sum_x P(x)^2 = sum_a P(a)^2 S(a), where a ranges over the (n-1)-token
  prefixes and S(a) = sum_v p(v | ctx, a)^2 is exact from the logits after a. Two estimators:

  - ``collision="pair"`` (default, as DESIGN §2.3 specifies): draw two independent prefixes
    a1, a2; the term is 1{a1 = a2} · S(a1). E = sum_a P(a)^2 S(a). Unbiased.
  - ``collision="expected"``: draw one prefix a; the term is P(a) · S(a) (the conditional
    expectation of the pair estimator given a1, i.e. Rao-Blackwellised). Unbiased, never
    higher variance, same cost.

  Brier-1 needs no sampling at all (2 p(y) - sum_v p(v)^2 from the teacher-forced logits).
  Scored at every position ``t = 1 .. block_size - 4`` by default (``stride`` restricts to
  multiples of ``stride``; ``stride = K`` gives exactly CALM's positions).

  Only ONE sampled path is run through the model even for ``"pair"``: the second prefix matters
  only while it agrees with the first, and while it agrees its next-token distribution *is* the
  first path's. So both a1_{j+1} and a2_{j+1} are drawn from the first path's p(. | ctx, a1_{1..j});
  the joint law of everything the estimator uses is that of two independent paths.

**Rollouts** (both models). One pass over the window with a KV cache gives the keys/values of
every context prefix at once. For a group of positions, each rollout row gets a copy of that
cache cut to the group's longest context, with the slots beyond its own context marked invalid
(never attended) and its continuation appended after them with the right RoPE position ids.
So every position's continuation sees exactly its own context, all positions of a batch of
windows advance together (one forward call per continuation step and group, no Python loop over
positions), and no prefix is recomputed. The alternative -- re-running each position's
prefix -- costs O(T) backbone work per position instead of O(1) plus an O(T) cache copy.
Groups bound the memory of the copies (``max_cache_bytes``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm.metrics import brier_from_samples

NGRAM = 4  # BrierLM uses Brier-1..4
COLLISION_ESTIMATORS = ("pair", "expected")
DEFAULT_MAX_CACHE_BYTES = 256 * 2**20


@dataclass
class WindowScores:
    """Per-position Brier-1..4 estimates of a batch of windows.

    estimates: float64 [B, P, 4] (window, position, n).
    context: long [P] -- context length in tokens of each position (the same in every window).
    nll_sum / nll_count: token baseline only, summed next-token negative log-likelihood over
        every prediction inside the windows (T - 1 per window), for cross-entropy.
    """

    estimates: torch.Tensor
    context: torch.Tensor
    nll_sum: float = 0.0
    nll_count: int = 0


# ---------------------------------------------------------------------------------------------
# Positions


def calm_positions(block_size: int, chunk_size: int) -> torch.Tensor:
    """Chunk-aligned positions (context lengths) CALM scores in a window: K, 2K, ... <= T - 4."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    count = (block_size - NGRAM) // chunk_size
    if count < 1:
        raise ValueError(
            f"block_size {block_size} is too small for CALM with K={chunk_size}: need at least "
            f"K + {NGRAM} = {chunk_size + NGRAM} tokens (one chunk of context and {NGRAM} to predict)"
        )
    return chunk_size * torch.arange(1, count + 1)


def ar_positions(block_size: int, stride: int = 1) -> torch.Tensor:
    """Positions (context lengths) the token baseline scores: every t in [1, T - 4], or with
    ``stride > 1`` only the multiples of ``stride`` (``stride = K`` matches CALM's positions)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    start = 1 if stride == 1 else stride
    pos = torch.arange(start, block_size - NGRAM + 1, stride)
    if len(pos) == 0:
        raise ValueError(
            f"block_size {block_size} is too small: need at least {start + NGRAM} tokens "
            f"({start} of context and {NGRAM} to predict)"
        )
    return pos


# ---------------------------------------------------------------------------------------------
# KV-cache forking


def _fork_cache(base, rows: torch.Tensor, prefix_len: int, keep: torch.Tensor, extra: int):
    """A cache of ``len(rows)`` rows: row r copies the first ``prefix_len`` slots of ``base`` row
    ``rows[r]`` and may attend only to the first ``keep[r]`` of them; ``extra`` free slots follow.

    One gather per layer and no zero-filling: slots past ``prefix_len`` hold stale values, but
    they are invalid until the backbone writes them (``KVCache.reserve`` marks them valid at the
    same step the new keys are stored).
    """
    total = prefix_len + extra
    if total > base.max_len:
        raise ValueError(f"cache fork needs {total} slots, the base cache has {base.max_len}")
    fork = copy.copy(base)
    fork.keys = [k[:, :, :total].index_select(0, rows) for k in base.keys]
    fork.values = [v[:, :, :total].index_select(0, rows) for v in base.values]
    slots = torch.arange(total, device=keep.device)
    valid = slots[None, :] < keep[:, None]
    fork.valid = valid & base.valid[:, :total].index_select(0, rows)
    fork.length = prefix_len
    fork.max_len = total
    return fork


def _groups(num_positions: int, rows_per_position: int, bytes_per_row_slot: int, longest: int, budget: int):
    """Split positions 0..P-1 into consecutive groups whose cache copies fit in ``budget`` bytes."""
    per_position = max(1, rows_per_position * bytes_per_row_slot * longest)
    size = max(1, min(num_positions, budget // per_position))
    return [(a, min(a + size, num_positions)) for a in range(0, num_positions, size)]


def _cache_bytes_per_slot(cache) -> int:
    """Bytes one row uses for one slot across all layers (keys and values)."""
    return sum(k[0, :, 0].numel() * k.element_size() for k in cache.keys + cache.values)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _sample(probs: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
    """``num`` independent draws per row of ``probs`` [R, V] -> [R, num] (inverse CDF, float64)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], num, generator=generator, device=probs.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:])
    return idx.clamp_max(probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# CALM


@torch.no_grad()
def calm_window_scores(
    model,
    windows: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> WindowScores:
    """Brier-1..4 estimates of a CALM model on windows [B, T] at chunk-aligned positions.

    ``model`` needs ``config.chunk_size``, ``hidden(chunks_or_tokens, positions=, cache=)``,
    ``sample_chunks(hidden, n, generator=)`` and ``new_cache(rows, max_len)`` (`calm.models.calm.CALM`).
    """
    K = int(model.config.chunk_size)
    device = _device(model)
    windows = windows.to(device)
    B, T = windows.shape
    t = calm_positions(T, K).to(device)  # [P]
    P = len(t)
    y = windows[:, t[:, None] + torch.arange(NGRAM, device=device)]  # [B, P, 4]
    steps = math.ceil(NGRAM / K)  # chunks needed per sample
    cache = model.new_cache(B, P + steps - 1) if steps > 1 else None
    h = model.hidden(windows[:, : P * K], cache=cache)  # [B, P, d]; h[:, i] predicts chunk i + 1
    first = model.sample_chunks(h, 2, generator=generator)  # [B, P, 2, K]
    if steps == 1:
        samples = first[..., :NGRAM]
    else:
        per_slot = _cache_bytes_per_slot(cache)
        parts = []
        for a, b in _groups(P, 2 * B, per_slot, P, max_cache_bytes):
            g = b - a
            # rows ordered (window, position, sample)
            rows = torch.arange(B, device=device).repeat_interleave(2 * g)
            chunk_idx = (
                torch.arange(a, b, device=device).repeat_interleave(2).repeat(B)
            )  # i: sees chunks 0..i
            fork = _fork_cache(cache, rows, b, chunk_idx + 1, steps - 1)
            cur = first[:, a:b].reshape(B * g * 2, K)
            pos = chunk_idx + 1  # the sampled chunk sits at chunk position i + 1
            out = [cur]
            for _ in range(steps - 1):
                hr = model.hidden(cur[:, None, :], positions=pos[:, None], cache=fork)  # [rows, 1, d]
                cur = model.sample_chunks(hr[:, 0], 1, generator=generator)[:, 0]  # [rows, K]
                out.append(cur)
                pos = pos + 1
            parts.append(torch.cat(out, -1)[:, :NGRAM].view(B, g, 2, NGRAM))
        samples = torch.cat(parts, 1)
    est = brier_from_samples(samples[..., 0, :], samples[..., 1, :], y).double()
    return WindowScores(est, t.cpu())


# ---------------------------------------------------------------------------------------------
# Token baseline


@torch.no_grad()
def ar_window_scores(
    model,
    windows: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    stride: int = 1,
    collision: str = "pair",
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> WindowScores:
    """Brier-1..4 estimates of a token model on windows [B, T] (module docstring), plus its NLL.

    ``model`` needs ``logits(tokens, positions=None, valid=None, cache=None) -> [B, T, V]`` and
    ``new_cache(rows, max_len)`` (`calm.models.ar.TokenTransformer`).
    """
    if collision not in COLLISION_ESTIMATORS:
        raise ValueError(f"collision must be one of {COLLISION_ESTIMATORS}, got {collision!r}")
    device = _device(model)
    windows = windows.to(device)
    B, T = windows.shape
    t = ar_positions(T, stride).to(device)  # [P] context lengths
    P = len(t)
    cache = model.new_cache(B, T)
    logp = F.log_softmax(model.logits(windows, cache=cache).float(), -1)  # [B, T, V]
    # tok_lp[:, s] = log p(w[s + 1] | w[:s + 1])
    tok_lp = logp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0]  # [B, T-1]
    nll_sum = -float(tok_lp.double().sum())
    offsets = torch.arange(NGRAM, device=device)
    accuracy = 2 * tok_lp[:, t[:, None] - 1 + offsets].double().cumsum(-1).exp()  # [B, P, 4]

    p0 = logp[:, t - 1].exp()  # [B, P, V]: next-token distribution at each position
    del logp
    collide = torch.zeros(B, P, NGRAM, dtype=torch.float64, device=device)
    collide[..., 0] = p0.double().square().sum(-1)  # exact for n = 1
    pair = collision == "pair"
    draws = _sample(p0.reshape(B * P, -1), 2 if pair else 1, generator).view(B, P, -1)
    per_slot = _cache_bytes_per_slot(cache)
    for a, b in _groups(P, B, per_slot, int(t[-1]) + NGRAM - 1, max_cache_bytes):
        g = b - a
        rows = torch.arange(B, device=device).repeat_interleave(g)  # rows ordered (window, position)
        ctx = t[a:b].repeat(B)
        fork = _fork_cache(cache, rows, int(t[b - 1]), ctx, NGRAM - 1)
        first = draws[:, a:b].reshape(B * g, -1)
        cur = first[:, 0]  # the followed path
        agree = first[:, 0] == first[:, -1]  # pair: the two prefixes agree so far
        prob = p0[:, a:b].reshape(B * g, -1).gather(-1, cur[:, None])[:, 0].double()  # expected: P(prefix)
        pos = ctx.clone()
        for j in range(1, NGRAM):
            p = F.softmax(model.logits(cur[:, None], positions=pos[:, None], cache=fork)[:, 0].float(), -1)
            square = p.double().square().sum(-1)
            weight = agree.double() if pair else prob
            collide[:, a:b, j] = (weight * square).view(B, g)
            if j == NGRAM - 1:
                break
            nxt = _sample(p, 2 if pair else 1, generator)
            cur = nxt[:, 0]
            if pair:
                agree = agree & (nxt[:, 0] == nxt[:, 1])
            else:
                prob = prob * p.gather(-1, cur[:, None])[:, 0].double()
            pos = pos + 1
    return WindowScores(accuracy - collide, t.cpu(), nll_sum, B * (T - 1))


def window_scores(model, windows: torch.Tensor, **kwargs) -> WindowScores:
    """Dispatch on ``model.config.kind`` ("calm" or "ar")."""
    kind = getattr(model.config, "kind", None)
    if kind == "calm":
        kwargs.pop("stride", None)
        kwargs.pop("collision", None)
        return calm_window_scores(model, windows, **kwargs)
    if kind == "ar":
        return ar_window_scores(model, windows, **kwargs)
    raise ValueError(f"BrierLM needs a CALM or token (ar) model, got kind {kind!r}")
