"""calm.generation: padding invisibility, batch == one-by-one, end of text, seeds, errors, streaming.

Tiny random models (calm-tiny with ae-tiny, transformer-tiny). The CALM head's last layer is
initialised to zero (every sample would be the zero latent), so the fixtures give it random
weights: the head then produces varied samples and the samplers have something to do.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from calm.config import preset
from calm.generation import (
    GenerationError,
    RowRandom,
    _positions,
    choose_approx,
    generate,
    prepare_prompts,
    tied_argmax,
)
from calm.models import build_model
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM
from calm.rng import _mix64, _mix64_int

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40, 41, 42, 43]]  # lengths 5, 2, 13, 4 (K = 4)


def _calm(head_std: float = 0.5, seed: int = 0) -> CALM:
    torch.manual_seed(seed)
    model = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=head_std)
    return model.eval()


def _ar(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(preset("transformer-tiny")).eval()


@pytest.fixture(scope="module")
def calm_model():
    return _calm()


@pytest.fixture(scope="module")
def ar_model():
    return _ar()


# ---------------------------------------------------------------------------------------------
# pads are invisible


def test_calm_padded_batch_hidden_states_equal_unpadded_by_hand(calm_model):
    """The strongest statement: at every real chunk of every row, the hidden state of the
    left-padded batch equals the hidden state of that prompt alone, computed by hand without
    any padding machinery (the partial first chunk's missing tokens contribute zero vectors to
    the compression input, exactly as "no token there" would), whatever id sits in the pads."""
    m = calm_model
    K = m.config.chunk_size
    tokens, token_valid = prepare_prompts(PROMPTS, pad_id=1, chunk_size=K)
    chunks, tv = tokens.view(len(PROMPTS), -1, K), token_valid.view(len(PROMPTS), -1, K)
    cv = tv.any(-1)
    garbage = torch.randint(0, m.config.vocab_size, chunks.shape)
    with torch.no_grad():
        h = m.hidden(chunks, token_valid=tv, positions=_positions(cv), valid=cv)
        h_garbage = m.hidden(
            torch.where(tv, chunks, garbage), token_valid=tv, positions=_positions(cv), valid=cv
        )
        torch.testing.assert_close(h_garbage, h, rtol=0, atol=0)  # pad ids do not matter at all
        for b, p in enumerate(PROMPTS):
            n = math.ceil(len(p) / K)
            emb = m.embed(torch.tensor(p))  # [L, d]
            lead = n * K - len(p)
            emb = torch.cat([torch.zeros(lead, emb.shape[1]), emb])  # nothing where there is no token
            x = m.compress(emb.view(1, n, K * emb.shape[1]))
            ref = m.backbone(x)  # plain causal run: no positions, no mask, no cache
            torch.testing.assert_close(h[b, -n:], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "temperature,sampler",
    [
        (1.0, "approx"),
        (0.5, "approx"),
        (0.3, "approx"),
        (0.5, "exact"),
        (0.25, "exact"),
        (0.4, "exact"),
        (0.7, "exact"),
    ],
)
def test_calm_batch_equals_one_by_one(calm_model, temperature, sampler):
    """Left-padded batch (prompt lengths 5, 2, 13, 4 with K = 4) == each prompt alone, under
    the same per-row noise (row b of seed s uses seed s + b); for the exact sampler also at
    fractional 1/T (per-row Bernoulli-factory coins) and with rows finishing at different draws."""
    kw = dict(
        max_new_tokens=11,
        temperature=temperature,
        sampler=sampler,
        num_samples=64,
        max_draws=128,
        eos_id=None,
    )
    batch = generate(calm_model, PROMPTS, seed=7, **kw)
    alone = [generate(calm_model, [p], seed=7 + b, **kw)[0] for b, p in enumerate(PROMPTS)]
    assert batch == alone
    assert all(len(r) == 11 for r in batch)  # cut to exactly max_new_tokens (3 chunks of 4 -> 11)
    # the pad id is irrelevant
    assert generate(calm_model, PROMPTS, seed=7, pad_id=123, **kw) == batch


@pytest.mark.parametrize("temperature", [0.5, 0.4])
def test_calm_exact_result_does_not_depend_on_how_draws_are_split_into_calls(calm_model, temperature):
    """A row's j-th head sample and coin of a step are keyed by j, not by the call that drew
    it, so any schedule (first block 1, 8 or 64) gives the same text."""
    kw = dict(max_new_tokens=12, seed=4, temperature=temperature, sampler="exact", max_draws=96, eos_id=None)
    outs = [generate(calm_model, PROMPTS, draws_per_call=m, **kw) for m in (1, 8, 64)]
    assert outs[0] == outs[1] == outs[2]


def test_ar_batch_equals_one_by_one_and_pads_invisible(ar_model):
    kw = dict(max_new_tokens=9, temperature=0.8, eos_id=None)
    batch = generate(ar_model, PROMPTS, seed=3, **kw)
    alone = [generate(ar_model, [p], seed=3 + b, **kw)[0] for b, p in enumerate(PROMPTS)]
    assert batch == alone
    assert generate(ar_model, PROMPTS, seed=3, pad_id=77, **kw) == batch
    # prefill logits: padded batch == each prompt alone, at the real positions
    tokens, valid = prepare_prompts(PROMPTS, pad_id=0)
    with torch.no_grad():
        padded = ar_model.logits(tokens, positions=_positions(valid), valid=valid)
        for b, p in enumerate(PROMPTS):
            ref = ar_model.logits(torch.tensor([p]))
            torch.testing.assert_close(padded[b, -len(p) :], ref[0], rtol=1e-5, atol=1e-5)


def test_num_candidates_is_the_older_name_of_num_samples(calm_model):
    kw = dict(max_new_tokens=8, temperature=0.5, sampler="approx", seed=3, eos_id=None)
    assert generate(calm_model, PROMPTS, num_candidates=16, **kw) == generate(calm_model, PROMPTS, num_samples=16, **kw)
    assert generate(calm_model, PROMPTS, num_samples=16, **kw) != generate(calm_model, PROMPTS, num_samples=48, **kw)


def test_seed_list_and_generator(calm_model):
    kw = dict(max_new_tokens=8, temperature=0.5, num_samples=32, eos_id=None)
    assert (
        generate(calm_model, PROMPTS[:2], seed=[5, 9], **kw)[1]
        == generate(calm_model, [PROMPTS[1]], seed=9, **kw)[0]
    )
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert generate(calm_model, PROMPTS, generator=g1, **kw) == generate(
        calm_model, PROMPTS, generator=g2, **kw
    )


# ---------------------------------------------------------------------------------------------
# reproducibility, end of text, max_new_tokens


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_reproducible_with_seed(kind, calm_model, ar_model):
    model = calm_model if kind == "calm" else ar_model
    kw = dict(max_new_tokens=12, temperature=0.5, eos_id=None)
    a = generate(model, PROMPTS, seed=11, **kw)
    assert generate(model, PROMPTS, seed=11, **kw) == a
    assert generate(model, PROMPTS, seed=12, **kw) != a
    torch.manual_seed(0)
    b = generate(model, PROMPTS, **kw)  # seed=None: from torch's global RNG
    torch.manual_seed(0)
    assert generate(model, PROMPTS, **kw) == b


@pytest.mark.parametrize("kind", ["calm", "ar"])
@pytest.mark.parametrize("drop_finished", [True, False])
def test_end_of_text_stops_a_row_and_cuts_after_it(kind, drop_finished, calm_model, ar_model):
    model = calm_model if kind == "calm" else ar_model
    kw = dict(max_new_tokens=24, temperature=1.0)
    free = generate(model, PROMPTS, seed=2, eos_id=None, **kw)
    # an end-of-text id that occurs in some rows but not all: the first token of row 0's 6th position
    eos = free[0][5]
    assert any(eos not in r for r in free), "pick another token: every row would stop"
    cut = generate(model, PROMPTS, seed=2, eos_id=eos, drop_finished=drop_finished, **kw)
    for f, c in zip(free, cut):
        if eos in f:
            assert c == f[: f.index(eos) + 1]  # up to and including the end-of-text token
        else:
            assert c == f  # rows that never stop are untouched by the others stopping
    _, stats = generate(model, PROMPTS, seed=2, eos_id=eos, return_stats=True, **kw)
    assert stats.finished_by_eos == [eos in f for f in free]


def test_all_rows_finish_early_stops_the_loop(ar_model):
    free = generate(ar_model, [[3, 4]], seed=0, eos_id=None, max_new_tokens=30)
    eos = free[0][2]
    out, stats = generate(ar_model, [[3, 4]], seed=0, eos_id=eos, max_new_tokens=30, return_stats=True)
    assert out[0] == free[0][: free[0].index(eos) + 1]
    assert stats.steps == len(out[0])


@pytest.mark.parametrize("n", [1, 3, 4, 5, 9])
def test_calm_max_new_tokens_is_exact(calm_model, n):
    out = generate(calm_model, PROMPTS, max_new_tokens=n, seed=0, eos_id=None)
    assert [len(r) for r in out] == [n] * len(PROMPTS)


def test_tensor_input_and_single_prompt(calm_model):
    kw = dict(max_new_tokens=6, seed=4, eos_id=None)
    t = torch.tensor([PROMPTS[3], [1, 2, 3, 4]])
    assert generate(calm_model, t, **kw) == generate(calm_model, t.tolist(), **kw)
    assert generate(calm_model, PROMPTS[0], **kw) == generate(calm_model, [PROMPTS[0]], **kw)
    assert generate(calm_model, torch.tensor(PROMPTS[0]), **kw) == generate(calm_model, [PROMPTS[0]], **kw)


@pytest.mark.parametrize("sampler", ["approx", "exact"])
def test_low_temperature_sharpens(sampler):
    """A head whose chunk distribution has a mode of probability ~0.57 (then ~0.26, ~0.08, ...):
    at T = 1 the mode comes out ~57% of the time, at T = 0.25 (P^4 / Z: ~95%) far more often."""
    m = _calm(head_std=0.02)
    prompt = PROMPTS[3]
    # A dominant latent (the last layer's bias) whose samples decode to one chunk about half the
    # time, with the runner-up at most half as likely: the first bias draw that gives it (where
    # the draw falls relative to the random decoder's boundaries depends on the weights).
    for seed in range(1, 40):
        torch.manual_seed(seed)
        torch.nn.init.normal_(m.head.final_layer.linears[-1].bias, std=1.0)
        with torch.no_grad():
            ref = m.sample_chunks(m.hidden(torch.tensor([prompt]))[:, -1], 2000)[0]
        values, counts = torch.unique(ref, dim=0, return_counts=True)
        top = counts.sort(descending=True).values
        if 0.45 < top[0] / 2000 < 0.7 and (len(top) == 1 or top[1] <= top[0] / 2):
            break
    else:
        pytest.fail("no bias draw gave a mode of probability 0.45-0.7")
    mode = values[counts.argmax()].tolist()

    def mode_freq(T):
        out = generate(
            m, [prompt] * 80, max_new_tokens=4, temperature=T, sampler=sampler, seed=0, eos_id=None
        )
        return sum(r == mode for r in out) / len(out)

    assert mode_freq(1.0) < 0.75
    assert mode_freq(0.25) > 0.85


@pytest.mark.parametrize("T", [1e-4, 1e-40, 5e-324])  # 1/T overflows float32 (1e-40) and float64 (5e-324)
def test_ar_tiny_temperature_is_greedy(ar_model, T):
    out = generate(ar_model, [PROMPTS[0]], max_new_tokens=6, temperature=T, seed=0, eos_id=None)[0]
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(ar_model.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(PROMPTS[0]) :]


# ---------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_stream_pieces_in_order_concatenate_to_output(kind, calm_model, ar_model):
    model = calm_model if kind == "calm" else ar_model
    pieces: dict[int, list[list[int]]] = {}
    free = generate(model, PROMPTS, seed=5, eos_id=None, max_new_tokens=10)
    eos = free[1][4]
    out = generate(
        model,
        PROMPTS,
        seed=5,
        eos_id=eos,
        max_new_tokens=10,
        stream=lambda r, t: pieces.setdefault(r, []).append(t),
    )
    for row, toks in enumerate(out):
        assert sum(pieces[row], []) == toks
        if kind == "calm":  # one piece per step: K tokens each, except the last cut one
            assert all(len(p) == 4 for p in pieces[row][:-1])


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs(calm_model, ar_model):
    ok = dict(max_new_tokens=4)
    with pytest.raises(GenerationError, match="logits"):
        generate(calm_model, PROMPTS, temperature=1.5, **ok)
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(GenerationError, match="temperature"):
            generate(calm_model, PROMPTS, temperature=t, **ok)
        with pytest.raises(GenerationError, match="temperature"):
            generate(ar_model, PROMPTS, temperature=t, **ok)
    generate(ar_model, PROMPTS, temperature=1.5, **ok)  # fine for a model with logits
    with pytest.raises(GenerationError, match="unknown sampler 'greedy'"):
        generate(calm_model, PROMPTS, temperature=0.5, sampler="greedy", **ok)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(calm_model, [[1, 2], []], **ok)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(calm_model, [], **ok)
    for n in (0, -3, 2.5):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            generate(calm_model, PROMPTS, max_new_tokens=n)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(ar_model, [[1, 100000]], **ok)
    with pytest.raises(GenerationError, match="num_samples"):
        generate(calm_model, PROMPTS, temperature=0.5, num_samples=0, **ok)
    with pytest.raises(GenerationError, match="num_samples"):  # the older name is still checked
        generate(calm_model, PROMPTS, temperature=0.5, num_candidates=0, **ok)
    with pytest.raises(GenerationError, match="text"):
        generate(ar_model, "hello", **ok)


def test_prompt_longer_than_context_names_lengths(calm_model, ar_model):
    # calm-tiny: 64 chunks of 4 = 256 tokens; transformer-tiny: 256 tokens
    with pytest.raises(
        GenerationError, match=r"prompt 1 has 300 tokens \(75 chunks of 4 tokens\).*context of 64"
    ):
        generate(calm_model, [[1, 2], [3] * 300], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"prompt 0 has 257 tokens.*context of 256 tokens"):
        generate(ar_model, [[3] * 257], max_new_tokens=4)
    with pytest.raises(
        GenerationError, match=r"max_new_tokens=100 exceeds.*256 tokens.*max_new_tokens <= 16"
    ):
        generate(calm_model, [[3] * 244], max_new_tokens=100)
    assert len(generate(calm_model, [[3] * 244], max_new_tokens=16, eos_id=None)[0]) == 16  # the limit fits
    assert len(generate(ar_model, [[3] * 250], max_new_tokens=7, eos_id=None)[0]) == 7


def test_autoencoder_is_not_a_generator():
    with pytest.raises(GenerationError, match="autoencoder"):
        generate(ChunkAutoencoder(preset("ae-tiny")), [[1, 2]], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# building blocks


@pytest.mark.parametrize("V", [512, 1000, 4099])
def test_tied_argmax_screen_is_the_float32_argmax(V):
    torch.manual_seed(V)
    d, R = 64, 700
    W = torch.randn(V, d) * 0.05
    h = torch.randn(R, d) * 3
    direct = tied_argmax(h, W, screen=False)
    assert torch.equal(direct, F_linear_argmax(h, W))
    assert torch.equal(tied_argmax(h, W, screen=True), direct)
    # near ties: two rows of W that differ by 1e-6 relative, hidden states close to either
    W[1] = W[0] * (1 + 1e-6)
    W[-1] = W[0] * (1 - 1e-6)
    h = W[torch.randint(0, 2, (R,))] * 5 + 1e-4 * torch.randn(R, d)
    assert torch.equal(tied_argmax(h, W, screen=True), tied_argmax(h, W, screen=False))
    # all logits tied (zero hidden states): first index, like torch's argmax
    zero = torch.zeros(5, d)
    assert tied_argmax(zero, W, screen=True).tolist() == [0] * 5
    few = torch.randn(3, d)  # few rows take the [R, V] layout
    assert torch.equal(tied_argmax(few, W, screen=True), F_linear_argmax(few, W))


def F_linear_argmax(h, W):
    return (h @ W.T).argmax(-1)


def test_row_random_is_per_row_and_matches_splitmix64():
    a = RowRandom([3, 4, 5])
    b = RowRandom([4])
    ua = a.uniform((1, 2), (50, 3))
    assert ua.shape == (3, 50, 3) and 0 < ua.min() and ua.max() < 1
    torch.testing.assert_close(b.uniform((1, 2), (50, 3))[0], ua[1], rtol=0, atol=0)
    assert not torch.equal(a.uniform((1, 3), (50, 3)), ua)  # another stream
    a.select(torch.tensor([2]))
    torch.testing.assert_close(a.uniform((1, 2), (50, 3))[0], ua[2], rtol=0, atol=0)
    # the int64 tensor version of splitmix64's finaliser equals the unsigned 64-bit reference
    xs = [random.Random(0).getrandbits(64) for _ in range(1000)] + [
        0,
        1,
        (1 << 63) - 1,
        1 << 63,
        (1 << 64) - 1,
    ]
    signed = torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in xs])
    assert [y & ((1 << 64) - 1) for y in _mix64(signed).tolist()] == [_mix64_int(x) for x in xs]
    assert _mix64_int(0) == 0
    # an offset continues the stream: element i + offset, whatever the split (large offsets too)
    whole = a.uniform((7,), (40, 3), torch.float64)
    assert torch.equal(a.uniform((7,), (30, 3), torch.float64, offset=30), whole[:, 10:])
    far = 1 << 62
    assert torch.equal(a.bits((7,), 5, far)[:, 2:], a.bits((7,), 3, far + 2))
    # rough uniformity
    u = RowRandom(range(8)).uniform((5,), (20000,), torch.float64)
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002


def test_a_bf16_model_generates_reproducibly(calm_model):
    import copy

    model = copy.deepcopy(calm_model).to(torch.bfloat16)
    for sampler in ("exact", "approx"):
        kw = dict(max_new_tokens=8, temperature=0.5, sampler=sampler, num_samples=32, eos_id=None)
        a = generate(model, PROMPTS, seed=1, **kw)
        assert a == generate(model, PROMPTS, seed=1, **kw)
        assert all(len(r) == 8 and all(0 <= t < model.config.vocab_size for t in r) for r in a)


def test_choose_approx_follows_the_estimator():
    from calm.sampling import approx_probabilities

    torch.manual_seed(0)
    cands = torch.randint(0, 3, (2, 40, 2))  # 9 possible chunks, many repeats
    probs = approx_probabilities(cands, 0.4)
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # a uniform grid: the inverse CDF exactly
    picks = torch.stack([choose_approx(cands, 0.4, u[i].expand(2)) for i in range(n)])  # [n, 2, 2]
    for b in range(2):
        chunks, inverse = torch.unique(cands[b], dim=0, return_inverse=True)
        target = torch.zeros(len(chunks), dtype=torch.float64).index_add_(0, inverse, probs[b])
        got = torch.stack([(picks[:, b] == c).all(-1).double().mean() for c in chunks])
        torch.testing.assert_close(got, target, atol=2 / n, rtol=0)


def test_model_generate_methods_delegate(calm_model, ar_model):
    kw = dict(max_new_tokens=5, temperature=0.5, seed=2, eos_id=None)
    assert calm_model.generate(PROMPTS, **kw) == generate(calm_model, PROMPTS, **kw)
    assert ar_model.generate(PROMPTS, **kw) == generate(ar_model, PROMPTS, **kw)


@pytest.mark.slow
def test_compiled_decoding_equals_eager(calm_model, ar_model):
    """generate(compile=True): static KV cache and torch.compile'd steps, the same tokens."""
    ar = ar_model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # left padding in the static cache too
    for model, T in ((ar, 1.0), (ar, 0.7), (calm_model, 1.0), (calm_model, 0.5)):
        kw = dict(max_new_tokens=12, seed=1, temperature=T, eos_id=None, fused_kernel=False)
        if model is ar:
            kw.pop("fused_kernel")
        eager = generate(model, prompts, **kw)
        assert generate(model, prompts, compile=True, **kw) == eager
