"""BrierLM estimators for CALM and the token-level baseline (DESIGN §2.3).

Both estimators score *windows* of ``block_size`` tokens, each window on its own: at position
``t`` of a window the context is the window's tokens ``[0, t)`` and the outcome is the next four
tokens ``[t, t + 4)`` (Brier-n uses the first n of them). Only positions with all four true
tokens inside the window are scored, so ``t <= block_size - 4``.

**CALM** (:func:`calm_window_scores`). CALM conditions on whole chunks, so it is scored at the
chunk-aligned positions ``t = K, 2K, ...``. At each one the head (energy, flow or diffusion:
any `calm.models.head.GenerativeHead`) is sampled twice, each
sample decoded (frozen autoencoder, argmax) into K tokens, and the two token sequences are
compared with the truth and with each other by :func:`calm.metrics.brier_from_samples`. With
K >= 4 one step gives the four tokens (the first four of the chunk are used) and the whole
window costs one backbone pass. With K < 4 each sample is continued on its *own* sampled
tokens for ``ceil(4 / K) - 1`` more chunks; all positions of a batch of windows are rolled out
at once from the window's KV cache, shared as a prefix (or forked; see `calm.brier_rollouts`).

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

**Rollouts** (both models): the continuations of all positions of a batch of windows advance
together from the window's KV cache, one forward call per step, either reading the cache in
place (shared prefix, our models) or from per-query copies (forked caches, any model with
the interface); `calm.brier_rollouts` holds that machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calm.brier_rollouts import _ar_step, _bytes_per_query, _calm_step, _query_groups, _Rollout, _use_shared

# Re-exported (``x as x``): every rollout helper stays importable from calm.brier (tests use _fork_cache).
from calm.brier_rollouts import _cache_bytes_per_slot as _cache_bytes_per_slot
from calm.brier_rollouts import _fork_cache as _fork_cache
from calm.brier_rollouts import _shares_prefix as _shares_prefix
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
# Next-token distributions


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _NextToken:
    """Next-token distributions p = softmax(logits [..., V]) and what the estimator needs of
    them in few passes over V: sum_v p(v)^2, p(x), and inverse-CDF sampling in two levels (a
    running sum over blocks of ``BLOCK`` tokens, then within the chosen block), which avoids a
    sequential running sum over the whole vocabulary. The draws follow p up to float32 rounding
    of the partial sums (~1e-7 relative)."""

    BLOCK = 128

    def __init__(self, logits: torch.Tensor):
        self.p = torch.softmax(logits.float(), -1)
        self.square = torch.linalg.vector_norm(self.p, dim=-1).double().square()

    def prob(self, idx: torch.Tensor) -> torch.Tensor:
        """p(idx) (float64), idx [...]."""
        return self.p.gather(-1, idx[..., None])[..., 0].double()

    def sample(self, num: int, generator: torch.Generator | None) -> torch.Tensor:
        """``num`` independent draws per distribution -> [..., num]."""
        V = self.p.shape[-1]
        e = self.p.reshape(-1, V)
        R = e.shape[0]
        blk = min(self.BLOCK, V)
        nb = -(-V // blk)
        if nb * blk != V:
            e = torch.nn.functional.pad(e, (0, nb * blk - V))
        blocks = e.view(R, nb, blk)
        cdf = blocks.sum(-1).cumsum(-1)  # [R, nb]
        u = torch.rand(R, num, generator=generator, device=e.device) * cdf[:, -1:]
        k = torch.searchsorted(cdf, u, right=True).clamp_max(nb - 1)  # block of each draw [R, num]
        below = torch.where(k > 0, cdf.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(u))
        inner = blocks[torch.arange(R, device=e.device)[:, None], k].cumsum(-1)  # [R, num, blk]
        i = torch.searchsorted(inner, (u - below)[..., None], right=True)[..., 0].clamp_max(blk - 1)
        return (k * blk + i).clamp_max(V - 1).view(*self.p.shape[:-1], num)


# ---------------------------------------------------------------------------------------------
# CALM


def _chunk_sampler(model):
    """``sample(hidden, n, generator=) -> chunks``: our CALM's head samples decoded by its
    `calm.decoding.ChunkDecoder` (the same tokens as ``model.sample_chunks``, the exact argmax
    found the fast way); any other model's own ``sample_chunks``."""
    from calm.models.calm import CALM

    if (
        not isinstance(model, CALM)
        or getattr(model.sample_chunks, "__func__", None) is not CALM.sample_chunks
    ):
        return model.sample_chunks  # not our CALM, or its sampler is replaced (subclass, instance)
    from calm.decoding import ChunkDecoder

    decode = ChunkDecoder.for_model(model).decode
    return lambda h, n, generator=None: decode(model.sample_latents(h, n, generator=generator))


@torch.no_grad()
def calm_window_scores(
    model,
    windows: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    shared_prefix: bool | None = None,
) -> WindowScores:
    """Brier-1..4 estimates of a CALM model on windows [B, T] at chunk-aligned positions.

    ``model`` needs ``config.chunk_size``, ``hidden(chunks_or_tokens, positions=, cache=)``,
    ``sample_chunks(hidden, n, generator=)`` and ``new_cache(rows, max_len)`` (`calm.models.calm.CALM`).
    shared_prefix: rollout attention over one shared cache per window (default: when the model
    is our CALM) or per-query cache copies through the model's own forward (False).
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
    sample_chunks = _chunk_sampler(model)
    first = sample_chunks(h, 2, generator=generator)  # [B, P, 2, K]
    if steps == 1:
        samples = first[..., :NGRAM]
    else:
        shared = _use_shared(model, shared_prefix)
        # queries ordered (position, sample); query of chunk position i sees chunks 0..i
        chunk_idx = torch.arange(P, device=device).repeat_interleave(2)
        per_query = _bytes_per_query(model, cache, B, P, h.shape[-1], shared)
        parts = []
        for a, b in _query_groups(2 * P, shared, per_query, max_cache_bytes, steps - 1, P):
            roll = _Rollout(model, cache, chunk_idx[a:b] + 1, steps - 1, shared)
            cur = first.flatten(1, 2)[:, a:b]  # [B, q, K]
            pos = chunk_idx[a:b] + 1  # the sampled chunk sits at chunk position i + 1
            out = [cur]
            for _ in range(steps - 1):
                hr = _calm_step(model, roll, cur, pos)  # [B, q, d]
                cur = sample_chunks(hr, 1, generator=generator)[:, :, 0]  # [B, q, K]
                out.append(cur)
                pos = pos + 1
            parts.append(torch.cat(out, -1)[..., :NGRAM])
        samples = torch.cat(parts, 1).view(B, P, 2, NGRAM)
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
    shared_prefix: bool | None = None,
) -> WindowScores:
    """Brier-1..4 estimates of a token model on windows [B, T] (module docstring), plus its NLL.

    ``model`` needs ``logits(tokens, positions=None, valid=None, cache=None) -> [B, T, V]`` and
    ``new_cache(rows, max_len)`` (`calm.models.ar.TokenTransformer`). shared_prefix: as in
    `calm_window_scores`.
    """
    if collision not in COLLISION_ESTIMATORS:
        raise ValueError(f"collision must be one of {COLLISION_ESTIMATORS}, got {collision!r}")
    device = _device(model)
    windows = windows.to(device)
    B, T = windows.shape
    t = ar_positions(T, stride).to(device)  # [P] context lengths
    P = len(t)
    cache = model.new_cache(B, T)
    logits = model.logits(windows, cache=cache).float()  # [B, T, V]
    # tok_lp[:, s] = log p(w[s + 1] | w[:s + 1])
    tok_lp = logits[:, :-1].gather(-1, windows[:, 1:, None])[..., 0] - logits[:, :-1].logsumexp(-1)
    nll_sum = -float(tok_lp.double().sum())
    offsets = torch.arange(NGRAM, device=device)
    accuracy = 2 * tok_lp[:, t[:, None] - 1 + offsets].double().cumsum(-1).exp()  # [B, P, 4]

    first = _NextToken(logits[:, t - 1])  # [B, P, V]: next-token distribution at each position
    del logits
    collide = torch.zeros(B, P, NGRAM, dtype=torch.float64, device=device)
    collide[..., 0] = first.square  # exact for n = 1
    pair = collision == "pair"
    draws = first.sample(2 if pair else 1, generator)  # [B, P, 1 or 2]
    first_prob = first.prob(draws[..., 0])
    shared = _use_shared(model, shared_prefix)
    V = first.p.shape[-1]
    per_query = _bytes_per_query(model, cache, B, int(t[-1]) + NGRAM - 1, V, shared)
    for a, b in _query_groups(P, shared, per_query, max_cache_bytes, NGRAM - 1, int(t[-1])):
        roll = _Rollout(model, cache, t[a:b], NGRAM - 1, shared)
        cur = draws[:, a:b, 0]  # [B, g]: the followed path
        agree = draws[:, a:b, 0] == draws[:, a:b, -1]  # pair: the two prefixes agree so far
        prob = first_prob[:, a:b]  # expected: P(prefix)
        pos = t[a:b].clone()
        for j in range(1, NGRAM):
            nxt = _NextToken(_ar_step(model, roll, cur, pos))  # [B, g, V]
            collide[:, a:b, j] = (agree.double() if pair else prob) * nxt.square
            if j == NGRAM - 1:
                break
            x = nxt.sample(2 if pair else 1, generator)
            cur = x[..., 0]
            if pair:
                agree = agree & (x[..., 0] == x[..., 1])
            else:
                prob = prob * nxt.prob(cur)
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
