"""Temperature sampling without logits (DESIGN §2.4).

A CALM model has no logits: its head (energy, flow or diffusion) gives *samples* of the next
chunk, never their probabilities. These functions turn any black-box sampler of a
distribution P over chunks (K-token tuples) into a sampler of the tempered distribution

    P_T(x) = P(x)^(1/T) / Z,    Z = sum_x P(x)^(1/T),    0 < T <= 1.

Only sharpening is possible: T > 1 flattens P, and sampling P^(1/T) with 1/T < 1 needs the
probabilities themselves, which a sampler does not give.

Write 1/T = n + alpha with n = floor(1/T) >= 1 and 0 <= alpha < 1, and S_a = sum_x P(x)^a.

* :func:`sample_exact` -- an exact rejection algorithm (n identical draws, then a Bernoulli
  factory for P(x)^alpha). Its output has exactly the distribution P_T; its cost grows like
  1 / S_(1/T), which explodes when P is flat, so it is bounded by ``max_draws``.
* :func:`sample_approx` -- the batch approximation used in practice: draw N candidates once,
  count identical chunks and pick one with a weight that estimates P(x)^(1/T). Asymptotically
  unbiased as N grows, fully vectorised, never needs more than the N candidates.
* :func:`chunk_counts` -- how many candidates in a row equal each candidate (used by both).

Both samplers work for any sampler, not only a CALM model, on CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "SamplingLimitError",
    "SamplingStats",
    "approx_probabilities",
    "chunk_counts",
    "inverse_cdf_choice",
    "temper_logits",
    "sample_approx",
    "sample_exact",
    "split_inverse_temperature",
]

# 1/T closer than this (relative) to an integer is treated as that integer: 1/(1/3) is 3.0 in
# floating point, but user-supplied temperatures such as 0.333333333 should not produce a
# Bernoulli factory for P(x)^1e-9.
_INTEGER_RTOL = 1e-9

_ON_LIMIT = ("approx", "fallback", "raise")


class SamplingLimitError(RuntimeError):
    """Raised by :func:`sample_exact` with ``on_limit="raise"`` when rows exhaust ``max_draws``."""


@dataclass
class SamplingStats:
    """What :func:`sample_exact` did, per batch row.

    Attributes:
        draws: LongTensor [B], samples consumed by the algorithm for each row (its cost). A row
            that finished in the middle of a ``draw(m)`` call ignores the rest of that call.
        attempts: LongTensor [B], attempts started (an attempt is n draws that must agree).
        hit_limit: BoolTensor [B], rows that reached ``max_draws`` without an accepted sample and
            got the fallback chunk instead (the most frequent chunk among their draws).
        calls: number of ``draw(m)`` calls made.
        draws_per_call: the ``m`` passed to each call.
    """

    draws: torch.Tensor
    attempts: torch.Tensor
    hit_limit: torch.Tensor
    calls: int
    draws_per_call: int

    @property
    def num_hit_limit(self) -> int:
        return int(self.hit_limit.sum())


def inverse_cdf_choice(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i of each row with probability softmax(logits)_i, read off the row's own uniform.

    logits [B, N] (any float dtype; the softmax and its running sum are float64), uniforms [B]
    in (0, 1) -> LongTensor [B]: the inverse CDF at u, so a row's choice depends on its logits
    and its uniform only. Shared by the token baseline's sampler and `sample_approx`.
    """
    cdf = torch.softmax(logits, -1, dtype=torch.float64).cumsum_(-1)
    u = uniforms.to(cdf).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


def temper_logits(logits: torch.Tensor, inverse_temperature: float) -> torch.Tensor:
    """``logits / T`` shifted so each row's maximum is 0, for any ``1/T`` in (0, inf].

    The gaps to the row maximum are scaled by 1/T; entries at the maximum stay exactly 0 instead
    of becoming ``0 * inf = NaN`` when 1/T overflows the logits' dtype (float32 past 3.4e38,
    e.g. T = 1e-40), and gaps whose product overflows become -inf. So as T -> 0 the softmax
    becomes one-hot on the maximum (uniform over exact ties): sampling equals greedy decoding,
    instead of a NaN row that the inverse CDF turns into the last token id. A new tensor.
    """
    gaps = logits - logits.amax(-1, keepdim=True)
    return (gaps * inverse_temperature).masked_fill_(gaps == 0, 0.0)


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """Validate ``temperature`` and return ``(n, alpha)`` with 1/T = n + alpha.

    n = floor(1/T) >= 1 and 0 <= alpha < 1; 1/T within a relative 1e-9 of an integer counts as
    that integer (alpha = 0).

    Raises:
        ValueError: T is NaN, T <= 0 or T > 1.
        TypeError: T is not a real number.
    """
    if isinstance(temperature, bool):
        raise TypeError(f"temperature must be a real number in (0, 1], got {temperature!r}")
    try:
        t = float(temperature)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"temperature must be a real number in (0, 1], got {temperature!r}") from err
    if math.isnan(t):
        raise ValueError("temperature is NaN; it must be a number in (0, 1]")
    if t <= 0:
        raise ValueError(
            f"temperature must be in (0, 1], got {t}: T <= 0 is not a distribution "
            "(for the T -> 0 limit, greedy decoding, use a very small positive T or sample_approx)"
        )
    if t > 1:
        raise ValueError(
            f"temperature must be in (0, 1], got {t}: T > 1 would flatten P, and sampling from "
            "P^(1/T) with 1/T < 1 needs the probabilities P(x) (logits) themselves; a sampler of "
            "P without logits can only sharpen it (T <= 1)"
        )
    if math.isinf(1.0 / t):
        raise ValueError(f"temperature {t} is too small: 1/T overflows")
    inv = 1.0 / t
    n = round(inv)
    if abs(inv - n) <= _INTEGER_RTOL * inv:
        return int(n), 0.0
    n = math.floor(inv)
    return int(n), inv - n


# ----------------------------------------------------------------------------------------------
# counting identical chunks
# ----------------------------------------------------------------------------------------------


def _check_chunks(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [B, N, K], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape [B, N, K] (batch rows, chunks per row, tokens per chunk); "
            f"got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
        )
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (a LongTensor), got dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have at least one chunk of at least one token, got {tuple(x.shape)}")


def _sort_chunks(candidates: torch.Tensor) -> torch.Tensor:
    """Permutation [B, N] that sorts each row's chunks lexicographically.

    LSD radix sort with stable sorts. Token ids are packed into 62-bit keys, as many per key as
    fit (all four tokens of a chunk for vocabularies up to 2^15, two for Llama-3's 128k), so
    this needs ceil(K / tokens-per-key) sorts.
    """
    B, N, K = candidates.shape
    x = candidates.long()
    lo, hi = torch.aminmax(x)  # one host sync
    lo, hi = int(lo), int(hi)
    bits = max(1, (hi - lo).bit_length())
    per_key = max(1, 62 // bits)
    perm = torch.arange(N, device=candidates.device).expand(B, N)
    for stop in range(K, 0, -per_key):
        start = max(0, stop - per_key)
        key = torch.zeros(B, N, dtype=torch.long, device=candidates.device)
        for k in range(start, stop):
            key = (key << bits) | (x[:, :, k] - lo) if per_key > 1 else x[:, :, k]
        order = torch.sort(key.gather(1, perm), dim=1, stable=True).indices
        perm = perm.gather(1, order)
    return perm


def chunk_counts(candidates: torch.Tensor) -> torch.Tensor:
    """How many candidates in the same row equal each candidate (all K tokens equal).

    Args:
        candidates: integer tensor [B, N, K].

    Returns:
        LongTensor [B, N]: ``counts[b, i] = #{j : candidates[b, j] == candidates[b, i]}`` (>= 1).

    Vectorised over rows with K stable sorts (O(B·N·log N) time, O(B·N·K) memory), so it works for
    any vocabulary size (no packing of the K ids into one integer) on CPU and CUDA.
    """
    _check_chunks(candidates, "candidates")
    B, N, K = candidates.shape
    perm = _sort_chunks(candidates)
    ordered = candidates.gather(1, perm.unsqueeze(-1).expand(B, N, K))
    new_group = torch.ones(B, N, dtype=torch.bool, device=candidates.device)
    new_group[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    group = new_group.long().cumsum(1) - 1  # group id of each sorted position, 0..N-1
    sizes = torch.zeros(B, N, dtype=torch.long, device=candidates.device)
    sizes.scatter_add_(1, group, torch.ones_like(group))
    counts_sorted = sizes.gather(1, group)
    return torch.empty_like(counts_sorted).scatter_(1, perm, counts_sorted)


# ----------------------------------------------------------------------------------------------
# exact algorithm
# ----------------------------------------------------------------------------------------------


def _check_block(block: object, m: int, shape: tuple[int, int] | None) -> torch.Tensor:
    if not isinstance(block, torch.Tensor):
        raise TypeError(f"draw({m}) must return a LongTensor [B, {m}, K], got {type(block).__name__}")
    if block.dim() != 3 or block.shape[1] != m:
        raise ValueError(f"draw({m}) must return a tensor of shape [B, {m}, K], got {tuple(block.shape)}")
    _check_chunks(block, f"draw({m})'s result")
    if shape is not None and (block.shape[0], block.shape[2]) != shape:
        raise ValueError(
            f"draw({m}) returned shape {tuple(block.shape)}, but an earlier call returned "
            f"[{shape[0]}, m, {shape[1]}]: every call must serve the same batch rows and chunk size"
        )
    return block


# The exact algorithm is a scan over each row's samples with a small state (attempt length,
# x*, factory step). On CPU, where a decoding step has few rows, a plain Python scan over the
# rows' samples is far cheaper than ~25 tiny tensor ops per sample (dispatch overhead of ~5 us
# each: 200 samples cost ~25 ms); on other devices the scan is vectorised over the rows with
# tensor ops and no host sync per sample, as it is on CPU for large batches (thousands of rows,
# e.g. a sampling experiment), where the per-op cost is shared by many rows. Both give
# identical results (tests/test_sampling.py).
_SCALAR_SCAN_MAX_ROWS = 256  # on CPU: up to this many rows, scan in Python


class _TensorScan:
    """The exact algorithm's per-row state, advanced one sample at a time for all rows at once."""

    def __init__(self, B, K, n, alpha, max_draws, dtype, device):
        self.n, self.alpha, self.max_draws = n, alpha, max_draws
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.result = torch.zeros(B, K, dtype=dtype, device=device)
        self.xstar = torch.zeros(B, K, dtype=dtype, device=device)
        self.matched = torch.zeros(B, dtype=torch.long, device=device)  # samples of this attempt, all == x*
        self.in_factory = torch.zeros(B, dtype=torch.bool, device=device)
        self.factory_i = torch.zeros(B, dtype=torch.long, device=device)  # factory draws so far
        self.draws = torch.zeros(B, dtype=torch.long, device=device)
        self.attempts = torch.zeros(B, dtype=torch.long, device=device)

    def feed(self, block: torch.Tensor, coins: torch.Tensor | None) -> None:
        n, alpha = self.n, self.alpha
        for j in range(block.shape[1]):
            active = ~self.done & (self.draws < self.max_draws)
            s = block[:, j]
            self.draws += active
            same = (s == self.xstar).all(-1)
            # attempt phase
            att = active & ~self.in_factory
            start = att & (self.matched == 0)
            self.xstar = torch.where(start.unsqueeze(-1), s, self.xstar)
            self.attempts += start
            agree = start | (att & same)
            matched = torch.where(agree, self.matched + 1, torch.where(att, 0, self.matched))
            complete = att & (matched == n)
            if alpha == 0.0:
                accept = complete
            else:
                fac = active & self.in_factory
                i = self.factory_i + 1
                accept = fac & same
                reject = fac & ~same & (coins[:, j] * i < alpha)  # probability alpha / i
                factory_i = torch.where(fac, i, self.factory_i)
                self.in_factory = (self.in_factory & ~accept & ~reject) | complete
                self.factory_i = torch.where(complete, 0, factory_i)
            self.matched = torch.where(complete, 0, matched)
            self.result = torch.where(accept.unsqueeze(-1), self.xstar, self.result)
            self.done = self.done | accept

    def still(self) -> torch.Tensor:
        return ~self.done & (self.draws < self.max_draws)

    def finish(self):
        return self.done, self.result, self.draws, self.attempts


class _ScalarScan:
    """The same state machine as `_TensorScan`, one row at a time over Python values."""

    def __init__(self, B, K, n, alpha, max_draws, dtype, device):
        self.n, self.alpha, self.max_draws = n, alpha, max_draws
        self.K, self.dtype, self.device = K, dtype, device
        self.done = [False] * B
        self.result: list[tuple | None] = [None] * B
        self.xstar: list[tuple | None] = [None] * B
        self.matched = [0] * B
        self.in_factory = [False] * B
        self.factory_i = [0] * B
        self.draws = [0] * B
        self.attempts = [0] * B

    def feed(self, block: torch.Tensor, coins: torch.Tensor | None) -> None:
        n, alpha, cap = self.n, self.alpha, self.max_draws
        rows = block.tolist()
        coin_rows = coins.tolist() if coins is not None else None
        for b, samples in enumerate(rows):
            if self.done[b] or self.draws[b] >= cap:
                continue
            matched, in_factory, factory_i = self.matched[b], self.in_factory[b], self.factory_i[b]
            xstar, draws, attempts = self.xstar[b], self.draws[b], self.attempts[b]
            for j, sample in enumerate(samples):
                if draws >= cap:
                    break
                draws += 1
                s = tuple(sample)
                if in_factory:
                    i = factory_i + 1
                    if s == xstar:
                        self.done[b], self.result[b] = True, xstar
                        break
                    factory_i = i
                    if coin_rows[b][j] * i < alpha:  # probability alpha / i: reject
                        in_factory, factory_i = False, 0
                    continue
                if matched == 0:
                    xstar, matched = s, 1
                    attempts += 1
                elif s == xstar:
                    matched += 1
                else:
                    matched = 0
                    continue
                if matched == n:
                    matched = 0
                    if alpha == 0.0:
                        self.done[b], self.result[b] = True, xstar
                        break
                    in_factory, factory_i = True, 0
            self.matched[b], self.in_factory[b], self.factory_i[b] = matched, in_factory, factory_i
            self.xstar[b], self.draws[b], self.attempts[b] = xstar, draws, attempts

    def still(self) -> torch.Tensor:
        return torch.tensor([not d and k < self.max_draws for d, k in zip(self.done, self.draws)])

    def finish(self):
        zero = (0,) * self.K
        result = torch.tensor([r if r is not None else zero for r in self.result], dtype=self.dtype)
        long = dict(dtype=torch.long, device=self.device)
        return (
            torch.tensor(self.done, device=self.device),
            result.to(self.device),
            torch.tensor(self.draws, **long),
            torch.tensor(self.attempts, **long),
        )


def sample_exact(
    draw: Callable[[int], torch.Tensor],
    temperature: float,
    *,
    max_draws: int = 1024,
    generator: torch.Generator | None = None,
    on_limit: str = "approx",
    draws_per_call: int | None = None,
    max_draws_per_call: int | None = None,
    uniform: Callable[[int, int], torch.Tensor] | None = None,
    active_rows: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
    """Sample chunks exactly from P^(1/T)/Z using only a sampler of P.

    Args:
        draw: ``draw(m)`` returns m i.i.d. samples of P for every batch row, an integer tensor
            [B, m, K]. It is always called for the full batch; rows that already finished ignore
            their samples. Rows may have different distributions P_b.
        temperature: T in (0, 1]. T = 1 is a single ``draw(1)``.
        max_draws: bound on the samples the algorithm consumes per row (see "Limit" below).
        generator: ``torch.Generator`` for the algorithm's own randomness (the Bernoulli
            factory's coins, the ``"approx"`` fallback's choice); it must live on the device of
            the drawn tensors. The sampler ``draw`` keeps its own randomness.
        on_limit: what a row that hits ``max_draws`` returns (see "Limit" below): ``"approx"``
            (default), ``"fallback"`` (the most frequent draw) or ``"raise"``.
        draws_per_call: m for the first ``draw(m)`` call; default n + (1 if alpha > 0 else 0),
            capped at ``max_draws``. Larger m means fewer, bigger calls (and more wasted samples).
        max_draws_per_call: if given, m doubles after every call up to this size (few calls when
            P is flat, little waste when it is peaked); default: every call draws the same m.
            Which draws a row reads does not depend on the split into calls, so neither does
            its result when ``draw`` and ``uniform`` index their values by draw position (as
            `calm.generation` does).
        uniform: per-row randomness instead of ``generator``: ``uniform(key, m)`` returns [B, m]
            float64 uniforms in (0, 1) for the batch rows; key c >= 0 asks for the coins of the
            draws c, ..., c + m - 1 of every row (c = the draws already read by the rows still
            sampling), key -1 once for the ``"approx"`` fallback's choice. If a row's values
            depend only on the row and the draw position (e.g. `calm.generation.RowRandom` with
            an offset), a row's result does not depend on the other rows of the batch.
        active_rows: call ``draw(m, rows)`` instead of ``draw(m)``: ``rows`` is None on the
            first call (all rows; [B, m, K] expected), then the LongTensor of the rows still
            sampling, and the result [len(rows), m, K] holds draws for those rows only, so rows
            that finished cost nothing.
        return_stats: also return a :class:`SamplingStats`.

    Returns:
        LongTensor [B, K] (same dtype and device as the draws), and the stats if requested.

    Algorithm (1/T = n + alpha, n >= 1, 0 <= alpha < 1). Each row reads its own stream of
    samples, in order, and repeats *attempts*:

    1. Attempt: read samples until n have been read or one differs from the first (x*). If one
       differs, the attempt fails (that sample is discarded -- it is not a fresh draw of P) and
       a new one starts. Stopping at the first disagreement gives the same outcome as reading
       all n, for less. An attempt succeeds with probability S_n and, given success,
       x* = x with probability P(x)^n / S_n.
    2. If alpha = 0, accept x*. Otherwise a Bernoulli factory for P(x*)^alpha: for i = 1, 2, ...
       read a sample; if it equals x*, accept x*; else with probability alpha/i reject (start a
       new attempt), else go on. With p = P(x*), q = 1 - p, it accepts with probability
       p · sum_k q^k prod_{i<=k}(1 - alpha/i) = p · (1 - q)^(alpha - 1) = p^alpha.

    So a cycle accepts x with probability P(x)^(n+alpha) and the output is exactly P_T. The
    batch is vectorised: all unfinished rows advance together, one sample per step (on CPU, for
    up to 256 rows, the same state machine runs as a Python scan over the rows' samples, which
    is much cheaper there than ~25 tiny tensor ops per sample; the results are identical).

    Expected cost (samples per row). An attempt costs 1 + sum_{j=1}^{n-1} S_j in expectation
    (sample j+1 is read only if the first j agreed); the factory, entered with x*, costs
    sum_k q^k prod_{i<=k}(1 - alpha/i) = p^(alpha-1), i.e. S_(n+alpha-1) per cycle on average.
    The number of cycles is geometric with success probability S_(n+alpha) = Z, hence

        E[draws] = (1 + sum_{j=1}^{n-1} S_j + [alpha > 0] · S_(n+alpha-1)) / S_(n+alpha).

    For integer 1/T = n this is (1 + S_1 + ... + S_(n-1)) / S_n. It is small for peaked P and
    explodes for flat P (uniform over V chunks at T = 1/2: 2V samples).

    Limit. A row that has consumed ``max_draws`` samples without accepting stops and is
    reported in ``SamplingStats.hit_limit``. With ``on_limit="approx"`` it returns
    :func:`sample_approx` applied to those ``max_draws`` samples (the batch approximation with
    N = max_draws, so the exact sampler never costs more than the approximation with the same
    N, and equals it in cost when P is flat); with ``"fallback"`` the most frequent chunk among
    them (ties: the one drawn first), a greedy-like choice; with ``"raise"`` a
    :class:`SamplingLimitError` names how many rows failed. What the output is then: for
    integer 1/T the attempt that succeeds always has length n whatever its chunk, so *given that
    a row finished within the bound its chunk is exactly P_T*; the rows that hit the bound get
    the fallback, chosen from draws conditioned on the failure (no agreement came early), so the
    overall distribution is a mixture that tends to P_T as ``max_draws`` grows. For fractional
    1/T the factory's length depends on the chunk (shorter for likely chunks), so finishing
    within the bound also slightly favours likely chunks; that bias vanishes as the bound grows.
    """
    n, alpha = split_inverse_temperature(temperature)
    if isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < 1:
        raise ValueError(f"max_draws must be a positive integer, got {max_draws!r}")
    if on_limit not in _ON_LIMIT:
        raise ValueError(f"on_limit must be one of {', '.join(map(repr, _ON_LIMIT))}; got {on_limit!r}")
    if draws_per_call is None:
        m = min(n + (1 if alpha > 0 else 0), max_draws)
    else:
        if isinstance(draws_per_call, bool) or not isinstance(draws_per_call, int) or draws_per_call < 1:
            raise ValueError(f"draws_per_call must be a positive integer, got {draws_per_call!r}")
        m = draws_per_call
    if max_draws_per_call is not None and (
        isinstance(max_draws_per_call, bool)
        or not isinstance(max_draws_per_call, int)
        or max_draws_per_call < 1
    ):
        raise ValueError(f"max_draws_per_call must be a positive integer, got {max_draws_per_call!r}")
    first_m = m

    def call(m: int, rows: torch.Tensor | None, shape: tuple[int, int] | None) -> torch.Tensor:
        if not active_rows:
            return _check_block(draw(m), m, shape)
        got = draw(m, rows)
        if rows is None:
            return _check_block(got, m, None)
        got = _check_block(got, m, (rows.numel(), shape[1]))
        full = torch.zeros((shape[0], m, shape[1]), dtype=got.dtype, device=got.device)
        return full.index_copy_(0, rows, got)  # rows that finished keep zeros (never read)

    def uniforms(key: int, m: int) -> torch.Tensor:
        if uniform is None:
            return torch.rand(B, m, generator=generator, device=device, dtype=torch.float64)
        u = uniform(key, m)
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != (B, m):
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"uniform({key}, {m}) must return a float64 tensor [{B}, {m}], got {got}")
        return u.to(device=device, dtype=torch.float64)

    block = call(m, None, None)
    B, _, K = block.shape
    device = block.device
    calls = 1

    if n == 1 and alpha == 0.0:  # T = 1: one sample of P
        result = block[:, 0].clone()
        ones = torch.ones(B, dtype=torch.long, device=device)
        stats = SamplingStats(ones, ones.clone(), torch.zeros(B, dtype=torch.bool, device=device), calls, m)
        return (result, stats) if return_stats else result

    scalar = device.type == "cpu" and B <= _SCALAR_SCAN_MAX_ROWS
    state = (_ScalarScan if scalar else _TensorScan)(B, K, n, alpha, max_draws, block.dtype, device)
    blocks = []  # every sample drawn, kept for the fallback
    drawn = 0  # samples drawn so far for every row still sampling (they read all of them)
    while True:
        blocks.append(block)
        drawn += m
        state.feed(block, uniforms(drawn - m, m) if alpha > 0 else None)
        still = state.still()
        if not bool(still.any()):  # one sync per call of draw
            break
        if max_draws_per_call is not None:
            m = max(m, min(2 * m, max_draws_per_call))
        m = min(m, max_draws - drawn)  # >= 1: a row still sampling has drawn < max_draws
        block = call(m, still.nonzero().squeeze(1) if active_rows else None, (B, K))
        calls += 1
    done, result, draws, attempts = state.finish()

    hit_limit = ~done
    n_hit = int(hit_limit.sum())
    if n_hit:
        if on_limit == "raise":
            raise SamplingLimitError(
                f"{n_hit} of {B} rows drew max_draws={max_draws} samples at temperature "
                f"{float(temperature):g} without an accepted chunk (the exact sampler's cost grows "
                "like 1/sum_x P(x)^(1/T), which explodes for flat P). Raise max_draws or the "
                "temperature, use sample_approx, or pass on_limit='approx' or 'fallback'."
            )
        stream = torch.cat(blocks, dim=1)[hit_limit][:, :max_draws]  # the samples each row consumed
        if on_limit == "approx":
            u = uniforms(-1, 1)[hit_limit, 0]
            result[hit_limit] = sample_approx(stream, temperature, uniforms=u)
        else:
            mode = chunk_counts(stream).argmax(dim=1)  # first index of the largest count
            result[hit_limit] = stream[torch.arange(n_hit, device=device), mode]
    if return_stats:
        return result, SamplingStats(draws, attempts, hit_limit, calls, first_m)
    return result


# ----------------------------------------------------------------------------------------------
# batch approximation
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _log_weight_table(N: int, m: int, alpha: float) -> torch.Tensor:
    """log W_m(c) for c = 0..N (float64, CPU); -inf where c < m. See :func:`sample_approx`.

    W_m(c) = C(c, m) · A_m(c), where A_m(c) is the probability that a Bernoulli factory for
    p^alpha, fed the other N - m candidates in random order *without replacement* (c - m of them
    equal to the chunk), accepts; running out of candidates counts as acceptance.
    """
    c = torch.arange(N + 1, dtype=torch.float64)
    logw = torch.full((N + 1,), -math.inf, dtype=torch.float64)
    ok = c >= m
    cc = c[ok]
    logw[ok] = torch.lgamma(cc + 1) - math.lgamma(m + 1) - torch.lgamma(cc - m + 1)
    M = N - m  # pool size
    if alpha == 0.0 or M == 0:
        return logw
    # j = N - c non-matching candidates in the pool, j = 0..M.  With s_k = prod_{i<=k}(1 - alpha/i)
    # and r_k(j) = C(j, k)/C(M, k) (first k pool draws all non-matching):
    #   A(j) = sum_{k<j} s_k r_k(j) (M - j)/(M - k) + s_j r_j(j).
    k = torch.arange(M + 1, dtype=torch.float64)
    s = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - alpha / k[1:], 0)])
    accept = torch.empty(M + 1, dtype=torch.float64)
    rows = max(1, (1 << 22) // (M + 1))  # bound the temporary [rows, M+1] table to ~32 MB
    for j0 in range(0, M + 1, rows):
        j = torch.arange(j0, min(j0 + rows, M + 1), dtype=torch.float64).unsqueeze(1)
        factors = ((j - k[:-1]) / (M - k[:-1])).clamp_min(0)  # [J, M]: (j - i)/(M - i), i = 0..M-1
        r = torch.cat([torch.ones_like(j), torch.cumprod(factors, 1)], 1)  # r_k(j), k = 0..M
        hit = ((M - j) / (M - k).clamp_min(1)) * (k < j)  # next pool draw matches, for k < j
        last = (k == j).to(torch.float64)  # survived all j non-matches: accept
        accept[j0 : j0 + j.shape[0]] = (s * r * (hit + last)).sum(1)
    log_a = accept.clamp_min(torch.finfo(torch.float64).tiny).log()  # A > 0 exactly; guard rounding
    logw[ok] = logw[ok] + log_a.flip(0)  # c = m..N  <->  j = M..0
    return logw


def _selection_logits(candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Unnormalised log-probability [B, N] (float64) that :func:`sample_approx` returns candidate i."""
    n, alpha = split_inverse_temperature(temperature)
    _check_chunks(candidates, "candidates")
    B, N, _ = candidates.shape
    counts = chunk_counts(candidates)
    if n == 1 and alpha == 0.0:  # T = 1: a uniformly chosen candidate is a sample of P
        return torch.zeros(B, N, dtype=torch.float64, device=candidates.device)
    level = counts.max(dim=1).values.clamp(max=n)  # m for each row: the top rung of the ladder
    logits = torch.full((B, N), -math.inf, dtype=torch.float64, device=candidates.device)
    for m in torch.unique(level).tolist():  # the one host sync of the call
        table = _log_weight_table(N, int(m), alpha).to(candidates.device)
        logits = torch.where((level == m).unsqueeze(1), table[counts], logits)
    # a chunk with count c appears c times: spread its weight over its copies
    return logits - counts.to(torch.float64).log()


def approx_probabilities(candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability [B, N] (float64) that :func:`sample_approx` returns candidate i of each row.

    The probability of a *chunk* is the sum over its copies. Useful to compute the exact output
    distribution of the approximation for a given candidate set (tests, diagnostics).
    """
    return torch.softmax(_selection_logits(candidates, temperature), dim=1)


def sample_approx(
    candidates: torch.Tensor,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate P^(1/T)/Z sampling from N candidates per row drawn once from P.

    Args:
        candidates: integer tensor [B, N, K], N i.i.d. samples of P per row (rows may have
            different P). N = 200 is roughly what the paper used at T = 0.5.
        temperature: T in (0, 1]; 1/T = n + alpha. T = 1 returns a uniformly chosen candidate.
        generator: ``torch.Generator`` (on the candidates' device) for the selection noise.
        uniforms: alternatively one uniform in (0, 1) per row, [B]: the row's choice is then the
            inverse CDF of its selection probabilities at that value, a function of the row's own
            candidates and uniform only (batch-independent randomness).

    Returns:
        Tensor [B, K] of the same dtype and device: one chunk per row.

    Algorithm. For each row, count identical chunks (c(x) copies of chunk x among the N), set
    m = min(n, max_x c(x)) -- the ladder "for m = n, n-1, ..., 1: use the first m that some
    chunk reaches" -- and pick chunk x with probability proportional to

        W_m(c) = C(c, m) · A_m(c)             (zero if c < m)

    * Integer 1/T (alpha = 0): A = 1 and this is the paper's rule. C(c, n)/C(N, n) is an
      *unbiased* estimate of P(x)^n (the fraction of n-subsets of the candidates that are all x).
    * Fractional 1/T: A_m(c) is the probability that the Bernoulli factory of
      :func:`sample_exact`, fed the N - m other candidates in random order without replacement
      (c - m of which equal x), accepts (running out of candidates counts as acceptance). Then
      W_n(c)/C(N, n) is an unbiased estimate of the degree-N truncation of the binomial series
          P^n · (1 - Q)^alpha = P^n · (1 - sum_{k>=1} b_k Q^k),  Q = 1 - P,  b_k = (alpha/k)·prod_{i<k}(1 - alpha/i) > 0,
      i.e. of P(x)^(n+alpha) up to a bias P^n · sum_{k>N-n} b_k Q^k >= 0 that vanishes
      geometrically in N for every P(x) > 0 (and is at most P^n · prod_{i<=N-n}(1 - alpha/i)
      ~ P^n (N-n)^-alpha uniformly). Always 0 < A <= 1, so no weight is negative, and a chunk
      seen m times keeps a positive weight (so the ladder never leaves a row without a choice).
      Lower rungs m < n use the same construction with m for n, targeting P^(m+alpha).

    What is unbiased and what is only consistent: the per-chunk weights are unbiased (integer
    1/T) or unbiased up to the exponentially small truncation bias above (fractional 1/T), but
    the selection normalises them by their sum over the row, a ratio estimator, and the ladder
    lowers the power when no chunk reaches n copies. The output distribution is therefore only
    *consistent*: it converges to P^(1/T)/Z as N grows (each weight/N^n converges almost surely
    to P(x)^(1/T) times a constant common to all chunks, and the ladder is used with vanishing
    probability), with a bias at finite N that favours sampling at a higher effective
    temperature when N is small compared with 1/S_n.

    Cost: O(N log N) per row for the counts (K stable sorts), plus a cached O(N^2) table per
    (N, m, alpha) on the host for fractional 1/T. The selection is Gumbel-max over the
    candidates with one [B, N] float64 uniform tensor drawn from ``generator``; one host sync
    per call (the set of ladder rungs in use).
    """
    logits = _selection_logits(candidates, temperature)
    B, N, K = candidates.shape
    if uniforms is not None:
        if generator is not None:
            raise ValueError("give either generator or uniforms, not both")
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (B,):
            raise ValueError(f"uniforms must be a tensor of shape [{B}] (one per row)")
        idx = inverse_cdf_choice(logits, uniforms)
        return candidates.gather(1, idx.view(B, 1, 1).expand(-1, 1, K)).squeeze(1)
    u = torch.rand(B, N, generator=generator, device=candidates.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u))
    index = (logits + gumbel).argmax(dim=1)
    return candidates[torch.arange(B, device=candidates.device), index]
