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

This module is the public entry point; the code lives in `calm.exact_sampling` (the exact
algorithm), `calm.approx_sampling` (the batch approximation), `calm.chunk_counting` (counting
identical chunks) and `calm.temperature` (validating T, tempering logits, the inverse-CDF choice).
"""

from __future__ import annotations

from calm.approx_sampling import _log_weight_table as _log_weight_table
from calm.approx_sampling import _selection_logits as _selection_logits
from calm.approx_sampling import approx_probabilities, sample_approx
from calm.chunk_counting import _check_chunks as _check_chunks
from calm.chunk_counting import _sort_chunks as _sort_chunks
from calm.chunk_counting import chunk_counts
from calm.exact_sampling import _ON_LIMIT as _ON_LIMIT
from calm.exact_sampling import SamplingLimitError, SamplingStats, sample_exact
from calm.exact_sampling import _check_block as _check_block
from calm.exact_sampling import _ScalarScan as _ScalarScan
from calm.exact_sampling import _TensorScan as _TensorScan
from calm.temperature import _INTEGER_RTOL as _INTEGER_RTOL
from calm.temperature import inverse_cdf_choice, split_inverse_temperature, temper_logits

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
