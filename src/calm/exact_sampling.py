"""The exact rejection sampler of P^(1/T)/Z: :func:`sample_exact` (`calm.sampling`).

n identical draws, then a Bernoulli factory for P(x)^alpha, vectorised over the batch rows
(a tensor scan, or a Python scan on CPU for few rows), bounded by ``max_draws``; what it did
is reported in :class:`SamplingStats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from calm.approx_sampling import sample_approx
from calm.chunk_counting import _check_chunks, chunk_counts
from calm.temperature import split_inverse_temperature

__all__ = ["SamplingLimitError", "SamplingStats", "sample_exact"]

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
