"""BrierLM estimators (calm.brier): unbiasedness against exact Brier-n on toy models.

Exact Brier-n = 2 P(y_{1..n}) - sum_x P(x_{1..n})^2 is computed by enumeration on tiny
vocabularies; an estimator's mean over R independent runs (the same window replicated R times in
one batch) must match it within a few standard errors, the standard error estimated from the
runs. Seeds are fixed, so the tests are deterministic; the 4.5-sigma bound would fail by chance
with probability < 1e-5 per comparison if the seeds were not.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from calm.brier import (
    NGRAM,
    _fork_cache,
    ar_positions,
    ar_window_scores,
    calm_positions,
    calm_window_scores,
)
from calm.config import ARConfig, BackboneConfig, CALMConfig
from calm.metrics import brier_lm
from calm.models.transformer import KVCache

Z_MAX = 4.5


def _cache_config(max_len: int = 4096) -> BackboneConfig:
    return BackboneConfig(d_model=2, num_layers=1, num_heads=1, ffn_dim=2, max_seq_len=max_len)


class MarkovLM(nn.Module):
    """A token model whose next-token distribution is A[last token] (same interface as TokenTransformer)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(kind="ar", vocab_size=A.shape[0], max_seq_len=4096)
        self.register_buffer("log_a", A.log())
        self.dummy = nn.Parameter(torch.zeros(1))

    def logits(self, tokens, positions=None, valid=None, cache=None):
        if cache is not None:
            cache.reserve(tokens.shape[1], valid)
        return self.log_a[tokens]

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return KVCache(_cache_config(), batch_size, max_len or 4096, "cpu", torch.float32)


class ChunkMarkovCALM(nn.Module):
    """A CALM-style sampler: the next chunk (K tokens) ~ Q[last token of the previous chunk]."""

    def __init__(self, Q: torch.Tensor, K: int):
        super().__init__()
        V = Q.shape[0]
        assert Q.shape[1] == V**K
        self.config = SimpleNamespace(kind="calm", chunk_size=K, vocab_size=V, max_seq_len=4096)
        self.register_buffer("Q", Q)
        self.register_buffer("digits", V ** torch.arange(K - 1, -1, -1))
        self.dummy = nn.Parameter(torch.zeros(1))

    def hidden(self, tokens, *, token_valid=None, positions=None, valid=None, cache=None):
        K, V = self.config.chunk_size, self.config.vocab_size
        chunks = tokens if tokens.dim() == 3 else tokens.unflatten(-1, (tokens.shape[-1] // K, K))
        if cache is not None:
            cache.reserve(chunks.shape[1], valid)
        return nn.functional.one_hot(chunks[..., -1], V).float()

    def sample_chunks(self, hidden, num_samples=1, generator=None):
        V = self.config.vocab_size
        probs = self.Q[hidden.argmax(-1)]  # [..., V^K]
        flat = probs.reshape(-1, probs.shape[-1])
        ids = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        ids = ids.view(*probs.shape[:-1], num_samples)
        return (ids[..., None] // self.digits) % V  # [..., n, K]

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return KVCache(_cache_config(), batch_size, max_len or 4096, "cpu", torch.float32)


def _random_dist(rows: int, cols: int, gen: torch.Generator, sharpness: float = 2.0) -> torch.Tensor:
    return torch.softmax(sharpness * torch.randn(rows, cols, generator=gen, dtype=torch.float64), -1)


def _z_scores(runs: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """runs [R, ...]: per-run estimates; z = (mean - exact) / (sd / sqrt(R)); where the estimate
    has no spread (Brier-1 of the token baseline is exact) it must equal `exact` to float32 precision."""
    mean = runs.mean(0)
    se = runs.std(0) / math.sqrt(runs.shape[0])
    diff = mean - exact
    z = diff / se.clamp_min(1e-300)
    return torch.where(se > 0, z, torch.where(diff.abs() < 1e-5, 0.0, math.inf))


# ------------------------------------------------------------------------- exact by enumeration
def _ngram_dists_from_sequences(seq_probs: dict[tuple, float], V: int) -> list[torch.Tensor]:
    """P_n over V^n (n = 1..4) from a distribution over token sequences of length >= 4."""
    P4 = torch.zeros((V,) * NGRAM, dtype=torch.float64)
    for seq, p in seq_probs.items():
        P4[seq[:NGRAM]] += p
    return [_marginal(P4, n) for n in range(1, NGRAM + 1)]


def _marginal(P4: torch.Tensor, n: int) -> torch.Tensor:
    """Distribution of the first n tokens (note: sum over an empty dim tuple would sum everything)."""
    return P4 if n == NGRAM else P4.sum(dim=tuple(range(n, NGRAM)))


def _exact_brier(dists: list[torch.Tensor], y: list[int]) -> torch.Tensor:
    return torch.tensor(
        [
            2 * float(dists[n - 1][tuple(y[:n])]) - float(dists[n - 1].square().sum())
            for n in range(1, NGRAM + 1)
        ],
        dtype=torch.float64,
    )


def _markov_exact(A: torch.Tensor, window: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    V = A.shape[0]
    out = []
    for t in positions.tolist():
        probs = {}
        for seq in itertools.product(range(V), repeat=NGRAM):
            p, prev = 1.0, int(window[t - 1])
            for x in seq:
                p *= float(A[prev, x])
                prev = x
            probs[seq] = p
        out.append(_exact_brier(_ngram_dists_from_sequences(probs, V), window[t : t + NGRAM].tolist()))
    return torch.stack(out)  # [P, 4]


def _chunk_markov_exact(
    Q: torch.Tensor, K: int, window: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    V = Q.shape[0]
    steps = math.ceil(NGRAM / K)
    chunks = list(itertools.product(range(V), repeat=K))  # index = base-V number
    out = []
    for t in positions.tolist():
        probs = {}
        for path in itertools.product(range(len(chunks)), repeat=steps):
            p, prev = 1.0, int(window[t - 1])
            seq = ()
            for c in path:
                p *= float(Q[prev, c])
                seq += chunks[c]
                prev = chunks[c][-1]
            probs[seq] = probs.get(seq, 0.0) + p
        out.append(_exact_brier(_ngram_dists_from_sequences(probs, V), window[t : t + NGRAM].tolist()))
    return torch.stack(out)


# ------------------------------------------------------------------------- token baseline
@pytest.mark.parametrize("collision", ["pair", "expected"])
def test_ar_estimator_unbiased_on_markov_model(collision):
    gen = torch.Generator().manual_seed(1)
    V, T, R = 5, 14, 3000
    A = _random_dist(V, V, gen, sharpness=1.5)
    model = MarkovLM(A)
    window = torch.randint(0, V, (T,), generator=gen)
    positions = ar_positions(T)
    exact = _markov_exact(A, window, positions)  # [P, 4]

    scores = ar_window_scores(
        model,
        window.expand(R, T),
        generator=torch.Generator().manual_seed(2),
        collision=collision,
        max_cache_bytes=10_000,
    )  # several position groups
    assert scores.estimates.shape == (R, len(positions), NGRAM)
    assert torch.equal(scores.context, positions)
    # Brier-1 needs no sampling: exact in every run.
    torch.testing.assert_close(
        scores.estimates[:, :, 0], exact[:, 0].expand(R, -1).to(scores.estimates.dtype), atol=1e-6, rtol=0
    )
    # Per position and n, and averaged over positions (what BrierLM uses).
    z_pos = _z_scores(scores.estimates, exact)
    z_avg = _z_scores(scores.estimates.mean(1), exact.mean(0))
    assert z_pos.abs().max() < Z_MAX, z_pos
    assert z_avg.abs().max() < Z_MAX, z_avg
    # Power: the test could tell a wrong answer apart (the standard errors are small).
    se = scores.estimates.mean(1).std(0) / math.sqrt(R)
    assert float(se.max()) < 0.01


def test_ar_expected_collision_has_lower_variance():
    gen = torch.Generator().manual_seed(3)
    V, T, R = 5, 12, 2000
    model = MarkovLM(_random_dist(V, V, gen, sharpness=1.0))
    window = torch.randint(0, V, (T,), generator=gen)
    var = {}
    for c in ("pair", "expected"):
        est = ar_window_scores(
            model, window.expand(R, T), generator=torch.Generator().manual_seed(4), collision=c
        )
        var[c] = est.estimates.var(0).mean(0)  # per n
    assert torch.all(var["expected"][1:] < var["pair"][1:]), var


def _sharp_token_transformer(V: int = 5, seed: int = 0) -> nn.Module:
    from calm.models.ar import TokenTransformer

    torch.manual_seed(seed)
    cfg = ARConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_seq_len=64)
    model = TokenTransformer(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(25.0)  # peaked, context-dependent distributions
    return model


def _transformer_exact(model, window: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Exact Brier-n per position by running the model on every 3-token continuation."""
    V = model.config.vocab_size
    out = []
    with torch.no_grad():
        for t in positions.tolist():
            prefixes = torch.tensor(list(itertools.product(range(V), repeat=NGRAM - 1)))  # [V^3, 3]
            seqs = torch.cat([window[:t].expand(len(prefixes), t), prefixes], 1)
            p = torch.softmax(model.logits(seqs).double(), -1)[:, t - 1 :]  # [V^3, 4, V]
            P4 = p[:, 0].gather(1, prefixes[:, :1])[:, 0]
            P4 = P4 * p[:, 1].gather(1, prefixes[:, 1:2])[:, 0] * p[:, 2].gather(1, prefixes[:, 2:3])[:, 0]
            P4 = (P4[:, None] * p[:, 3]).view((V,) * NGRAM)  # P(a1, a2, a3, x4)
            dists = [_marginal(P4, n) for n in range(1, NGRAM + 1)]
            out.append(_exact_brier(dists, window[t : t + NGRAM].tolist()))
    return torch.stack(out)


@pytest.mark.parametrize(("collision", "shared"), [("pair", True), ("expected", True), ("pair", False)])
def test_ar_estimator_matches_enumeration_on_a_transformer(collision, shared):
    """A real TokenTransformer: exact Brier-n by enumeration agrees with the batched estimator
    (this also checks that every rollout sees exactly its own context through the forked cache)."""
    model = _sharp_token_transformer()
    gen = torch.Generator().manual_seed(5)
    T, R = 11, 1500
    window = torch.randint(0, 5, (T,), generator=gen)
    positions = ar_positions(T)
    exact = _transformer_exact(model, window, positions)
    assert exact[:, 3].abs().max() > 0.05  # not a degenerate case
    scores = ar_window_scores(
        model,
        window.expand(R, T),
        generator=torch.Generator().manual_seed(6),
        collision=collision,
        max_cache_bytes=15_000_000 if not shared else 2_000_000,  # groups of 2 positions
        shared_prefix=shared,
    )
    torch.testing.assert_close(scores.estimates[0, :, 0], exact[:, 0], atol=1e-5, rtol=0)
    z = _z_scores(scores.estimates, exact)
    assert z.abs().max() < Z_MAX, z
    # Cross-entropy bookkeeping: every next-token prediction in the windows.
    ce = scores.nll_sum / scores.nll_count
    assert scores.nll_count == R * (T - 1)
    assert ce == pytest.approx(float(model.loss(window[None])[0].detach()), rel=1e-5)


def test_fork_cache_gives_each_row_its_own_context():
    """A continuation fed through a forked cache computes what a fresh pass over context + token does."""
    model = _sharp_token_transformer(V=7, seed=1)
    gen = torch.Generator().manual_seed(7)
    B, T = 2, 12
    windows = torch.randint(0, 7, (B, T), generator=gen)
    cache = model.new_cache(B, T)
    model.logits(windows, cache=cache)
    ctx = torch.tensor([1, 3, 6, 8, 2, 5])  # rows' context lengths
    rows = torch.tensor([0, 0, 1, 1, 1, 0])
    nxt = torch.randint(0, 7, (len(rows), 2), generator=gen)
    fork = _fork_cache(cache, rows, int(ctx.max()), ctx, 2)
    out1 = model.logits(nxt[:, :1], positions=ctx[:, None], cache=fork)[:, 0]
    out2 = model.logits(nxt[:, 1:], positions=ctx[:, None] + 1, cache=fork)[:, 0]
    for r in range(len(rows)):
        seq = torch.cat([windows[rows[r], : ctx[r]], nxt[r]])[None]
        ref = model.logits(seq)[0]
        torch.testing.assert_close(out1[r], ref[-2])
        torch.testing.assert_close(out2[r], ref[-1])


def test_fork_cache_never_aliases_the_base_cache():
    """Forks are copies even when a view would do (one row per base row, or one base row)."""
    model = _sharp_token_transformer(V=7, seed=1)
    for B, g in ((1, 1), (1, 3), (2, 1)):
        cache = model.new_cache(B, 10)
        model.logits(torch.randint(0, 7, (B, 10)), cache=cache)
        before = [k.clone() for k in cache.keys]
        fork = _fork_cache(cache, g, 10, torch.full((B * g,), 10), 0)
        for k in fork.keys:
            k[0].zero_()
        assert all(torch.equal(a, b) for a, b in zip(before, cache.keys))
        if g > 1:
            assert not torch.equal(fork.keys[0][0], fork.keys[0][1])


@pytest.mark.parametrize("shared", [True, False])
def test_ar_rollouts_see_exactly_their_context(monkeypatch, shared):
    """Every batched rollout step computes what a fresh pass over (window[:t] + sampled prefix)
    computes: rows are not mixed up between windows or positions, and no row sees past its t.
    Both rollout paths: shared-prefix attention over one cache per window, and forked caches."""
    import calm.brier as brier

    model = _sharp_token_transformer(V=7, seed=2).float()
    model.config.num_kv_heads = 1  # grouped-query attention: 2 query heads share 1 kv head
    _regroup_kv_heads(model)
    windows = torch.randint(0, 7, (3, 13), generator=torch.Generator().manual_seed(3))
    calls = []
    original = brier._ar_step

    def recording(model_, roll, tokens, positions):
        out = original(model_, roll, tokens, positions)
        assert roll.shared == shared
        calls.append((tokens.clone(), positions.clone(), out.clone()))
        return out

    monkeypatch.setattr(brier, "_ar_step", recording)
    budget = 3_000 if shared else 40_000  # several query groups either way
    ar_window_scores(
        model,
        windows,
        generator=torch.Generator().manual_seed(4),
        max_cache_bytes=budget,
        shared_prefix=shared,
    )
    assert len(calls) % (NGRAM - 1) == 0 and len(calls) > NGRAM - 1  # several groups, 3 steps each
    checked = 0
    for g in range(0, len(calls), NGRAM - 1):
        steps = calls[g : g + NGRAM - 1]
        t = steps[0][1]
        for b in range(len(windows)):
            for q in range(len(t)):
                prefix = torch.stack([s[0][b, q] for s in steps])
                assert [int(s[1][q]) for s in steps] == [int(t[q]) + j for j in range(NGRAM - 1)]
                seq = torch.cat([windows[b, : t[q]], prefix])[None]
                ref = model.logits(seq)[0, -(NGRAM - 1) :]
                got = torch.stack([s[2][b, q] for s in steps])
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked == len(windows) * len(ar_positions(13))


def _regroup_kv_heads(model) -> None:
    """Rebuild k/v projections for config.num_kv_heads (a GQA variant of a tiny model)."""
    for block in model.backbone.layers:
        a = block.attn
        a.kv_heads = model.config.kv_heads
        d = model.config.d_model
        for name in ("k_proj", "v_proj"):
            lin = torch.nn.Linear(d, a.kv_heads * a.head_dim, bias=False)
            torch.nn.init.normal_(lin.weight, std=0.5)
            setattr(a, name, lin)


@pytest.mark.parametrize("V", [5, 300, 1024])
def test_next_token_sampler_follows_the_distribution(V):
    """Two-level inverse-CDF sampling (blocks of 128, padded when V is not a multiple)."""
    from calm.brier import _NextToken

    gen = torch.Generator().manual_seed(V)
    logits = 2.5 * torch.randn(3, V, generator=gen)
    logits[1, : V // 2] = -float("inf")  # zero-probability tokens are never drawn
    nt = _NextToken(logits)
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(nt.square, p.square().sum(-1), rtol=1e-5, atol=0)
    n = 100_000
    draws = nt.sample(n, torch.Generator().manual_seed(1))  # [3, n]
    assert draws.shape == (3, n) and int(draws.min()) >= 0 and int(draws.max()) < V
    assert not bool((draws[1] < V // 2).any())
    counts = torch.stack([torch.bincount(d, minlength=V) for d in draws]).double()
    expected = p * n
    ok = expected >= 10  # normal approximation per cell; the rest pooled
    z = (counts - expected)[ok] / (expected * (1 - p)).sqrt()[ok]
    assert float(z.abs().max()) < 5.0, float(z.abs().max())
    rest = (counts - expected).masked_fill(ok, 0).sum(-1) / expected.masked_fill(ok, 0).sum(-1).clamp_min(
        1
    ).sqrt()
    assert float(rest.abs().max()) < 5.0


# ------------------------------------------------------------------------- CALM
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_calm_estimator_unbiased_on_chunk_sampler(K):
    gen = torch.Generator().manual_seed(10 + K)
    V = 3 if K < 4 else 2
    T, R = 4 * K + 8, 3000
    Q = _random_dist(V, V**K, gen, sharpness=1.5)
    model = ChunkMarkovCALM(Q, K)
    window = torch.randint(0, V, (T,), generator=gen)
    positions = calm_positions(T, K)
    exact = _chunk_markov_exact(Q, K, window, positions)
    scores = calm_window_scores(
        model, window.expand(R, T), generator=torch.Generator().manual_seed(20 + K), max_cache_bytes=20_000
    )
    assert torch.equal(scores.context, positions)
    assert scores.estimates.shape == (R, len(positions), NGRAM)
    z_pos = _z_scores(scores.estimates, exact)
    z_avg = _z_scores(scores.estimates.mean(1), exact.mean(0))
    assert z_pos.abs().max() < Z_MAX, (z_pos, exact)
    assert z_avg.abs().max() < Z_MAX, z_avg
    assert float((scores.estimates.mean(1).std(0) / math.sqrt(R)).max()) < 0.03


@pytest.mark.parametrize("shared", [True, False])
def test_calm_rollout_continues_each_sample_on_its_own_tokens(shared):
    """K = 2: the rollout's hidden state for a sample equals a fresh pass over context + that sample."""
    from calm.models.calm import CALM

    torch.manual_seed(0)
    cfg = CALMConfig(
        vocab_size=11,
        chunk_size=2,
        latent_dim=4,
        d_model=16,
        num_layers=2,
        num_heads=2,
        ffn_dim=32,
        max_seq_len=32,
        noise_dim=4,
        autoencoder={
            "vocab_size": 11,
            "chunk_size": 2,
            "latent_dim": 4,
            "d_model": 16,
            "ffn_dim": 32,
            "pad_id": 8,
            "mask_id": 9,
            "eot_id": 10,
        },
    )
    model = CALM(cfg).eval()
    with torch.no_grad():  # a head that actually depends on its input, so samples differ per context
        for p in model.head.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    seen = []
    original = model.sample_chunks

    def recording(hidden, n=1, generator=None):
        out = original(hidden, n, generator=generator)
        seen.append((hidden.clone(), out.clone()))
        return out

    model.sample_chunks = recording
    B, T = 2, 14
    windows = torch.randint(0, 8, (B, T), generator=torch.Generator().manual_seed(1))
    calm_window_scores(
        model,
        windows,
        generator=torch.Generator().manual_seed(2),
        max_cache_bytes=3000,  # several query groups
        shared_prefix=shared,
    )
    (_, first), rollouts = seen[0], seen[1:]
    P = len(calm_positions(T, 2))
    assert first.shape == (B, P, 2, 2)
    # One rollout step per group (K = 2 needs two chunks), several groups (small cache budget).
    assert len(rollouts) > 1
    assert sum(h.shape[1] for h, _ in rollouts) == P * 2
    rows = []
    for b in range(B):
        for i in range(P):
            for s in range(2):
                ctx = windows[b, : 2 * (i + 1)]
                seq = torch.cat([ctx, first[b, i, s]])[None]
                rows.append(model.hidden(seq)[0, -1])
    ref = torch.stack(rows)
    got = _ungroup([h for h, _ in rollouts], B, P)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def _ungroup(group_hiddens: list[torch.Tensor], B: int, P: int) -> torch.Tensor:
    """Concatenate per-group hidden states [B, q, d] (queries ordered (position, sample)) into
    (window, position, sample) rows."""
    return torch.cat(group_hiddens, 1).reshape(B * P * 2, -1)


# ------------------------------------------------------------------------- positions, clamping
def test_calm_and_ar_score_the_same_contexts():
    T = 256
    for K in (1, 2, 4, 8):
        calm = calm_positions(T, K)
        ar = ar_positions(T, stride=K)
        assert torch.equal(calm, ar)
        assert int(calm.max()) <= T - NGRAM
        # With every position (the default), the context range is the same and the mean differs < K/2.
        full = ar_positions(T)
        assert int(full.max()) <= T - NGRAM and int(full.min()) == 1
        assert abs(float(full.double().mean()) - float(calm.double().mean())) <= K / 2


def test_too_small_blocks_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        calm_positions(7, 4)
    with pytest.raises(ValueError, match="too small"):
        ar_positions(4)


def test_negative_briers_clamp_to_zero_brier_lm():
    """A confidently wrong model: all four Brier-n are negative. BrierLM must be 0; clamping only
    the product (the reference code) would give a spurious positive score."""
    V = 4
    A = torch.full((V, V), 0.02, dtype=torch.float64)
    A[torch.arange(V), (torch.arange(V) + 1) % V] = 1 - 0.02 * (V - 1)  # predicts last+1 ...
    window = 2 * (torch.arange(40) % 2)  # ... but the text alternates 0, 2, 0, 2
    model = MarkovLM(A)
    est = ar_window_scores(model, window.expand(64, -1), generator=torch.Generator().manual_seed(0))
    means = est.estimates.mean((0, 1))
    assert bool((means < 0).all()), means
    assert brier_lm(means.tolist()) == 0.0
    reference_style = 100 * max(float(means.prod()), 0.0) ** 0.25
    assert reference_style > 0  # what clamping only the product reports


def test_seed_reproducibility():
    gen = torch.Generator().manual_seed(0)
    model = MarkovLM(_random_dist(5, 5, gen))
    windows = torch.randint(0, 5, (3, 20), generator=gen)
    a = ar_window_scores(model, windows, generator=torch.Generator().manual_seed(9)).estimates
    b = ar_window_scores(model, windows, generator=torch.Generator().manual_seed(9)).estimates
    c = ar_window_scores(model, windows, generator=torch.Generator().manual_seed(10)).estimates
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
