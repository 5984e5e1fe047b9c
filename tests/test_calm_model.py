import pytest
import torch

from calm.config import AutoencoderConfig, CALMConfig, ConfigError, preset
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM


def _tiny_calm(**kw) -> CALM:
    torch.manual_seed(0)
    return CALM(preset("calm-tiny").replace(**kw))


def _with_random_head(model: CALM) -> CALM:
    with torch.no_grad():  # leave the zero-initialised start so that samples depend on h and noise
        model.head.final_layer.linears[-1].weight.normal_(std=0.05)
    return model


def test_frozen_autoencoder_no_grad_and_always_eval():
    model = _tiny_calm()
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    model.train()
    assert model.training and model.backbone.training and model.head.training
    assert not model.autoencoder.training
    model.eval()
    model.train(True)
    assert not model.autoencoder.training
    # the autoencoder travels in the state dict (one checkpoint directory is enough)
    keys = model.state_dict().keys()
    assert any(k.startswith("autoencoder.") for k in keys)
    loss, _ = model(torch.randint(3, 512, (2, 16)))
    loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.embed.weight.grad is not None and model.head.noise_embd.weight.grad is not None


def test_parameter_groups():
    model = _tiny_calm()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("autoencoder.") for n in trainable)
    prefixes = {n.split(".")[0] for n in trainable}
    assert prefixes == {"embed", "compress", "backbone", "head"}
    # the module layout the official-weights mapping relies on
    assert isinstance(model.compress[0], torch.nn.Linear) and isinstance(
        model.compress[3], torch.nn.LayerNorm
    )
    assert model.compress[0].in_features == 4 * 64 and model.compress[2].out_features == 64
    assert len(model.head.blocks) == model.config.num_head_layers == 1
    assert model.fsdp_units() == list(model.backbone.layers)
    # the input embedding is the model's own, not the autoencoder's
    assert model.embed.weight is not model.autoencoder.embed.weight


def test_from_autoencoder_copies_weights_and_checks_sizes():
    torch.manual_seed(1)
    ae = ChunkAutoencoder(preset("ae-tiny"))
    model = CALM.from_autoencoder(preset("calm-tiny"), ae)
    assert model.config.autoencoder == ae.config.to_dict()
    for k, v in ae.state_dict().items():
        torch.testing.assert_close(model.autoencoder.state_dict()[k], v)
    with pytest.raises(ConfigError, match="latent_dim"):
        CALM.from_autoencoder(preset("calm-tiny").replace(latent_dim=32), ae)
    with pytest.raises(ConfigError, match="vocab_size"):
        CALM(preset("calm-tiny").replace(autoencoder=AutoencoderConfig(vocab_size=100).to_dict()))
    # no AE given: a random one that fits the CALM sizes (weights come from a checkpoint later)
    cfg = CALM(preset("calm-tiny")).config
    assert AutoencoderConfig.from_dict(cfg.autoencoder).latent_dim == 16


def test_loss_shapes_metrics_and_errors():
    model = _with_random_head(_tiny_calm())
    loss, metrics = model(torch.randint(3, 512, (2, 24)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) >= {"fidelity", "diversity"}
    assert float(metrics["diversity"]) > 0
    torch.testing.assert_close(loss.detach(), 2 * metrics["fidelity"] - metrics["diversity"])
    with pytest.raises(ValueError, match="multiple"):
        model.loss(torch.randint(3, 512, (2, 10)))
    with pytest.raises(ValueError, match="2 chunks"):
        model.loss(torch.randint(3, 512, (2, 4)))


def test_loss_is_finite_under_bf16_autocast():
    model = _with_random_head(_tiny_calm())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(torch.randint(3, 512, (2, 16)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_randomness_comes_from_the_global_rng():
    model = _with_random_head(_tiny_calm())
    tokens = torch.randint(3, 512, (2, 16))
    torch.manual_seed(5)
    a, _ = model(tokens)
    torch.manual_seed(5)
    b, _ = model(tokens)
    c, _ = model(tokens)
    assert a.item() == b.item() != c.item()


def test_left_padded_partial_chunk_carries_only_its_real_tokens():
    model = _tiny_calm()
    chunks = torch.randint(3, 512, (2, 3, 4))
    valid = torch.ones_like(chunks, dtype=torch.bool)
    valid[:, 0, :3] = False  # first chunk: 3 pads then one real token
    got = model.chunk_inputs(chunks, valid)
    e = model.embed(chunks)
    e[:, 0, :3] = 0.0
    torch.testing.assert_close(got, model.compress(e.flatten(-2)))
    # whatever token sits in a pad slot does not matter
    other = chunks.clone()
    other[:, 0, :3] = 1
    torch.testing.assert_close(model.chunk_inputs(other, valid), got)
    # hidden() accepts flat tokens with a token-level mask, too
    torch.testing.assert_close(
        model.hidden(chunks.flatten(1), token_valid=valid.flatten(1)), model.hidden(chunks, token_valid=valid)
    )


def test_hidden_is_causal_and_cache_ready():
    model = _tiny_calm().eval()
    tokens = torch.randint(3, 512, (2, 24))
    full = model.hidden(tokens)
    assert full.shape == (2, 6, 64)
    changed = tokens.clone()
    changed[:, 16:] = 3
    torch.testing.assert_close(model.hidden(changed)[:, :4], full[:, :4])
    cache = model.new_cache(2, 8)
    steps = [model.hidden(tokens[:, :12], cache=cache)]
    steps += [model.hidden(tokens[:, t : t + 4], cache=cache) for t in range(12, 24, 4)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_shapes():
    model = _with_random_head(_tiny_calm()).eval()
    h = model.hidden(torch.randint(3, 512, (2, 8)))
    assert model.sample_latents(h, 3).shape == (2, 2, 3, 16)
    chunks = model.sample_chunks(h[:, -1], 5, generator=torch.Generator().manual_seed(0))
    assert chunks.shape == (2, 5, 4) and chunks.dtype == torch.long
    again = model.sample_chunks(h[:, -1], 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chunks, again)


# ---------------------------------------------------------------------------------------------
# Learning: a tiny language whose next chunk is a fixed function of the current one.

VOCAB, K = 32, 4


def _language(num_chunks=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(3, VOCAB, (num_chunks, K), generator=g)  # the chunks of the language
    successor = torch.randperm(num_chunks, generator=g)  # chunk c is always followed by successor[c]

    def batch(b, length, gen):
        ids = torch.empty(b, length, dtype=torch.long)
        ids[:, 0] = torch.randint(num_chunks, (b,), generator=gen)
        for i in range(1, length):
            ids[:, i] = successor[ids[:, i - 1]]
        return table[ids].flatten(1)

    return table, batch


def _train(model, batch_fn, steps, b, length, lr, gen):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, _ = model(batch_fn(b, length, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_calm_learns_a_deterministic_next_chunk():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    table, batch = _language()
    ae_cfg = AutoencoderConfig(
        vocab_size=VOCAB,
        chunk_size=K,
        latent_dim=8,
        d_model=32,
        ffn_dim=64,
        token_mask_prob=0.0,
        latent_dropout=0.0,
    )
    ae = _train(ChunkAutoencoder(ae_cfg), batch, 200, 16, 2, 3e-3, gen)
    with torch.no_grad():
        mu, log_std = ae.encode(table)
        noisy = ae.decode(mu + log_std.exp() * torch.randn(8, *mu.shape))
    assert (noisy == table).float().mean() > 0.99  # also from posterior samples

    cfg = CALMConfig(
        d_model=32, num_layers=2, num_heads=2, ffn_dim=64, max_seq_len=16, vocab_size=VOCAB, chunk_size=K,
        latent_dim=8, num_target_samples=16,
    )  # fmt: skip
    model = CALM.from_autoencoder(cfg, ae)
    probe = batch(64, 6, torch.Generator().manual_seed(99))
    chunks = model.to_chunks(probe)

    def far_from_target():
        with torch.no_grad():
            h = model.hidden(chunks[:, :-1])
            x = model.sample_latents(h, 8)
            mu, _ = ae.encode(chunks[:, 1:])
            dist = (x - mu.unsqueeze(-2)).norm(dim=-1).mean()
            acc = (model.autoencoder.decode(x) == chunks[:, 1:].unsqueeze(-2)).all(-1).float().mean()
        return float(dist), float(acc)

    dist0, _ = far_from_target()
    _train(model, batch, 300, 16, 6, 2e-3, gen)
    dist, acc = far_from_target()
    spread = float(log_std.exp().norm(dim=-1).mean())  # the posterior's own spread: the floor
    assert acc > 0.95, (acc, dist, dist0)
    assert dist < 0.5 * dist0 and dist < 2 * spread + 0.1 * dist0, (dist, dist0, spread)
