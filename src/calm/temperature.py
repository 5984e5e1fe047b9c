"""The temperature rules shared by the samplers (DESIGN §2.4; the method: `calm.sampling`).

:func:`split_inverse_temperature` validates T and splits 1/T = n + alpha, :func:`temper_logits`
scales logits by 1/T (the token baseline), and :func:`inverse_cdf_choice` picks an index from
logits with one uniform per row (the baseline's sampler and `calm.approx_sampling`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["inverse_cdf_choice", "split_inverse_temperature", "temper_logits"]

# 1/T closer than this (relative) to an integer is treated as that integer: 1/(1/3) is 3.0 in
# floating point, but user-supplied temperatures such as 0.333333333 should not produce a
# Bernoulli factory for P(x)^1e-9.
_INTEGER_RTOL = 1e-9


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
