import pytest
import torch
import torch.nn.functional as F

from calm.config import ARConfig, preset
from calm.models import build_model
from calm.models.ar import TokenTransformer


def _model(**kw) -> TokenTransformer:
    torch.manual_seed(0)
    cfg = ARConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=48, max_seq_len=64, vocab_size=50, **kw)
    return TokenTransformer(cfg)


def test_shapes_and_registry():
    model = build_model(preset("transformer-tiny"))
    assert isinstance(model, TokenTransformer)
    tokens = torch.randint(0, 512, (2, 10))
    assert model.logits(tokens).shape == (2, 10, 512)
    loss, metrics = model(tokens)
    assert loss.dim() == 0 and loss.requires_grad
    assert set(metrics) >= {"ce", "ppl", "token_acc"}
    assert model.fsdp_units() == list(model.backbone.layers)


def test_loss_is_next_token_cross_entropy():
    model = _model().eval()
    tokens = torch.randint(0, 50, (3, 12))
    loss, metrics = model.loss(tokens)
    logits = model.logits(tokens)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(metrics["ppl"], ref.exp())
    acc = (logits.argmax(-1) == tokens[:, 1:]).float().mean()
    torch.testing.assert_close(metrics["token_acc"], acc)
    # at initialisation the model is close to uniform over the vocabulary
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.2


def test_causal():
    model = _model().eval()
    a = torch.randint(0, 50, (2, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model.logits(a)[:, :7], model.logits(b)[:, :7])


def test_kv_cache_matches_full_forward():
    model = _model(num_kv_heads=2).eval()
    tokens = torch.randint(0, 50, (2, 11))
    full = model.logits(tokens)
    cache = model.new_cache(2, 16)
    parts = [model.logits(tokens[:, :5], cache=cache)]
    parts += [model.logits(tokens[:, t : t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_through_logits():
    model = _model().eval()
    tokens = torch.randint(0, 50, (1, 6))
    pad = 2
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens], 1)
    valid = padded.new_ones(padded.shape, dtype=torch.bool)
    valid[:, :pad] = False
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    out = model.logits(padded, positions=positions, valid=valid)
    torch.testing.assert_close(out[:, pad:], model.logits(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_tying(tie):
    model = _model(tie_embeddings=tie)
    assert (model.lm_head.weight is model.embed.weight) == tie
    n_params = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors
    embed = 50 * 32
    untied = sum(p.numel() for p in _model(tie_embeddings=False).parameters())
    assert n_params == (untied - embed if tie else untied)
    # gradients reach the shared matrix from both uses
    model.loss(torch.randint(0, 50, (2, 8)))[0].backward()
    assert model.embed.weight.grad is not None and model.lm_head.weight.grad is not None


def test_scaled_init():
    torch.manual_seed(0)
    cfg = ARConfig(d_model=64, num_layers=8, num_heads=4, ffn_dim=128, max_seq_len=16, vocab_size=50)
    plain, scaled = TokenTransformer(cfg), TokenTransformer(cfg, scaled_init=True)
    o_plain = plain.backbone.layers[0].attn.o_proj.weight.std().item()
    o_scaled = scaled.backbone.layers[0].attn.o_proj.weight.std().item()
    assert o_plain == pytest.approx(0.02, rel=0.1)
    assert o_scaled == pytest.approx(0.02 / 4, rel=0.1)


def test_learns_a_tiny_deterministic_sequence():
    torch.manual_seed(0)
    cfg = ARConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, max_seq_len=32, vocab_size=16)
    model = TokenTransformer(cfg)
    # a repeating pattern: each token determines the next one
    seq = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 13, 8, 7, 11] * 3)[:24]
    batch = torch.stack([seq.roll(-s)[:16] for s in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss, metrics = model(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, metrics = model.eval().loss(batch)
    assert first > 2.5
    assert loss.item() < 0.1
    assert metrics["token_acc"].item() == 1.0
