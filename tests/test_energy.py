import pytest
import torch
import torch.nn.functional as F

from calm.models.energy import EnergyHead, energy_loss


def _reference_energy(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Direct double loops over one position: x [N, l], y [M, l] (float64)."""
    N, M = len(x), len(y)
    fid = sum(torch.linalg.vector_norm(x[n] - y[m]) ** alpha for n in range(N) for m in range(M)) / (N * M)
    div = sum(
        torch.linalg.vector_norm(x[n] - x[k]) ** alpha for n in range(N) for k in range(N) if n != k
    ) / (N * (N - 1))
    return 2 * fid - div, fid, div


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
@pytest.mark.parametrize("N", [2, 5])
def test_energy_loss_matches_double_loop(alpha, N):
    torch.manual_seed(0)
    x = torch.randn(3, 2, N, 6, dtype=torch.float64) + 3.0  # offset: exercises the centring
    y = torch.randn(3, 2, 7, 6, dtype=torch.float64) * 0.5 + 3.0
    loss, fid, div = energy_loss(x, y, alpha, return_parts=True)
    assert loss.shape == fid.shape == div.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            ref = _reference_energy(x[i, j], y[i, j], alpha)
            for got, want in zip((loss[i, j], fid[i, j], div[i, j]), ref):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # uncentred computation agrees too
    torch.testing.assert_close(energy_loss(x, y, alpha, center=False), loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
def test_gradient_is_finite_with_identical_samples(alpha):
    torch.manual_seed(0)
    base = torch.randn(4, 1, 8)
    x = torch.cat([base, base, torch.randn(4, 2, 8)], dim=1).requires_grad_(True)  # samples 0 and 1 equal
    y = torch.randn(4, 5, 8)
    energy_loss(x, y, alpha).sum().backward()
    assert torch.isfinite(x.grad).all()
    # all samples identical (the zero-initialised head's starting point), also for N = 2
    for n in (2, 8):
        z = torch.zeros(3, n, 8, requires_grad=True)
        loss = energy_loss(z, y[:3], alpha)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()


def test_energy_loss_is_computed_in_fp32_under_autocast():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 16), torch.randn(5, 9, 16)
    ref = energy_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = energy_loss(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_energy_loss_prefers_the_true_distribution():
    """Strict propriety in action: samples from the target law score better than shifted/narrow ones."""
    torch.manual_seed(0)
    y = torch.randn(2000, 16, 4)
    good = energy_loss(torch.randn(2000, 8, 4), y).mean()
    shifted = energy_loss(torch.randn(2000, 8, 4) + 0.5, y).mean()
    narrow = energy_loss(0.5 * torch.randn(2000, 8, 4), y).mean()
    assert good < shifted and good < narrow


def _naive_head(head: EnergyHead, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The textbook head: concat(LN(x), h') into every block's first linear, one sample at a time."""
    hp = head.norm_hidden(head.hidden_embd(h))
    outs = []
    for n in range(noise.shape[-2]):
        x = head.norm_noise(head.noise_embd(noise[..., n, :]))
        for block in head.blocks:
            u = block.linears(torch.cat([block.in_ln(x), hp], dim=-1))
            gate, up = u.chunk(2, dim=-1)
            x = x + block.down_proj(F.silu(gate) * up)
        outs.append(head.final_layer(x))
    return torch.stack(outs, dim=-2)


def _randomised_head(num_blocks=2):
    torch.manual_seed(0)
    head = EnergyHead(32, 12, noise_dim=8, num_blocks=num_blocks)
    with torch.no_grad():
        for p in head.parameters():  # also the zero-initialised last layer and the LayerNorms
            p.add_(0.1 * torch.randn_like(p))
    return head


def test_shared_hidden_projection_matches_naive_concat():
    head = _randomised_head()
    h = torch.randn(3, 5, 32, requires_grad=True)
    noise = head.noise((3, 5, 6))
    out = head(h, noise)
    ref = _naive_head(head, h, noise)
    assert out.shape == (3, 5, 6, 12)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and the gradients agree
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [h, *head.parameters()])
    grads_ref = torch.autograd.grad((ref * w).sum(), [h, *head.parameters()])
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_parameter_names_follow_the_reference_layout():
    names = set(dict(EnergyHead(16, 4, noise_dim=8, num_blocks=2).named_parameters()))
    for name in (
        "noise_embd.weight",
        "hidden_embd.bias",
        "norm_hidden.weight",
        "norm_noise.bias",
        "blocks.1.in_ln.weight",
        "blocks.1.linears.0.weight",
        "blocks.1.linears.2.weight",
        "blocks.1.linears.4.bias",
        "blocks.0.down_proj.weight",
        "final_layer.in_ln.weight",
        "final_layer.linears.0.weight",
        "final_layer.linears.2.bias",
    ):
        assert name in names, name
    head = EnergyHead(16, 4, noise_dim=8, num_blocks=2)
    assert head.blocks[0].linears[0].weight.shape == (16, 32)
    assert head.blocks[0].linears[4].weight.shape == (32, 16)


def test_initial_samples_are_zero_and_shapes():
    torch.manual_seed(0)
    head = EnergyHead(32, 12, noise_dim=8, num_blocks=1)
    assert not head.final_layer.linears[-1].weight.any() and not head.final_layer.linears[-1].bias.any()
    h = torch.randn(2, 3, 32)
    s = head.sample(h, 4)
    assert s.shape == (2, 3, 4, 12)
    assert not s.any()
    assert head.sample(torch.randn(32), 5).shape == (5, 12)


def test_samples_differ_and_follow_the_generator():
    head = _randomised_head(1)
    h = torch.randn(2, 32)
    s = head.sample(h, 3)
    assert not torch.allclose(s[:, 0], s[:, 1])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(head.sample(h, 3, generator=g1), head.sample(h, 3, generator=g2))
    noise = head.noise((2, 3))
    assert noise.min() >= -0.5 and noise.max() <= 0.5
