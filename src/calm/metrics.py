"""BrierLM: a likelihood-free language-model metric (DESIGN §2.3).

The Brier score of a predictive distribution P for the outcome y is

    Brier(P, y) = 2 P(y) - sum_x P(x)^2,

a strictly proper scoring rule (higher is better, at most 1). It can be estimated without
probabilities from two independent samples x1, x2 of P:

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2},

whose expectation is 2 P(y) - sum_x P(x)^2 exactly. Brier-n treats the next n tokens as one
outcome, and BrierLM = 100 · (prod_{n=1..4} Brier-n)^(1/4) with each Brier-n clamped at 0.

* :func:`brier_from_samples` -- per-position Brier-1..4 estimates from two sampled 4-grams.
* :func:`brier_lm` -- BrierLM from mean Brier-1..4.
* :class:`BrierAccumulator` -- running sums over an evaluation set: means, standard errors,
  BrierLM and a confidence interval. Takes float estimates, so the lower-variance token-level
  estimator (exact accuracy term, sampled collision term) feeds it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

__all__ = ["BrierAccumulator", "brier_from_samples", "brier_lm"]


def brier_from_samples(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased per-position Brier-n estimates, n = 1..L (L = 4 for BrierLM).

    Args:
        x1, x2: token ids [..., L] -- two independent model samples of the next L tokens.
        y: token ids [..., L] -- the true next L tokens. The three broadcast together.

    Returns:
        Float tensor [..., L] (default float dtype), entry n-1 being
        1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}, where equality is of the
        whole prefix: a mismatch at position i makes every Brier-n with n > i use 0 for that
        indicator. Each entry is in {-1, 0, 1, 2}; its expectation over x1, x2 is Brier-n.
    """
    tensors = []
    for name, t in (("x1", x1), ("x2", x2), ("y", y)):
        t = torch.as_tensor(t)
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name} must have shape [..., L] with L >= 1 tokens, got {tuple(t.shape)}")
        tensors.append(t)
    x1, x2, y = tensors
    if not x1.shape[-1] == x2.shape[-1] == y.shape[-1]:
        raise ValueError(
            "x1, x2 and y must have the same number of tokens in the last dimension, got "
            f"{tuple(x1.shape)}, {tuple(x2.shape)}, {tuple(y.shape)}"
        )
    try:
        x1, x2, y = torch.broadcast_tensors(x1, x2, y)
    except RuntimeError as err:
        raise ValueError(
            f"x1, x2, y do not broadcast: {tuple(x1.shape)}, {tuple(x2.shape)}, {tuple(y.shape)}"
        ) from err

    def prefix_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a == b).to(torch.int32).cumprod(dim=-1)

    score = prefix_equal(x1, y) + prefix_equal(x2, y) - prefix_equal(x1, x2)
    return score.to(torch.get_default_dtype())


def brier_lm(briers: Sequence[float] | torch.Tensor, *, per_row: bool = False) -> float | torch.Tensor:
    """BrierLM = 100 · (prod_n max(Brier-n, 0))^(1/L) (L = 4: Brier-1..4).

    Args:
        briers: *mean* Brier-1..L over an evaluation set: a sequence of L numbers or a tensor
            [L]; with ``per_row=True`` also a tensor [..., L] of several such means (e.g.
            bootstrap replicates), scored row by row. The per-position estimates of
            `brier_from_samples` are not means: average them first (``.mean(0)``); a BrierLM
            of a single position is 0 or 100 and means nothing, so a tensor of more than one
            dimension without ``per_row=True`` is refused.

    Returns:
        A float for a sequence input, a tensor [...] for a tensor input.

    Each Brier-n is clamped at 0 *before* the product. The true Brier-n of a reasonable model
    is positive, but its estimate can be negative (few samples, poor model: the collision term
    wins). The reference code clamps only the product, so two negative estimates multiply to a
    positive number and a model that scores below 0 on two n gets a spurious positive BrierLM.
    """
    as_float = not isinstance(briers, torch.Tensor)
    b = torch.as_tensor(briers, dtype=torch.float64) if as_float else briers
    if b.dim() < 1 or b.shape[-1] < 1:
        raise ValueError(f"briers must have shape [..., L] (L = 4 for Brier-1..4), got {tuple(b.shape)}")
    if b.dim() > 1 and not per_row:
        raise ValueError(
            f"brier_lm takes the mean Brier-1..{b.shape[-1]} of an evaluation set (shape [{b.shape[-1]}]), got shape "
            f"{tuple(b.shape)}: average per-position estimates first (e.g. brier_lm(estimates.mean(0))), "
            "or pass per_row=True to score each row as a separate set of means"
        )
    if not b.is_floating_point():
        b = b.to(torch.get_default_dtype())
    score = 100.0 * b.clamp_min(0).prod(dim=-1) ** (1.0 / b.shape[-1])
    if as_float:
        if score.dim() == 0:
            return float(score)
        return score
    return score


class BrierAccumulator:
    """Running Brier-1..L statistics over an evaluation set.

    ``add(estimates)`` takes per-position estimates [..., L] (floats: indicator estimates from
    :func:`brier_from_samples`, or the token-level estimator's values) and an optional mask of
    the entries to count (e.g. positions too close to the end of a document to have n tokens).

    State: for every pair (i, j) of n's, the number of positions where both were observed, the
    sum of x_i over those positions, and the sum of x_i·x_j. These three [L, L] float64 tensors
    (``count``, ``sum``, ``sum_prod``) are plain sums, so shards from several workers combine by
    adding them (:meth:`merge`, or an all-reduce of :meth:`to_tensor`).

    Confidence interval for BrierLM (:meth:`confidence_interval`), choice documented:

    * ``method="delta"`` (default): delta method on log BrierLM = log 100 + (1/L) sum_n log B_n,
      using the full covariance of the L means (they come from the same samples and are
      positively correlated, so treating them as independent would be wrong), then
      exponentiated: ``BrierLM · exp(± z · sd)``. Asymmetric, always positive, close to nominal
      coverage once every mean is many standard errors above 0.
    * ``method="bonferroni"``: a normal interval for each Brier-n at level 1 - (1 - level)/L,
      clamped at 0, pushed through :func:`brier_lm`. BrierLM increases in every B_n, so when all
      L intervals hold the result holds: coverage >= level up to the normal approximation of
      each mean, with no linearisation, and it stays valid when some B_n is near or below 0.
      Wider. Used automatically by ``"delta"`` when some mean is <= 0.

    Both treat positions as independent draws; positions from the same document are weakly
    correlated, so on real text the interval is somewhat optimistic.
    """

    def __init__(self, num_n: int = 4) -> None:
        if num_n < 1:
            raise ValueError(f"num_n must be >= 1, got {num_n}")
        self.num_n = num_n
        self.count = torch.zeros(num_n, num_n, dtype=torch.float64)
        self.sum = torch.zeros(num_n, num_n, dtype=torch.float64)
        self.sum_prod = torch.zeros(num_n, num_n, dtype=torch.float64)

    def add(self, estimates: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate per-position estimates [..., L]; ``mask`` (bool, broadcastable) selects entries."""
        e = torch.as_tensor(estimates)
        L = self.num_n
        if e.dim() < 1 or e.shape[-1] != L:
            raise ValueError(f"estimates must have shape [..., {L}], got {tuple(e.shape)}")
        e = e.detach().to(torch.float64)
        if mask is None:
            m = torch.ones_like(e)
        else:
            mask = torch.as_tensor(mask, device=e.device)
            try:
                m = torch.broadcast_to(mask, e.shape).to(torch.float64)
            except RuntimeError as err:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to estimates {tuple(e.shape)}"
                ) from err
        e = e.reshape(-1, L)
        m = m.reshape(-1, L)
        x = torch.where(m > 0, e, torch.zeros_like(e))  # masked entries may hold NaN
        self.count += (m.T @ m).cpu()
        self.sum += (x.T @ m).cpu()
        self.sum_prod += (x.T @ x).cpu()

    def merge(self, other: BrierAccumulator) -> BrierAccumulator:
        """Add another accumulator's sums into this one (returns self)."""
        if other.num_n != self.num_n:
            raise ValueError(f"cannot merge accumulators with num_n {self.num_n} and {other.num_n}")
        self.count += other.count
        self.sum += other.sum
        self.sum_prod += other.sum_prod
        return self

    def to_tensor(self) -> torch.Tensor:
        """The state as one [3, L, L] float64 tensor (for an all-reduce across workers)."""
        return torch.stack([self.count, self.sum, self.sum_prod])

    @classmethod
    def from_tensor(cls, state: torch.Tensor) -> BrierAccumulator:
        state = torch.as_tensor(state, dtype=torch.float64).cpu()
        if state.dim() != 3 or state.shape[0] != 3 or state.shape[1] != state.shape[2]:
            raise ValueError(f"expected a [3, L, L] state tensor, got {tuple(state.shape)}")
        acc = cls(state.shape[1])
        acc.count, acc.sum, acc.sum_prod = (s.clone() for s in state)
        return acc

    @property
    def counts(self) -> torch.Tensor:
        """Number of positions counted for each n, [L]."""
        return self.count.diagonal().clone()

    def means(self) -> torch.Tensor:
        """Mean Brier-1..L, float64 [L] (NaN where nothing was counted)."""
        return self.sum.diagonal() / self.count.diagonal()

    def covariance(self) -> torch.Tensor:
        """Estimated covariance [L, L] of the L means.

        With n_ij positions observed for both i and j and sample covariance s_ij over them,
        Cov(mean_i, mean_j) = n_ij · s_ij / (n_i · n_j).
        """
        n = self.count
        mean_i = self.sum / n  # [i, j]: mean of x_i over positions with both i and j
        s = (self.sum_prod - n * mean_i * mean_i.T) / (n - 1)
        diag = n.diagonal()
        return n * s / (diag.unsqueeze(1) * diag.unsqueeze(0))

    def standard_errors(self) -> torch.Tensor:
        """Standard error of each mean Brier-n, float64 [L]."""
        return self.covariance().diagonal().clamp_min(0).sqrt()

    def brier_lm(self) -> float:
        """BrierLM of the current means."""
        return float(brier_lm(self.means()))

    def confidence_interval(self, level: float = 0.95, method: str = "delta") -> tuple[float, float]:
        """Two-sided confidence interval (lower, upper) for BrierLM; see the class docstring."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if method not in ("delta", "bonferroni"):
            raise ValueError(f"method must be 'delta' or 'bonferroni', got {method!r}")
        if bool((self.count.diagonal() < 2).any()):
            raise ValueError("need at least two positions for every n to estimate an interval")
        mu = self.means()
        cov = self.covariance()
        L = self.num_n
        if method == "delta" and bool((mu > 0).all()):
            z = NormalDist().inv_cdf(0.5 + level / 2)
            var_log = float((cov / (mu.unsqueeze(1) * mu.unsqueeze(0))).sum()) / L**2
            score = float(brier_lm(mu))
            half = z * math.sqrt(max(var_log, 0.0))
            return score * math.exp(-half), score * math.exp(half)
        z = NormalDist().inv_cdf(1 - (1 - level) / (2 * L))
        se = cov.diagonal().clamp_min(0).sqrt()
        return float(brier_lm(mu - z * se)), float(brier_lm(mu + z * se))

    def summary(self, level: float = 0.95) -> dict:
        """Plain-Python dict: brier_1..L, their standard errors, brier_lm, its CI and the counts."""
        mu, se, counts = self.means(), self.standard_errors(), self.counts
        out: dict = {}
        for i in range(self.num_n):
            out[f"brier_{i + 1}"] = float(mu[i])
            out[f"brier_{i + 1}_se"] = float(se[i])
        out["brier_lm"] = self.brier_lm()
        if bool((counts >= 2).all()):
            out["brier_lm_ci"] = list(self.confidence_interval(level))
            out["ci_level"] = level
        out["count"] = [int(c) for c in counts]
        return out
