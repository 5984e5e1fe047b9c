"""The decoder object (calm.decoding): exactly the tokens of ChunkAutoencoder.decode on every path,
and draw classes that tell head samples apart exactly as their full chunks would."""

import pytest
import torch

from calm.config import AutoencoderConfig, CALMConfig
from calm.decoding import ChunkDecoder, DrawClasses, tied_argmax
from calm.models.calm import CALM


def _calm(vocab=300, K=4, spread=1.0, seed=0) -> CALM:
    torch.manual_seed(seed)
    ae = AutoencoderConfig(vocab_size=vocab, chunk_size=K, latent_dim=8, d_model=32, ffn_dim=48)
    cfg = CALMConfig(
        d_model=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=48,
        max_seq_len=32,
        vocab_size=vocab,
        chunk_size=K,
        latent_dim=8,
        noise_dim=6,
        autoencoder=ae.to_dict(),
        head_init="xavier",
    )
    model = CALM(cfg).eval()
    with torch.no_grad():  # `spread` sets how often two head samples decode alike
        model.head.final_layer.linears[-1].weight.mul_(spread)
    return model


@pytest.mark.parametrize("screen", [False, True])
def test_decode_equals_the_autoencoder_reference(screen):
    model = _calm(vocab=4096)
    dec = ChunkDecoder.for_model(model)
    dec.screen = screen  # both argmax paths, whatever this CPU has
    z = torch.randn(257, 8) * 3
    ref = model.autoencoder.decode(z)
    assert torch.equal(dec.decode(z), ref)
    # position by position gives the same tokens
    shared = dec.shared(z)
    by_position = torch.stack([dec.tokens_at(shared, k) for k in range(4)], -1)
    assert torch.equal(by_position, ref)
    # several positions in one pass (DrawClasses decodes the rest of a few chunks at once)
    assert torch.equal(dec.tokens_from(shared, 0), ref)
    assert torch.equal(dec.tokens_from(shared, 1), ref[:, 1:])
    assert torch.equal(dec.tokens_from(shared, 1, 3), ref[:, 1:3])
    h, noise = torch.randn(3, 32), torch.rand(3, 5, 6) - 0.5
    assert torch.equal(dec.sample(h, noise), model.autoencoder.decode(model.head(h, noise)))


def test_tied_argmax_ties_go_to_the_first_index():
    W = torch.randn(4096, 32)
    W[7] = W[3]  # exact tie between tokens 3 and 7
    h = W[3:4].clone() * 10
    assert tied_argmax(h, W, screen=True).item() == tied_argmax(h, W, screen=False).item() == 3


def test_decoder_follows_weight_changes():
    model = _calm(vocab=4096)
    dec = ChunkDecoder.for_model(model)
    z = torch.randn(64, 8) * 3
    dec.decode(z)  # builds the cached bf16 screen where this CPU has one
    with torch.no_grad():
        model.autoencoder.embed.weight.mul_(-1)  # the tied vocabulary matrix (and the screen's source)
        model.autoencoder.expand.weight.mul_(1.5)
    assert torch.equal(dec.decode(z), model.autoencoder.decode(z))


@pytest.mark.parametrize("spread", [1.0, 0.05, 0.0])
def test_draw_classes_match_full_decoding(spread):
    """Ids are equal exactly when the full chunks are, name the first draw of a chunk, never
    change as draws arrive in several calls, and `chunks` gives the full chunks."""
    model = _calm(vocab=40, spread=spread, seed=1)  # small vocabulary: prefixes often agree
    dec = ChunkDecoder.for_model(model)
    B, nd = 3, 6
    h = torch.randn(B, 32)
    noise = torch.rand(B, 23, nd) - 0.5
    classes = DrawClasses(dec, h)
    ids = torch.cat(
        [
            classes.draw(noise[:, :7]),
            classes.draw(noise[:, 7:8]),
            classes.draw(noise[:, 8:]),
        ],
        1,
    )[..., 0]
    full = model.autoencoder.decode(model.head(h, noise))  # [B, 23, K]
    for b in range(B):
        for j in range(23):
            first = next(i for i in range(23) if torch.equal(full[b, i], full[b, j]))
            assert ids[b, j].item() == first
    # A draw needs at least the shortest prefix that no other draw of its row has (all K if none);
    # one whose first token is unique costs exactly that token, and none costs more than K.
    same_prefix = (full[:, :, None, :] == full[:, None, :, :]).cumprod(-1)  # [B, 23, 23, K]
    others = same_prefix.sum(2) - 1  # [B, 23, K]: other draws sharing the first k + 1 tokens
    shortest = torch.where((others == 0).any(-1), (others > 0).sum(-1) + 1, 4)  # [B, 23]
    unique_first = shortest == 1
    known = classes.known[classes.flat[torch.arange(B).unsqueeze(1), torch.arange(23)]]
    assert torch.equal(known[unique_first], torch.ones_like(known[unique_first]))
    assert (known >= shortest).all()
    assert int(shortest.sum()) <= classes.positions_decoded <= int(unique_first.sum()) + 4 * int((~unique_first).sum())
    assert torch.equal(classes.chunks(ids[:, -1]), full[:, -1])
    assert torch.equal(classes.chunks(ids[:, 0]), full[:, 0])
    if spread == 0.0:  # every sample the same chunk: every draw decoded in full
        assert (ids == 0).all() and classes.positions_decoded == B * 23 * 4
    if spread == 1.0:
        assert unique_first.any()  # the case the lazy decoding saves work in occurs


def test_draw_classes_for_a_subset_of_rows():
    model = _calm(vocab=40, spread=0.05, seed=2)
    dec = ChunkDecoder.for_model(model)
    h = torch.randn(4, 32)
    noise = torch.rand(4, 10, 6) - 0.5
    classes = DrawClasses(dec, h)
    first = classes.draw(noise[:, :4])
    rows = torch.tensor([1, 3])
    later = classes.draw(noise[rows, 4:], rows)
    full = model.autoencoder.decode(model.head(h, noise))
    ids = torch.cat([first[rows], later], 1)[..., 0]
    for i, b in enumerate(rows.tolist()):
        for j in range(10):
            first_j = next(k for k in range(10) if torch.equal(full[b, k], full[b, j]))
            assert ids[i, j].item() == first_j
    assert torch.equal(classes.chunks(ids[:, 5], rows), full[rows, 5])


@pytest.mark.parametrize(
    "temperature,sampler", [(0.5, "exact"), (0.4, "exact"), (0.7, "exact"), (0.5, "approx")]
)
def test_lazy_draw_classes_give_the_chunks_of_full_decoding(temperature, sampler):
    """The CPU path (draws told apart position by position) chooses exactly the chunks that
    decoding every draw in full chooses, for the same row seeds."""
    from calm.calm_sampler import ChunkSampler
    from calm.rng import RowRandom

    model = _calm(vocab=40, spread=0.3, seed=3)
    h = torch.randn(5, 32)
    outs, positions = [], []
    for lazy in (True, False):
        stats = type("S", (), {"draws": 0, "decoded_positions": 0, "exact_hit_limit": 0, "fused_draws": 0})()
        s = ChunkSampler(
            model, RowRandom(range(5)), temperature=temperature, sampler=sampler, num_samples=48, stats=stats
        )
        s.lazy = lazy
        outs.append(torch.stack([s(h, step) for step in range(3)]))
        positions.append(stats.decoded_positions)
    assert torch.equal(outs[0], outs[1])
    assert positions[0] < positions[1]  # the point of it


@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_calm_exact_sampler_follows_the_tempered_distribution(temperature):
    """End to end through ChunkSampler (lazy draw classes): chunks drawn at temperature T follow
    P^(1/T)/Z, with P the model's own distribution at T = 1 (estimated from many more draws)."""
    from scipy.stats import chi2

    from calm.calm_sampler import ChunkSampler
    from calm.rng import RowRandom

    model = _calm(vocab=6, K=2, spread=0.4, seed=5)  # 36 possible chunks, a few likely ones
    h = torch.randn(1, 32).expand(4000, 32).contiguous()  # one context, 4000 independent rows

    def draw(T, seeds):
        s = ChunkSampler(model, RowRandom(seeds), temperature=T, num_samples=400)
        return s(h, 0)

    def counts(chunks):
        return torch.bincount(chunks[:, 0] * 6 + chunks[:, 1], minlength=36).double()

    p = sum(counts(draw(1.0, range(k * 4000, (k + 1) * 4000))) for k in range(25))  # 100k draws of P
    p = p / p.sum()
    target = p ** (1 / temperature)
    target = target / target.sum()
    observed = counts(draw(temperature, range(10**6, 10**6 + 4000)))
    keep = target * 4000 >= 5  # chi-square cells with enough expected counts; the rest pooled
    exp = torch.cat([target[keep] * 4000, (target[~keep] * 4000).sum().view(1)])
    obs = torch.cat([observed[keep], observed[~keep].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp.clamp_min(1e-9)).sum())
    dof = int(keep.sum())  # cells - 1, plus one pooled cell
    assert stat < chi2.ppf(0.999, dof), (stat, dof)
    # and it is not P itself: tempering concentrates mass on the likeliest chunk
    assert observed.max() / 4000 > p.max() + 0.05


def test_screen_is_chosen_per_call_by_its_size():
    """The bf16 screen has a fixed cost: it is used only where a call's rows x V x d repay it."""
    from calm.decoding import _fast_bf16, screen_pays

    W = torch.randn(4096, 128)
    assert not screen_pays(W, 1) and not screen_pays(W, 32)  # 2^24 multiply-adds or fewer
    assert screen_pays(W, 64) == _fast_bf16(W.device)  # 2^25: where bf16 matrix units exist
    assert not screen_pays(torch.randn(1024, 64), 4096)  # a small matrix never
    assert not screen_pays(W.double(), 4096)  # float32 only
