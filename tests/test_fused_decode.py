"""The compiled head + decoder + argmax kernel (`calm.fused_decode`): same results as the modules."""

from __future__ import annotations

import pytest
import torch

from calm import fused_decode
from calm.config import AutoencoderConfig, CALMConfig, preset
from calm.generation import GenerationError, generate
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM

needs_kernel = pytest.mark.skipif(
    not fused_decode.available(), reason=f"the fused kernel is not available: {fused_decode._load()[1]}"
)


def _calm(shape: str = "tiny", seed: int = 0) -> CALM:
    torch.manual_seed(seed)
    if shape == "tiny":
        model = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    else:  # sizes that are not multiples of the vector width, 2 head blocks, 2 + 2 decoder blocks
        ae = ChunkAutoencoder(
            AutoencoderConfig(
                vocab_size=203, d_model=40, ffn_dim=100, latent_dim=12, num_layers=4, chunk_size=3
            )
        )
        cfg = CALMConfig(
            d_model=40, num_layers=1, num_heads=2, ffn_dim=100, max_seq_len=32, vocab_size=203,
            latent_dim=12, chunk_size=3, noise_dim=10, head_layers=2,
        )  # fmt: skip
        model = CALM.from_autoencoder(cfg, ae)
    return _spread_like_trained(model)


def _spread_like_trained(model: CALM) -> CALM:
    """A trained head's last layer is not zero; random decoder weights with larger spread give
    logits that are far from tied, like a trained autoencoder's. Returns the model in eval mode."""
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=0.5)
    for p in model.autoencoder.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _inputs(model: CALM, B: int, m: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, model.config.d_model, generator=g)
    noise = torch.rand(B, m, model.head.noise_dim, generator=g) - 0.5
    return h, noise


@needs_kernel
@pytest.mark.parametrize("shape", ["tiny", "odd"])
@pytest.mark.parametrize(("B", "m"), [(1, 1), (3, 2), (2, 5)])
def test_kernel_equals_the_modules(shape, B, m):
    model = _calm(shape)
    h, noise = _inputs(model, B, m)
    latents = torch.empty(B, m, model.config.latent_dim)
    chunks = fused_decode.head_decode(model.head, model.autoencoder, h, noise, latents=latents)
    with torch.no_grad():
        z = model.head(h, noise)
        torch.testing.assert_close(latents, z, rtol=1e-5, atol=1e-5)
        assert torch.equal(chunks, model.autoencoder.decode(z))
        # and from the kernel's own latents, so a near-tie in z cannot hide a decoder error
        assert torch.equal(chunks, model.autoencoder.decode(latents))
    assert chunks.shape == (B, m, model.config.chunk_size) and chunks.dtype == torch.long


@needs_kernel
def test_a_row_does_not_depend_on_the_rows_decoded_with_it():
    model = _calm("odd")
    h, noise = _inputs(model, 4, 2)
    whole = torch.empty(4, 2, model.config.latent_dim)
    chunks = fused_decode.head_decode(model.head, model.autoencoder, h, noise, latents=whole)
    for b in range(4):
        one = torch.empty(1, 2, model.config.latent_dim)
        c = fused_decode.head_decode(
            model.head, model.autoencoder, h[b : b + 1], noise[b : b + 1], latents=one
        )
        assert torch.equal(one[0], whole[b])  # bitwise
        assert torch.equal(c[0], chunks[b])


@needs_kernel
def test_ties_go_to_the_first_token_as_torch_argmax():
    model = _calm()
    with torch.no_grad():
        w = model.autoencoder.lm_head.weight
        w.copy_(w[7:8].expand_as(w))  # every logit equal
    h, noise = _inputs(model, 2, 3)
    chunks = fused_decode.head_decode(model.head, model.autoencoder, h, noise)
    with torch.no_grad():
        assert torch.equal(chunks, model.autoencoder.decode(model.head(h, noise)))
    assert (chunks == 0).all()


@needs_kernel
def test_kernel_follows_the_weights():
    model = _calm()
    h, noise = _inputs(model, 1, 4)
    before = fused_decode.head_decode(model.head, model.autoencoder, h, noise)
    with torch.no_grad():
        # in place (same storage) and replaced (a new tensor the cached plan must notice)
        model.head.noise_embd.weight.mul_(-1)
        model.autoencoder.from_latent.weight = torch.nn.Parameter(
            torch.randn_like(model.autoencoder.from_latent.weight)
        )
        after = fused_decode.head_decode(model.head, model.autoencoder, h, noise)
        assert torch.equal(after, model.autoencoder.decode(model.head(h, noise)))
    assert not torch.equal(before, after)


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generate_with_the_kernel_equals_generate_without(temperature):
    model = _calm()
    prompts = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33))]
    kw = dict(max_new_tokens=40, seed=3, eos_id=None, temperature=temperature, return_stats=True)
    for batch in ([prompts[0]], prompts):  # batch 1 at T = 1: every step fused
        fast, fast_stats = generate(model, batch, **kw)
        plain, plain_stats = generate(model, batch, fused_kernel=False, **kw)
        assert fast == plain
        assert plain_stats.fused_draws == 0
        assert fast_stats.draws == plain_stats.draws
    single, stats = generate(model, [prompts[0]], **kw)
    # at T < 1 the draws are told apart position by position (calm.decoding.DrawClasses) instead
    assert stats.fused_draws == (stats.draws if temperature == 1.0 else 0)


@needs_kernel
@pytest.mark.parametrize("ae_width", [24, 48])
def test_an_autoencoder_of_another_width_than_the_backbone_runs_in_the_kernel(ae_width):
    # The authors' releases pair a d = 512 autoencoder with d = 1024 backbones (24 vs 32 here;
    # 48: wider than the head, the scratch rows follow the widest). The C kernel had one width
    # for head and decoder and read past the decoder's weights (wrong chunks or a segfault);
    # the two widths are now separate sizes, each weight checked against them.
    torch.manual_seed(0)
    ae = ChunkAutoencoder(
        AutoencoderConfig(vocab_size=64, d_model=ae_width, ffn_dim=40, latent_dim=8, num_layers=2)
    )
    cfg = CALMConfig(
        d_model=32, num_layers=1, num_heads=2, ffn_dim=48, max_seq_len=32, vocab_size=64,
        latent_dim=8, noise_dim=8, head_layers=2,
    )  # fmt: skip
    model = _spread_like_trained(CALM.from_autoencoder(cfg, ae))
    h, noise = _inputs(model, 2, 3)
    latents = torch.empty(2, 3, 8)
    chunks = fused_decode.head_decode(model.head, model.autoencoder, h, noise, latents=latents)
    with torch.no_grad():
        torch.testing.assert_close(latents, model.head(h, noise), rtol=1e-5, atol=1e-5)
        assert torch.equal(chunks, model.autoencoder.decode(latents))
    kw = dict(max_new_tokens=16, seed=0, eos_id=None, return_stats=True)
    fast, stats = generate(model, [[1, 2, 3]], **kw)
    assert stats.fused_draws == stats.draws > 0
    assert fast == generate(model, [[1, 2, 3]], fused_kernel=False, **kw)[0]


@needs_kernel
def test_weights_of_the_wrong_shape_are_named_not_read():
    model = _calm("odd")
    ae = model.autoencoder
    ae.from_latent = torch.nn.Linear(ae.config.latent_dim + 1, ae.config.d_model)  # one input too many
    with pytest.raises(fused_decode.KernelUnavailable, match=r"from_latent\.weight has shape \[40, 13\]"):
        fused_decode.kernel_for(model.head, ae)
    model = _calm("odd")
    kernel = fused_decode.kernel_for(model.head, model.autoencoder)
    h, noise = _inputs(model, 2, 3)
    with pytest.raises(ValueError, match=r"noise has shape \[2, 3, 9\]"):
        kernel(h, noise[..., :9])
    with pytest.raises(ValueError, match=r"h has shape \[2, 39\]"):
        kernel(h[:, :39].contiguous(), noise)
    with pytest.raises(ValueError, match="latents has shape"):
        kernel(h, noise, latents=torch.empty(2, 3, 5))
    # a non-contiguous input is copied, not misread
    wide = torch.cat([noise, noise], dim=-1)[..., : noise.shape[-1]]
    assert not wide.is_contiguous()
    assert torch.equal(kernel(h, wide), kernel(h, noise))


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel cache and a forgotten library, restored afterwards."""
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path))
    fused_decode._load.cache_clear()
    yield tmp_path
    fused_decode._load.cache_clear()


def test_without_a_compiler_generation_falls_back(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_kernel / "no-such-c++"))
    assert not fused_decode.available()
    model = _calm()
    out, stats = generate(model, [[1, 2, 3]], max_new_tokens=12, seed=0, return_stats=True)
    assert stats.fused_draws == 0 and len(out[0]) <= 12
    with pytest.raises(GenerationError, match="could not compile.*no-such-c\\+\\+"):
        generate(model, [[1, 2, 3]], max_new_tokens=12, seed=0, fused_kernel=True)


def test_the_kernel_can_be_turned_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CALM_FUSED_KERNEL", "0")
    assert not fused_decode.available()
    with pytest.raises(fused_decode.KernelUnavailable, match="CALM_FUSED_KERNEL=0"):
        fused_decode.kernel_for(_calm().head, _calm().autoencoder)


@needs_kernel
def test_models_the_kernel_cannot_run_are_named():
    model = _calm().double()
    with pytest.raises(fused_decode.KernelUnavailable, match="float32"):
        fused_decode.kernel_for(model.head, model.autoencoder)
    out, stats = generate(model, [[1, 2, 3]], max_new_tokens=8, seed=0, return_stats=True)
    assert stats.fused_draws == 0
    with pytest.raises(GenerationError, match="float32"):
        generate(model, [[1, 2, 3]], max_new_tokens=8, seed=0, fused_kernel=True)
    with pytest.raises(GenerationError, match="stock"):  # discrete noise atoms: not in the kernel
        torch.manual_seed(0)
        cfg = preset("calm-tiny").replace(head_noise_atoms=4)
        generate(
            CALM.from_autoencoder(cfg, ChunkAutoencoder(preset("ae-tiny"))),
            [[1, 2, 3]],
            max_new_tokens=8,
            fused_kernel=True,
        )
