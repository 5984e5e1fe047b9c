"""Tests for calm.sampling: exact and approximate temperature sampling from a black-box sampler.

Every test is deterministic (fixed seeds); statistical tolerances are derived from the sample
size (chi-square p-values, z-scores on standard errors).
"""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from calm.sampling import (
    SamplingLimitError,
    _log_weight_table,
    approx_probabilities,
    chunk_counts,
    sample_approx,
    sample_exact,
    split_inverse_temperature,
)

# Eight K=4 chunks; several share long prefixes, so equality must look at all four tokens.
SUPPORT = torch.tensor(
    [
        [1, 2, 3, 4],
        [1, 2, 3, 5],
        [1, 2, 6, 4],
        [1, 7, 3, 4],
        [8, 2, 3, 4],
        [9, 9, 9, 9],
        [0, 0, 0, 0],
        [1, 2, 3, 0],
    ]
)
PEAKED = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005], dtype=torch.float64)
FLAT = torch.full((8,), 1 / 8, dtype=torch.float64)
TEMPERATURES = [1.0, 0.5, 1 / 3, 0.7, 0.4]
P_MIN = 1e-3  # chi-square tests fail below this p-value


class Sampler:
    """A black-box sampler of chunks: row b draws from probs[b] over SUPPORT."""

    def __init__(self, probs: torch.Tensor, seed: int, support: torch.Tensor = SUPPORT, record=False):
        self.probs = probs.float()
        self.support = support
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[int] = []
        self.record = record
        self.blocks: list[torch.Tensor] = []

    def __call__(self, m: int) -> torch.Tensor:
        self.calls.append(m)
        idx = torch.multinomial(self.probs, m, replacement=True, generator=self.gen)
        block = self.support[idx]
        if self.record:
            self.blocks.append(block)
        return block


def support_index(chunks: torch.Tensor, support: torch.Tensor = SUPPORT) -> torch.Tensor:
    eq = (chunks.unsqueeze(-2) == support).all(-1)
    assert bool(eq.any(-1).all()), "sampler returned a chunk outside the support"
    return eq.float().argmax(-1)


def tempered(p: torch.Tensor, temperature: float) -> torch.Tensor:
    q = p ** (1 / temperature)
    return q / q.sum(-1, keepdim=True)


def chisquare_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; categories with expected count < 5 are pooled."""
    impossible = probs == 0
    assert float(observed[impossible].sum()) == 0, "observed an outcome of probability 0"
    observed, probs = observed[~impossible], probs[~impossible]
    total = float(observed.sum())
    expected = probs / probs.sum() * total
    small = expected < 5
    obs, exp = observed[~small].tolist(), expected[~small].tolist()
    if bool(small.any()):
        obs.append(float(observed[small].sum()))
        exp.append(float(expected[small].sum()))
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


def expected_exact_draws(p: torch.Tensor, temperature: float) -> float:
    """E[draws] = (1 + S_1 + ... + S_(n-1) + [alpha>0] S_(n+alpha-1)) / S_(n+alpha), S_a = sum P^a.

    Derivation: an attempt reads sample j+1 only if its first j samples agreed (probability
    S_j), so it costs 1 + sum_{j<n} S_j; it succeeds with x* = x w.p. P(x)^n; the Bernoulli
    factory then costs sum_k q^k prod_{i<=k}(1 - alpha/i) = p^(alpha-1) and accepts w.p.
    p^alpha; cycles are i.i.d., so by Wald E[draws] = E[cycle cost] / P(cycle accepts).
    """
    n, alpha = split_inverse_temperature(temperature)

    def s(a: float) -> float:
        return float((p[p > 0] ** a).sum())

    cycle = 1 + sum(s(j) for j in range(1, n)) + (s(n + alpha - 1) if alpha > 0 else 0.0)
    return cycle / s(n + alpha)


# ----------------------------------------------------------------------------------------------
# temperature validation and input checks
# ----------------------------------------------------------------------------------------------


def test_split_inverse_temperature():
    assert split_inverse_temperature(1.0) == (1, 0.0)
    assert split_inverse_temperature(0.5) == (2, 0.0)
    assert split_inverse_temperature(1 / 3) == (3, 0.0)
    assert split_inverse_temperature(0.333333333333) == (3, 0.0)
    n, alpha = split_inverse_temperature(0.4)
    assert n == 2 and alpha == pytest.approx(0.5)
    n, alpha = split_inverse_temperature(0.7)
    assert n == 1 and alpha == pytest.approx(1 / 0.7 - 1)


@pytest.mark.parametrize(
    "temperature, message",
    [(0, "T <= 0"), (-1, "T <= 0"), (1.5, "flatten"), (float("nan"), "NaN"), (float("inf"), "flatten")],
)
def test_bad_temperature(temperature, message):
    candidates = SUPPORT[:3].unsqueeze(0)
    with pytest.raises(ValueError, match=message):
        sample_exact(Sampler(FLAT.expand(2, 8), 0), temperature)
    with pytest.raises(ValueError, match=message):
        sample_approx(candidates, temperature)
    if temperature == 1.5:  # the message explains why T > 1 is impossible without logits
        with pytest.raises(ValueError, match="probabilities"):
            sample_approx(candidates, temperature)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, N, K\]"):
        sample_approx(SUPPORT, 0.5)  # rank 2
    with pytest.raises(ValueError, match=r"\[B, N, K\]"):
        chunk_counts(SUPPORT[0])
    with pytest.raises(TypeError, match="integer"):
        sample_approx(SUPPORT.float().unsqueeze(0), 0.5)
    with pytest.raises(ValueError, match=r"shape \[B, 2, K\]"):
        sample_exact(lambda m: SUPPORT[:m], 0.5)  # draw returns [m, K]
    with pytest.raises(ValueError, match=r"shape \[B, 2, K\]"):
        sample_exact(lambda m: SUPPORT[:3].unsqueeze(0), 0.5)  # wrong m
    with pytest.raises(ValueError, match="on_limit"):
        sample_exact(Sampler(FLAT.expand(2, 8), 0), 0.5, on_limit="ignore")
    with pytest.raises(ValueError, match="max_draws"):
        sample_exact(Sampler(FLAT.expand(2, 8), 0), 0.5, max_draws=0)


# ----------------------------------------------------------------------------------------------
# chunk_counts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_chunk_counts_matches_pairwise_comparison(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (64, 40, 4), generator=gen)
    x[:, :, :2] = 0  # many chunks differ only in their last two tokens
    x[5] = 7  # a row of identical chunks
    x[6] = torch.arange(160).view(40, 4)  # a row of distinct chunks
    x = x.to(dtype)
    brute = (x.unsqueeze(2) == x.unsqueeze(1)).all(-1).sum(-1)
    counts = chunk_counts(x)
    assert counts.dtype == torch.long
    assert torch.equal(counts, brute)
    assert torch.equal(chunk_counts(x[:, :1]), torch.ones(64, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# sample_exact
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name, probs, rows", [("peaked", PEAKED, 8000), ("flat", FLAT, 3000)])
def test_exact_matches_target_and_expected_cost(name, probs, rows, temperature):
    draw = Sampler(probs.expand(rows, 8), seed=1)
    gen = torch.Generator().manual_seed(2)
    out, stats = sample_exact(draw, temperature, max_draws=10_000, generator=gen, return_stats=True)
    assert out.shape == (rows, 4) and out.dtype == torch.long
    assert stats.num_hit_limit == 0
    assert all(m == stats.draws_per_call for m in draw.calls) and stats.calls == len(draw.calls)

    observed = torch.bincount(support_index(out), minlength=8).double()
    target = tempered(probs, temperature)
    assert chisquare_pvalue(observed, target) > P_MIN, (observed / rows, target)

    draws = stats.draws.double()
    expected = expected_exact_draws(probs, temperature)
    if temperature == 1.0:
        assert torch.all(stats.draws == 1) and stats.calls == 1
    else:
        se = float(draws.std()) / math.sqrt(rows)
        assert abs(float(draws.mean()) - expected) < 5 * se, (float(draws.mean()), expected, se)


@pytest.mark.parametrize("scan", ["tensor", "scalar"])
def test_exact_mixed_rows_each_match_their_target(monkeypatch, scan):
    import calm.exact_sampling as exact_sampling  # the module whose sample_exact reads the limit

    monkeypatch.setattr(exact_sampling, "_SCALAR_SCAN_MAX_ROWS", 10**9 if scan == "scalar" else 0)
    rows, temperature = 6000, 0.4
    probs = torch.stack([PEAKED, FLAT, PEAKED.flip(0)]).repeat(rows // 3, 1)
    draw = Sampler(probs, seed=3)
    out, stats = sample_exact(
        draw, temperature, max_draws=10_000, generator=torch.Generator().manual_seed(4), return_stats=True
    )
    idx = support_index(out)
    for kind in range(3):
        p = probs[kind]
        observed = torch.bincount(idx[kind::3], minlength=8).double()
        assert chisquare_pvalue(observed, tempered(p, temperature)) > P_MIN
        mean = float(stats.draws[kind::3].double().mean())
        se = float(stats.draws[kind::3].double().std()) / math.sqrt(rows // 3)
        assert abs(mean - expected_exact_draws(p, temperature)) < 5 * se


def test_exact_t1_is_one_draw():
    draw = Sampler(PEAKED.expand(5, 8), seed=0, record=True)
    out = sample_exact(draw, 1.0)
    assert draw.calls == [1]
    assert torch.equal(out, draw.blocks[0][:, 0])


def test_exact_is_reproducible_with_seeds():
    outs = [
        sample_exact(Sampler(PEAKED.expand(300, 8), seed=5), 0.7, generator=torch.Generator().manual_seed(6))
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])


def _mode_first_seen(chunks: list[tuple]) -> tuple:
    counts = Counter(chunks)
    top = max(counts.values())
    return next(c for c in chunks if counts[c] == top)


def test_exact_limit_falls_back_to_most_frequent_draw_and_reports_it():
    # 64 equally likely chunks at T = 1/4: an attempt succeeds with probability 64^-3, so the flat
    # rows always hit max_draws; rows with a one-point distribution succeed in n = 4 draws.
    support = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).view(64, 3)
    support = torch.cat([torch.full((64, 1), 5), support], 1)
    flat, point = torch.full((64,), 1 / 64), torch.zeros(64)
    point[17] = 1.0
    probs = torch.stack([flat, point]).repeat(50, 1)  # rows alternate flat, point mass
    draw = Sampler(probs, seed=7, support=support, record=True)
    max_draws = 20
    out, stats = sample_exact(draw, 0.25, max_draws=max_draws, on_limit="fallback", return_stats=True)

    is_flat = torch.arange(100) % 2 == 0
    assert torch.equal(stats.hit_limit, is_flat)
    assert stats.num_hit_limit == 50
    assert torch.all(stats.draws[is_flat] == max_draws)
    assert torch.all(stats.draws[~is_flat] == 4)
    assert torch.all(out[~is_flat] == support[17])
    stream = torch.cat(draw.blocks, 1)
    for b in torch.nonzero(is_flat).flatten().tolist():
        seen = [tuple(c) for c in stream[b, :max_draws].tolist()]
        assert tuple(out[b].tolist()) == _mode_first_seen(seen)

    with pytest.raises(SamplingLimitError, match=r"50 of 100 rows.*max_draws=20"):
        sample_exact(Sampler(probs, seed=7, support=support), 0.25, max_draws=max_draws, on_limit="raise")


class RowSampler:
    """Row b's i-th draw is a pure function of (b, i): a row's stream does not depend on which
    other rows are drawn for (needed for `active_rows` and batch-independence tests)."""

    def __init__(self, probs: torch.Tensor, seed: int, support: torch.Tensor = SUPPORT):
        self.probs, self.support, self.seed = probs.float(), support, seed
        self.used = torch.zeros(probs.shape[0], dtype=torch.long)  # draws made so far, per row
        self.calls: list[tuple[int, int]] = []  # (m, rows drawn for)

    def stream(self, row: int, start: int, m: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + row)
        idx = torch.multinomial(self.probs[row], start + m, replacement=True, generator=g)[start:]
        return self.support[idx]

    def __call__(self, m: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(self.probs.shape[0]) if rows is None else rows
        self.calls.append((m, rows.numel()))
        out = torch.stack([self.stream(r, int(self.used[r]), m) for r in rows.tolist()])
        self.used[rows] += m
        return out


def row_uniform(seeds: list[int]):
    """uniform(key, m) whose row b values depend only on (seeds[b], key)."""

    def uniform(key: int, m: int) -> torch.Tensor:
        rows = [
            torch.rand(m, generator=torch.Generator().manual_seed(s * 7919 + key + 1), dtype=torch.float64)
            for s in seeds
        ]
        return torch.stack(rows)

    return uniform


def test_exact_limit_approx_fallback_is_sample_approx_on_the_draws():
    """Default on_limit="approx": a row that exhausts max_draws gets sample_approx's choice over
    exactly the draws it consumed, with the uniform the hook gives for key -1."""
    probs = torch.stack([FLAT, PEAKED]).repeat(20, 1)
    seeds = list(range(40))
    draw = Sampler(probs, seed=3, record=True)
    uniform = row_uniform(seeds)
    out, stats = sample_exact(draw, 0.2, max_draws=6, uniform=uniform, return_stats=True)
    assert stats.num_hit_limit > 5  # T = 1/5 over 8 chunks rarely finishes within 6 draws
    stream = torch.cat(draw.blocks, 1)
    hit = stats.hit_limit
    expect = sample_approx(stream[hit][:, :6], 0.2, uniforms=uniform(-1, 1)[hit, 0])
    assert torch.equal(out[hit], expect)
    assert torch.all(stats.draws[hit] == 6)


def test_exact_approx_fallback_distribution_given_limit():
    """Rows forced to the limit (max_draws = 3 < n = 4) output chunk x with the probability
    `approx_probabilities` gives over their 3 draws (here every row sees the same 3 draws)."""
    cand = SUPPORT[[0, 0, 5]].unsqueeze(0)  # chunk 0 twice, chunk 5 once
    rows = 6000
    draw = lambda m: cand.expand(rows, 3, 4)[:, :m]  # noqa: E731
    out = sample_exact(draw, 0.25, max_draws=3, draws_per_call=3, generator=torch.Generator().manual_seed(1))
    p = approx_probabilities(cand, 0.25)[0]
    target = torch.tensor([float(p[0] + p[1]), float(p[2])], dtype=torch.float64)
    idx = support_index(out)
    observed = torch.tensor([float((idx == 0).sum()), float((idx == 5).sum())])
    assert chisquare_pvalue(observed, target) > P_MIN


@pytest.mark.parametrize("temperature", [0.5, 0.4, 0.3])
def test_exact_active_rows_and_row_uniforms_are_batch_independent(temperature):
    """With a per-row sampler and per-row uniforms, drawing only for unfinished rows gives the
    same chunks as drawing for all rows, and a row's chunk is the same alone as in the batch."""
    probs = torch.stack([PEAKED, FLAT, PEAKED.flip(0)]).repeat(4, 1)
    seeds = [11 + b for b in range(12)]
    kw = dict(max_draws=40, draws_per_call=2, max_draws_per_call=16, return_stats=True)
    full_draw = RowSampler(probs, seed=5)
    full, st_full = sample_exact(lambda m: full_draw(m), temperature, uniform=row_uniform(seeds), **kw)
    part_draw = RowSampler(probs, seed=5)
    part, st_part = sample_exact(part_draw, temperature, uniform=row_uniform(seeds), active_rows=True, **kw)
    assert torch.equal(full, part)
    assert torch.equal(st_full.draws, st_part.draws) and torch.equal(st_full.hit_limit, st_part.hit_limit)
    # the block size doubles from 2 up to 16, and later calls only draw for unfinished rows
    sizes = [m for m, _ in part_draw.calls]
    assert sizes[:4] == [2, 4, 8, 16][: len(sizes)] and all(m <= 16 for m in sizes[4:])
    assert sum(sizes) <= 40  # the last block is cut to the bound
    assert sum(m * r for m, r in part_draw.calls) < sum(m * r for m, r in full_draw.calls)
    for b in range(12):
        alone_draw = RowSampler(probs[b : b + 1], seed=5)
        alone_draw.stream = lambda row, start, m, b=b: full_draw.stream(b, start, m)
        alone = sample_exact(
            alone_draw, temperature, uniform=row_uniform(seeds[b : b + 1]), active_rows=True, **kw
        )[0]
        assert torch.equal(alone[0], full[b])


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.4, 0.7])
def test_exact_scalar_scan_equals_tensor_scan(monkeypatch, temperature):
    """The CPU scan over Python values and the vectorised tensor scan are the same algorithm:
    same draws and coins in, same chunks, draw counts, attempts and limit hits out."""
    import calm.exact_sampling as exact_sampling  # the module whose sample_exact reads the limit

    used = []  # which scan each run used: patching the wrong module would compare a scan with itself

    def spy(scan_class):
        class Spy(scan_class):
            def __init__(self, *args):
                used.append(scan_class.__name__)
                super().__init__(*args)

        return Spy

    for name in ("_ScalarScan", "_TensorScan"):
        monkeypatch.setattr(exact_sampling, name, spy(getattr(exact_sampling, name)))
    probs = torch.stack([PEAKED, FLAT, PEAKED.flip(0), FLAT]).repeat(25, 1)
    runs = []
    for max_rows in (10**9, 0):  # scalar scan, then tensor scan
        monkeypatch.setattr(exact_sampling, "_SCALAR_SCAN_MAX_ROWS", max_rows)
        out, st = sample_exact(
            Sampler(probs, seed=9),
            temperature,
            max_draws=30,
            draws_per_call=3,
            max_draws_per_call=12,
            generator=torch.Generator().manual_seed(2),
            return_stats=True,
        )
        runs.append((out, st))
    assert used == ["_ScalarScan", "_TensorScan"]
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b)
    for field in ("draws", "attempts", "hit_limit"):
        assert torch.equal(getattr(sa, field), getattr(sb, field)), field
    assert sa.calls == sb.calls


def test_exact_rejects_bad_uniform_hook():
    with pytest.raises(ValueError, match="uniform"):
        sample_exact(Sampler(FLAT.expand(2, 8), 0), 0.4, uniform=lambda key, m: torch.rand(3, m))
    with pytest.raises(ValueError, match="max_draws_per_call"):
        sample_exact(Sampler(FLAT.expand(2, 8), 0), 0.4, max_draws_per_call=0)


# ----------------------------------------------------------------------------------------------
# sample_approx
# ----------------------------------------------------------------------------------------------


def reference_selection_logits(row: list[tuple], temperature: float) -> list[float]:
    """Straightforward one-row implementation of the documented rule, with math.comb.

    Uses the other form of the acceptance probability, A = 1 - sum_{k<=j} b_k C(j,k)/C(M,k)
    with b_k = (alpha/k) prod_{i<k}(1 - alpha/i), j = N - c, M = N - m.
    """
    n, alpha = split_inverse_temperature(temperature)
    N = len(row)
    counts = Counter(row)
    if n == 1 and alpha == 0:
        return [0.0] * N
    m = min(n, max(counts.values()))
    M = N - m

    def accept(c: int) -> float:
        j, total, b = N - c, 0.0, alpha
        for k in range(1, j + 1):
            total += b * math.comb(j, k) / math.comb(M, k)
            b *= (k - alpha) / (k + 1)
        return 1.0 - total

    logits = []
    for x in row:
        c = counts[x]
        logits.append(math.log(math.comb(c, m) * accept(c) / c) if c >= m else -math.inf)
    return logits


def mixed_candidates(rows: int, N: int, seed: int) -> torch.Tensor:
    """Rows of different kinds: peaked, flat, all distinct (ladder to m=1), all identical."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [PEAKED, FLAT, PEAKED.flip(0)]
    out = []
    for r in range(rows):
        if r % 5 == 3:
            out.append(torch.arange(N * 4).view(N, 4) + 100 * r)
        elif r % 5 == 4:
            out.append(SUPPORT[r % 8].expand(N, 4))
        else:
            idx = torch.multinomial(kinds[r % 5].float(), N, replacement=True, generator=gen)
            out.append(SUPPORT[idx])
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.25, 0.4, 0.7, 0.3])
def test_approx_equals_per_row_reference(temperature):
    N, rows, seed = 24, 40, 11
    cand = mixed_candidates(rows, N, seed)
    out = sample_approx(cand, temperature, generator=torch.Generator().manual_seed(seed))
    # same randomness: sample_approx draws one [B, N] float64 uniform tensor for Gumbel-max
    u = torch.rand(rows, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u))
    probs = approx_probabilities(cand, temperature)
    for b in range(rows):
        row = [tuple(c) for c in cand[b].tolist()]
        logits = torch.tensor(reference_selection_logits(row, temperature), dtype=torch.float64)
        assert torch.allclose(probs[b], torch.softmax(logits, 0), rtol=1e-9, atol=1e-12)
        pick = int((logits + gumbel[b]).argmax())
        assert row[pick] == tuple(out[b].tolist()), (b, temperature)


def test_approx_samples_follow_selection_probabilities():
    # One fixed candidate set, repeated: the sampled chunks follow approx_probabilities.
    rows, N = 20_000, 30
    gen = torch.Generator().manual_seed(12)
    cand = SUPPORT[torch.multinomial(PEAKED.float(), N, replacement=True, generator=gen)]
    idx = support_index(cand)
    prob_chunk = torch.zeros(8, dtype=torch.float64).index_add_(
        0, idx, approx_probabilities(cand[None], 0.4)[0]
    )
    out = sample_approx(cand.expand(rows, N, 4), 0.4, generator=torch.Generator().manual_seed(13))
    observed = torch.bincount(support_index(out), minlength=8).double()
    assert chisquare_pvalue(observed, prob_chunk) > P_MIN


def test_fractional_weight_is_unbiased_for_truncated_series():
    # E_c[W_n(c)] / C(N, n) over c ~ Binomial(N, p) equals p^n (1 - sum_{k<=N-n} b_k q^k), which is
    # within p^n prod_{i<=N-n}(1 - alpha/i) of the target p^(n+alpha).
    from scipy.stats import binom

    for N, n, alpha in [(30, 2, 0.5), (50, 1, 0.3), (12, 3, 0.9)]:
        w = _log_weight_table(N, n, alpha).exp()
        c = torch.arange(N + 1)
        for p in [0.02, 0.3, 0.8, 1.0]:
            pmf = torch.tensor(binom.pmf(c.numpy(), N, p), dtype=torch.float64)
            mean = float((pmf * w).sum()) / math.comb(N, n)
            b, series, q = alpha, 1.0, 1 - p
            for k in range(1, N - n + 1):
                series -= b * q**k
                b *= (k - alpha) / (k + 1)
            assert mean == pytest.approx(p**n * series, rel=1e-9, abs=1e-15)
            bound = p**n * math.prod(1 - alpha / i for i in range(1, N - n + 1))
            slack = 1e-12 * p**n  # float rounding
            assert -slack <= mean - p ** (n + alpha) <= bound + slack


# Zipf-like distribution over 20 chunks: harder than SUPPORT for small N.
ZIPF_SUPPORT = torch.cat([torch.arange(20).unsqueeze(1), torch.tensor([[3, 1, 4]]).expand(20, 3)], 1)
ZIPF = 1 / torch.arange(1, 21, dtype=torch.float64)
ZIPF = ZIPF / ZIPF.sum()


def approx_output_distribution(N: int, temperature: float, rows: int, seed: int):
    """Output distribution of sample_approx over ZIPF, averaged over `rows` candidate sets
    (Rao-Blackwellised: exact given each set), and its standard error per chunk."""
    gen = torch.Generator().manual_seed(seed)
    per_row = []
    step = max(1, 1_000_000 // N)
    for start in range(0, rows, step):
        b = min(step, rows - start)
        idx = torch.multinomial(ZIPF, b * N, replacement=True, generator=gen).view(b, N)
        probs = approx_probabilities(ZIPF_SUPPORT[idx], temperature)
        per_row.append(torch.zeros(b, 20, dtype=torch.float64).scatter_add_(1, idx, probs))
    per_row = torch.cat(per_row)
    return per_row.mean(0), per_row.std(0) / math.sqrt(rows)


@pytest.mark.parametrize("temperature", [0.5, 0.4])
def test_approx_total_variation_falls_with_n(temperature):
    target = tempered(ZIPF, temperature)
    tvs, noise = [], []
    for N, rows in [(10, 2000), (50, 2000), (200, 4000), (1000, 6000)]:
        dist, se = approx_output_distribution(N, temperature, rows, seed=N)
        assert float(dist.sum()) == pytest.approx(1.0)
        tvs.append(0.5 * float((dist - target).abs().sum()))
        # 0.5 * sum of per-chunk standard errors: an upper bound on the scale of the Monte-Carlo
        # error of the TV estimate (which inflates small TVs).
        noise.append(0.5 * float(se.sum()))
    for i in range(3):  # each step is a clear drop, not noise
        assert tvs[i + 1] + 2 * noise[i + 1] < 0.75 * tvs[i], (tvs, noise)
    # close to the target at large N, for integer and fractional 1/T alike
    assert tvs[-1] < 0.005, (tvs, noise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_distribution():
    dev = torch.device("cuda")
    cand = mixed_candidates(20, 16, 0)
    cpu = approx_probabilities(cand, 0.4)
    gpu = approx_probabilities(cand.to(dev), 0.4)
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-9, atol=1e-12)
    out = sample_approx(cand.to(dev), 0.4, generator=torch.Generator(dev).manual_seed(0))
    assert out.device.type == "cuda" and out.shape == (20, 4)
    assert torch.equal(chunk_counts(cand.to(dev)).cpu(), chunk_counts(cand))

    support, probs = SUPPORT.to(dev), PEAKED.float().to(dev).expand(4000, 8)
    gen = torch.Generator(dev).manual_seed(1)

    def draw(m):
        return support[torch.multinomial(probs, m, replacement=True, generator=gen)]

    res = sample_exact(draw, 0.4, generator=torch.Generator(dev).manual_seed(2))
    observed = torch.bincount(support_index(res.cpu()), minlength=8).double()
    assert chisquare_pvalue(observed, tempered(PEAKED, 0.4)) > P_MIN


# Many distinct chunks: uniform over 1000 is flat (S_2 = 1/1000), over 40 "medium" (S_2 = 1/40).
BIG_SUPPORT = torch.arange(4000).view(1000, 4)
BIG_FLAT = torch.full((1000,), 1 / 1000, dtype=torch.float64)
MEDIUM = torch.cat([torch.full((40,), 1 / 40, dtype=torch.float64), torch.zeros(960, dtype=torch.float64)])


class PositionSampler:
    """Row b's i-th draw is a pure function of (seed, b, i), whatever the calls ask for."""

    def __init__(self, probs: torch.Tensor, seed: int, length: int = 512):
        g = torch.Generator().manual_seed(seed)
        self.seq = [BIG_SUPPORT[torch.multinomial(p.float(), length, True, generator=g)] for p in probs]
        self.used = torch.zeros(probs.shape[0], dtype=torch.long)
        self.calls: list[int] = []

    def __call__(self, m: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(self.seq)) if rows is None else rows
        self.calls.append(m)
        out = torch.stack([self.seq[r][int(self.used[r]) : int(self.used[r]) + m] for r in rows.tolist()])
        self.used[rows] += m
        return out


def position_uniform(seeds: list[int], length: int = 512):
    """uniform(key, m): coins key .. key + m - 1 of each row's own sequence; key -1: its choice."""
    seqs = [
        torch.rand(length + 1, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds
    ]

    def uniform(key: int, m: int) -> torch.Tensor:
        return torch.stack([s[-1:].expand(m) if key < 0 else s[key : key + m] for s in seqs])

    return uniform


@pytest.mark.parametrize("temperature", [0.5, 1 / 2.2, 0.4, 1 / 3])
def test_exact_result_does_not_depend_on_how_draws_are_split_into_calls(temperature):
    """With draws and coins indexed by draw position, any schedule of calls reads the same
    values, so every row's chunk and draw count are the same (rows of several flatnesses,
    some finishing early, some at the bound of 200)."""
    flat250 = torch.cat([torch.full((250,), 1 / 250), torch.zeros(750)]).double()
    peaked = torch.cat([PEAKED, torch.zeros(992, dtype=torch.float64)])
    probs = torch.stack([MEDIUM, flat250, peaked, BIG_FLAT]).repeat(5, 1)
    seeds = list(range(20))
    runs = []
    for first, cap in [(1, None), (2, 16), (8, 64), (200, None)]:
        draw = PositionSampler(probs, seed=1)
        out, st = sample_exact(
            draw,
            temperature,
            max_draws=200,
            draws_per_call=first,
            max_draws_per_call=cap,
            uniform=position_uniform(seeds),
            active_rows=True,
            return_stats=True,
        )
        runs.append((out, st, draw.calls))
    assert len({tuple(calls) for _, _, calls in runs}) == 4
    out0, st0, _ = runs[0]
    assert 0 < st0.num_hit_limit < 20  # some rows accept, some reach the bound
    for out, st, _ in runs[1:]:
        assert torch.equal(out, out0)
        assert torch.equal(st.draws, st0.draws) and torch.equal(st.hit_limit, st0.hit_limit)


@pytest.mark.parametrize("temperature", [0.4, 1 / 2.2])
def test_exact_asks_coins_by_draw_position(temperature):
    draw = PositionSampler(BIG_FLAT.expand(3, 1000), seed=1)
    keys = []
    coins = position_uniform([0, 1, 2])

    def uniform(key: int, m: int) -> torch.Tensor:
        keys.append((key, m))
        return coins(key, m)

    sample_exact(
        draw,
        temperature,
        max_draws=40,
        draws_per_call=2,
        max_draws_per_call=16,
        uniform=uniform,
        active_rows=True,
    )
    assert draw.calls == [2, 4, 8, 16, 10]  # doubling, the last call cut to the bound
    assert keys == [(0, 2), (2, 4), (6, 8), (14, 16), (30, 10), (-1, 1)]  # coins of draws 0.., 2.., ...


# ---------------------------------------------------------------------------------------------
# temper_logits: the token sampler's logits / T (issue 16)


@pytest.mark.parametrize("T", [1e-3, 1e-30, 1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperature_sampling_is_greedy(T, dtype):
    from calm.sampling import inverse_cdf_choice, temper_logits

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 500, generator=g) * 3).to(dtype)
    logits[:, -1] = logits.min() - 1  # the last id is never the answer (the old NaN path chose it)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    tempered = temper_logits(logits, 1.0 / T)
    assert not torch.isnan(tempered).any()
    if T <= 1e-30:  # gaps / T overflow or dwarf every float64 exponent: exactly greedy
        assert torch.equal(inverse_cdf_choice(tempered, u), logits.argmax(-1))
    # at any T the maximum keeps the largest weight
    assert torch.equal(tempered.argmax(-1), logits.argmax(-1))


def test_temper_logits_is_logits_over_t():
    from calm.sampling import temper_logits

    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(temper_logits(logits, 2.0), (logits - logits.amax(-1, keepdim=True)) * 2.0)
    # exact ties at the maximum share the mass as T -> 0 (the limit of softmax(l / T))
    p = torch.softmax(temper_logits(logits, float("inf")), -1)
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))
