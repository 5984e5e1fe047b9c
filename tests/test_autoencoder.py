import torch

from calm.config import preset
from calm.models.autoencoder import ChunkAutoencoder


def _tiny(**kw):
    torch.manual_seed(0)
    return ChunkAutoencoder(preset("ae-tiny").replace(**kw))


def test_shapes_and_tied_output_matrix():
    ae = _tiny()
    assert ae.lm_head.weight is ae.embed.weight
    tokens = torch.randint(3, 512, (2, 12))
    chunks = ae.to_chunks(tokens)
    assert chunks.shape == (2, 3, 4)
    mu, log_std = ae.encode(chunks)
    assert mu.shape == log_std.shape == (2, 3, 16)
    assert ae.decode_logits(mu).shape == (2, 3, 4, 512)
    assert ae.decode(mu).shape == (2, 3, 4)


def test_chunks_are_encoded_independently():
    ae = _tiny().eval()
    a = torch.randint(3, 512, (1, 8))
    b = a.clone()
    b[0, 4:] = torch.randint(3, 512, (4,))
    mu_a, _ = ae.encode(ae.to_chunks(a))
    mu_b, _ = ae.encode(ae.to_chunks(b))
    torch.testing.assert_close(mu_a[:, 0], mu_b[:, 0])


def test_kl_is_clipped_from_below_per_dimension():
    ae = _tiny(token_mask_prob=0.0, latent_dropout=0.0).eval()
    # With the encoder output forced to the prior (μ=0, σ=1) every dimension's KL is 0 -> clipped to 0.5.
    with torch.no_grad():
        ae.to_latent.weight.zero_()
        ae.to_latent.bias.zero_()
    _, metrics = ae.loss(torch.randint(3, 512, (2, 8)))
    assert abs(float(metrics["kl"]) - 0.5 * 16) < 1e-5


def test_masking_uses_the_dedicated_mask_token(monkeypatch):
    ae = _tiny(token_mask_prob=0.5).train()
    seen = {}
    orig = ae.encode

    def spy(chunks):
        seen["chunks"] = chunks
        return orig(chunks)

    monkeypatch.setattr(ae, "encode", spy)
    tokens = torch.randint(3, 512, (4, 64))
    ae.loss(tokens)
    masked = seen["chunks"] != ae.to_chunks(tokens)
    assert masked.any()
    assert (seen["chunks"][masked] == ae.config.mask_id).all()
    assert ae.config.mask_id != 0


def test_learns_to_reconstruct():
    # Without the robustness noise the tiny model memorises 256 random chunks in a few hundred steps.
    ae = _tiny(token_mask_prob=0.0, latent_dropout=0.0)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(3, 64, (64, 16), generator=g)
    for _ in range(300):
        loss, _ = ae.loss(data[torch.randint(0, 64, (16,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    mu, _ = ae.encode(ae.to_chunks(data))
    acc = (ae.decode(mu) == ae.to_chunks(data)).float().mean()
    assert acc > 0.99
