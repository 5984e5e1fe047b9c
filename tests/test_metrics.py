"""Tests for calm.metrics: Brier-n estimates, BrierLM and the accumulator's statistics."""

import math

import pytest
import torch

from calm.metrics import BrierAccumulator, brier_from_samples, brier_lm

# --------------------------------------------------------------------------------------------
# brier_from_samples: hand-made cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x1, x2, y, expected",
    [
        # both samples right: 1 + 1 - 1 at every n
        ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1]),
        # x1 right; x2 wrong from position 2 on: collision only for n = 1
        ([1, 2, 3, 4], [1, 9, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1]),
        # mismatch at position 2 zeroes Brier-2..4 indicators although positions 3, 4 agree again
        ([1, 9, 3, 4], [5, 5, 5, 5], [1, 2, 3, 4], [1, 0, 0, 0]),
        # both samples agree with each other, never with the truth: -1 at every n
        ([7, 7, 7, 7], [7, 7, 7, 7], [1, 2, 3, 4], [-1, -1, -1, -1]),
        # samples agree with each other everywhere, with the truth only at position 1
        ([1, 8, 3, 4], [1, 8, 3, 4], [1, 2, 3, 4], [1, -1, -1, -1]),
        # samples agree on a 2-prefix that is wrong at position 2, then differ
        ([1, 8, 3, 4], [1, 8, 0, 0], [1, 2, 3, 4], [1, -1, 0, 0]),
        # x1 right up to n = 3, x2 right up to n = 1, they agree up to n = 1
        ([1, 2, 3, 0], [1, 5, 3, 4], [1, 2, 3, 4], [1, 1, 1, 0]),
    ],
)
def test_brier_from_samples_hand_cases(x1, x2, y, expected):
    out = brier_from_samples(torch.tensor(x1), torch.tensor(x2), torch.tensor(y))
    assert out.dtype == torch.get_default_dtype()
    assert out.tolist() == expected


def test_brier_from_samples_batched_and_broadcast():
    y = torch.tensor([1, 2, 3, 4])
    x1 = torch.tensor([[[1, 2, 3, 4], [1, 9, 3, 4]], [[0, 0, 0, 0], [1, 2, 3, 0]]])  # [2, 2, 4]
    x2 = torch.tensor([1, 2, 0, 0])  # right for n <= 2 only
    out = brier_from_samples(x1, x2, y)
    assert out.shape == (2, 2, 4)
    assert out.tolist() == [[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 0, 0], [1, 1, 1, 0]]]


def test_brier_from_samples_bad_input():
    with pytest.raises(ValueError, match="same number of tokens"):
        brier_from_samples(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\[\.\.\., L\]"):
        brier_from_samples(torch.tensor(1), torch.tensor(1), torch.tensor(1))
    with pytest.raises(ValueError, match="broadcast"):
        brier_from_samples(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(4))


# --------------------------------------------------------------------------------------------
# brier_lm
# --------------------------------------------------------------------------------------------


def test_brier_lm_values():
    assert brier_lm([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)
    assert brier_lm([0.8, 0.4, 0.2, 0.1]) == pytest.approx(100 * (0.8 * 0.4 * 0.2 * 0.1) ** 0.25)
    assert isinstance(brier_lm((0.1, 0.2, 0.3, 0.4)), float)
    with pytest.raises(ValueError, match="average per-position estimates first"):
        brier_lm(torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]]))
    t = brier_lm(torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]]), per_row=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2,)
    assert t.tolist() == pytest.approx([50.0, 100.0])


def test_brier_lm_clamps_each_term_before_the_product():
    briers = [-0.1, -0.2, 0.3, 0.4]
    # the reference's clamp of the product alone would give a spurious positive score
    assert 100 * max(math.prod(briers), 0) ** 0.25 > 20
    assert brier_lm(briers) == 0.0
    assert brier_lm([0.3, 0.2, 0.1, -0.01]) == 0.0
    assert brier_lm(torch.tensor([-0.1, -0.2, 0.3, 0.4])).item() == 0.0


# --------------------------------------------------------------------------------------------
# unbiasedness on a toy chunk distribution
# --------------------------------------------------------------------------------------------

SUPPORT = torch.tensor(
    [
        [1, 2, 3, 4],
        [1, 2, 3, 5],
        [1, 2, 6, 4],
        [1, 7, 3, 4],
        [8, 2, 3, 4],
        [1, 2, 6, 6],
        [8, 8, 8, 8],
    ]
)
MODEL = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05], dtype=torch.float64)
DATA = torch.tensor([0.35, 0.1, 0.2, 0.05, 0.15, 0.1, 0.05], dtype=torch.float64)


def exact_brier_n(model: torch.Tensor, data: torch.Tensor, support: torch.Tensor) -> list[float]:
    """E_{y~data}[2 Q_n(y[:n])] - sum_prefix Q_n(prefix)^2, Q_n the model's n-prefix marginal."""
    out = []
    for n in range(1, support.shape[1] + 1):
        same = (support[:, None, :n] == support[None, :, :n]).all(-1).double()  # same n-prefix
        q_prefix = same @ model  # Q_n(prefix of chunk i), for every chunk i
        collision = float((model * q_prefix).sum())  # sum_prefix Q_n(prefix)^2
        out.append(float(2 * (data * q_prefix).sum()) - collision)
    return out


def draw_toy(rows: int, seed: int, shape=()):
    gen = torch.Generator().manual_seed(seed)

    def sample(p):
        total = rows * math.prod(shape)
        return SUPPORT[torch.multinomial(p, total, replacement=True, generator=gen)].view(*shape, rows, 4)

    return sample(MODEL), sample(MODEL), sample(DATA)


def test_mean_estimate_matches_exact_brier():
    rows = 200_000
    est = brier_from_samples(*draw_toy(rows, seed=0)).double()
    exact = torch.tensor(exact_brier_n(MODEL, DATA, SUPPORT), dtype=torch.float64)
    se = est.std(0) / math.sqrt(rows)
    assert torch.all((est.mean(0) - exact).abs() < 4 * se), (est.mean(0), exact, se)
    assert torch.all(exact > 0.05)  # the toy is in the regime where BrierLM is informative


# --------------------------------------------------------------------------------------------
# BrierAccumulator
# --------------------------------------------------------------------------------------------


def test_accumulator_statistics_match_direct_computation():
    gen = torch.Generator().manual_seed(1)
    est = torch.rand(1000, 4, generator=gen) * 2 - 0.5  # float estimates, as the AR estimator gives
    acc = BrierAccumulator()
    for part in est.split(137):
        acc.add(part.view(-1, 1, 4) if len(part) % 2 else part)  # any leading shape
    e = est.double()
    assert torch.allclose(acc.means(), e.mean(0))
    assert torch.allclose(acc.standard_errors(), e.std(0) / math.sqrt(1000))
    assert torch.allclose(acc.covariance(), torch.cov(e.T) / 1000)
    assert acc.counts.tolist() == [1000.0] * 4
    assert acc.brier_lm() == pytest.approx(brier_lm(e.mean(0).tolist()))

    # merge and all-reduce form give the same state
    a, b = BrierAccumulator(), BrierAccumulator()
    a.add(est[:400])
    b.add(est[400:])
    merged = BrierAccumulator.from_tensor(a.to_tensor() + b.to_tensor())
    assert torch.allclose(a.merge(b).to_tensor(), acc.to_tensor())
    assert torch.allclose(merged.to_tensor(), acc.to_tensor())

    summary = acc.summary()
    assert set(summary) >= {"brier_1", "brier_4_se", "brier_lm", "brier_lm_ci", "count"}
    assert summary["brier_lm_ci"][0] < summary["brier_lm"] < summary["brier_lm_ci"][1]


def test_accumulator_mask_counts_each_n_separately():
    gen = torch.Generator().manual_seed(2)
    est = torch.randn(500, 4, generator=gen).double()
    mask = torch.ones(500, 4, dtype=torch.bool)
    mask[:100, 3] = False  # e.g. positions without 4 tokens left: no Brier-4
    mask[:50, 2] = False
    est[~mask] = float("nan")  # masked entries are ignored, whatever they hold
    acc = BrierAccumulator()
    acc.add(est, mask)
    assert acc.counts.tolist() == [500, 500, 450, 400]
    for n in range(4):
        x = est[mask[:, n], n]
        assert acc.means()[n].item() == pytest.approx(x.mean().item())
        assert acc.standard_errors()[n].item() == pytest.approx(x.std().item() / math.sqrt(len(x)))
    # covariance of means over overlapping sets: n_ij s_ij / (n_i n_j)
    both = mask[:, 2] & mask[:, 3]
    s23 = torch.cov(est[both][:, 2:].T)[0, 1].item()
    assert acc.covariance()[2, 3].item() == pytest.approx(both.sum().item() * s23 / (450 * 400))


def test_accumulator_bad_input():
    acc = BrierAccumulator()
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        acc.add(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="at least two"):
        acc.confidence_interval()
    with pytest.raises(ValueError, match="broadcast"):
        acc.add(torch.zeros(10, 4), torch.ones(3, 4, dtype=torch.bool))


def test_confidence_interval_covers_truth():
    truth = brier_lm(exact_brier_n(MODEL, DATA, SUPPORT))
    acc = BrierAccumulator()
    acc.add(brier_from_samples(*draw_toy(50_000, seed=3)))
    lo, hi = acc.confidence_interval()
    assert lo < truth < hi
    assert hi - lo < 0.1 * truth  # and is informative
    lo_b, hi_b = acc.confidence_interval(method="bonferroni")
    assert lo_b < lo and hi < hi_b  # the conservative interval is wider


def test_confidence_interval_coverage():
    # 400 independent evaluations of 1000 positions each: the fraction of 95% intervals that
    # cover the true BrierLM is within 3 binomial standard deviations (0.033) of 0.95.
    reps, rows, level = 400, 1000, 0.95
    truth = brier_lm(exact_brier_n(MODEL, DATA, SUPPORT))
    est = brier_from_samples(*draw_toy(rows, seed=4, shape=(reps,)))
    covered = {"delta": 0, "bonferroni": 0}
    for r in range(reps):
        acc = BrierAccumulator()
        acc.add(est[r])
        for method in covered:
            lo, hi = acc.confidence_interval(level, method=method)
            covered[method] += lo <= truth <= hi
    tol = 3 * math.sqrt(level * (1 - level) / reps)
    assert abs(covered["delta"] / reps - level) < tol, covered
    assert covered["bonferroni"] / reps > level - tol, covered


def test_confidence_interval_with_negative_mean_falls_back():
    acc = BrierAccumulator()
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    means = torch.tensor([0.5, 0.3, 0.1, -0.005], dtype=torch.float64)
    acc.add((noise - noise.mean(0)) * 0.1 + means)  # Brier-4 estimate slightly below 0
    assert acc.brier_lm() == 0.0
    lo, hi = acc.confidence_interval()  # delta method impossible: Bonferroni-propagated interval
    assert (lo, hi) == acc.confidence_interval(method="bonferroni")
    assert lo == 0.0 and hi > 0.0  # Brier-4 may well be slightly positive
