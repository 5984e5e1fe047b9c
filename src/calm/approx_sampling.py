"""The batch approximation of temperature sampling: :func:`sample_approx` (`calm.sampling`).

N candidates drawn once from P, identical chunks counted, one picked with a weight that
estimates P(x)^(1/T); :func:`approx_probabilities` is its exact output distribution for a
given candidate set.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from calm.chunk_counting import _check_chunks, chunk_counts
from calm.temperature import inverse_cdf_choice, split_inverse_temperature

__all__ = ["approx_probabilities", "sample_approx"]


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
