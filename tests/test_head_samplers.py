"""The flow and diffusion samplers reproduce a known target when their network is replaced by
the exact velocity field / the exact noise prediction (score) of that target.

Target: a 2-D mixture of two isotropic Gaussians, not aligned with the axes. For each head,
n = 4000 samples are compared with the mixture by Kolmogorov-Smirnov statistics on four 1-D
projections (both axes and both diagonals), whose CDFs are known in closed form. Threshold:
the KS critical value at a family-wise level of 0.004 (0.001 per projection): D < 1.95/√n
(≈ 0.031). The seeds are fixed; the threshold says how far an exact sampler can stray by
chance at this sample size. Each test also checks that a one-step sampler *fails* the same
test, so the test can tell a wrong distribution from the right one.
"""

import math

import pytest
import torch
from torch import nn

from calm.models.diffusion import DiffusionHead
from calm.models.flow import FlowHead

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 1.0], [1.5, -0.5]], dtype=torch.float64)
STDS = torch.tensor([0.4, 0.6], dtype=torch.float64)
N_SAMPLES = 4000
KS_LIMIT = 1.95 / math.sqrt(N_SAMPLES)
DIRECTIONS = [(1.0, 0.0), (0.0, 1.0), (0.5**0.5, 0.5**0.5), (0.5**0.5, -(0.5**0.5))]


def mixture_ks(samples: torch.Tensor) -> float:
    """Largest KS statistic of `samples` [n, 2] against the mixture over the four projections."""
    x = samples.double().reshape(-1, 2)
    n = len(x)
    worst = 0.0
    for u in DIRECTIONS:
        u = torch.tensor(u, dtype=torch.float64)
        proj = (x @ u).sort().values
        # projection of an isotropic component: N(u·m_k, s_k²) (|u| = 1)
        z = (proj[:, None] - (MEANS @ u)[None, :]) / STDS[None, :]
        cdf = (WEIGHTS * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)
        i = torch.arange(1, n + 1, dtype=torch.float64)
        worst = max(worst, float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()))
    return worst


class _ExactField(nn.Module):
    """A stand-in for a head's network: the exact answer for an isotropic Gaussian mixture
    (weights [K], means [K, D], stds [K]); t may be per row ([..., n]) or shared (0-dim)."""

    def __init__(self, weights=WEIGHTS, means=MEANS, stds=STDS):
        super().__init__()
        self.w, self.m, self.s2 = weights, means, stds.double().square()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the head a dtype and a device

    def condition(self, h):
        return h

    def _mix(self, x, centers, var, value):
        """Σ_k r_k · value(k) with per-row t: centers [.., K, D], var [.., K]."""
        sq = (x[..., None, :] - centers).square().sum(-1)
        logp = torch.log(self.w) - sq / (2 * var) - 0.5 * x.shape[-1] * torch.log(var)
        r = torch.softmax(logp, -1)
        return (r[..., None] * value).sum(-2)


class ExactVelocity(_ExactField):
    """E[z − x₀ | x_t = x] for x_t = (1 − t)x₀ + t z, x₀ ~ N(0, I), z ~ the mixture."""

    def forward(self, x, t, cond):
        xd = x.double()
        t = t.double().expand(x.shape[:-1])[..., None, None]  # [..., 1, 1]
        var = ((1 - t) ** 2 + t**2 * self.s2[:, None])[..., 0]  # [..., K]
        gain = (t[..., 0] * self.s2 - (1 - t[..., 0])) / var  # E[z − x₀ | x, k] = m_k + gain_k (x − t m_k)
        v = self.m + gain[..., None] * (xd[..., None, :] - t * self.m)  # [..., K, D]
        return self._mix(xd, t * self.m, var, v).to(x.dtype)


class ExactDenoiser(_ExactField):
    """The exact network of a diffusion head for x_t = √ᾱ z + √(1 − ᾱ) ε: E[ε | x_t] (target
    "eps", −√(1 − ᾱ) times the score) or E[v | x_t] = √ᾱ E[ε | x_t] − √(1 − ᾱ) E[z | x_t] ("v")."""

    def __init__(self, alphas_cumprod, target="v", **kw):
        super().__init__(**kw)
        self.acp, self.target = alphas_cumprod, target

    def forward(self, x, t, cond):
        xd = x.double()
        a = self.acp[t.long()].expand(x.shape[:-1])[..., None, None]  # [..., 1, 1]
        centers = a.sqrt() * self.m
        var = (a * self.s2[:, None] + 1 - a)[..., 0]  # [..., K]: Var(x_t | component k)
        dev = (xd[..., None, :] - centers) / var[..., None]  # [..., K, D]
        eps = self._mix(xd, centers, var, (1 - a).sqrt() * dev)
        if self.target == "eps":
            return eps.to(x.dtype)
        z = self._mix(xd, centers, var, self.m + a.sqrt() * self.s2[:, None] * dev)
        return (a[..., 0].sqrt() * eps - (1 - a[..., 0]).sqrt() * z).to(x.dtype)


def flow_head(steps=10, solver="midpoint"):
    head = FlowHead(4, 2, 1, steps=steps, solver=solver)
    head.net = ExactVelocity()
    return head


def diffusion_head(steps=100, solver="ddpm", schedule="cosine", target="v"):
    head = DiffusionHead(4, 2, 1, steps=steps, solver=solver, schedule=schedule, target=target)
    head.net = ExactDenoiser(head.alphas_cumprod, target)
    return head


def draw(head, seed=0):
    h = torch.zeros(1, 4)
    with torch.no_grad():
        return head.sample(h, N_SAMPLES, generator=torch.Generator().manual_seed(seed))[0]


def test_the_ks_check_accepts_exact_mixture_draws_and_rejects_a_shifted_mixture():
    g = torch.Generator().manual_seed(0)
    k = (torch.rand(N_SAMPLES, generator=g, dtype=torch.float64) < WEIGHTS[0]).long()
    k = 1 - k  # component 0 with probability 0.3
    x = MEANS[k] + STDS[k, None] * torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64)
    assert mixture_ks(x) < KS_LIMIT
    assert mixture_ks(x + 0.1) > KS_LIMIT


@pytest.mark.parametrize("steps, solver", [(50, "midpoint"), (400, "euler")])
def test_flow_sampler_with_the_exact_velocity_reproduces_the_mixture(steps, solver):
    assert mixture_ks(draw(flow_head(steps, solver))) < KS_LIMIT


def test_one_flow_step_does_not_reproduce_the_mixture():
    # one Euler step: x₀ + v(x₀, 0) = x₀ + E[z] − x₀, the mixture mean for every sample
    assert mixture_ks(draw(flow_head(1, "euler"))) > 3 * KS_LIMIT


@pytest.mark.parametrize(
    "steps, solver, schedule, target",
    [
        (1000, "ddpm", "cosine", "v"),
        (200, "ddim", "cosine", "v"),
        (250, "ddpm", "linear", "v"),
        (1000, "ddpm", "cosine", "eps"),
        (200, "ddim", "cosine", "eps"),
    ],
)
def test_diffusion_sampler_with_the_exact_network_reproduces_the_mixture(steps, solver, schedule, target):
    assert mixture_ks(draw(diffusion_head(steps, solver, schedule, target))) < KS_LIMIT


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
@pytest.mark.parametrize("target", ["v", "eps"])
def test_one_diffusion_step_does_not_reproduce_the_mixture(solver, target):
    # one step returns E[z | x_{T-1}] ≈ the mixture mean for every sample
    assert mixture_ks(draw(diffusion_head(1, solver, target=target))) > 3 * KS_LIMIT


def test_ddpm_noise_layout_uses_every_noise_vector():
    head = diffusion_head(4, "ddpm")
    noise = head.noise((1, 8), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (1, 8, 4 * 2)
    base = head(torch.zeros(1, 4), noise)
    for j in range(4):  # the start and each of the 3 intermediate noises change the sample
        bumped = noise.clone()
        bumped[..., 2 * j : 2 * j + 2] += 1.0
        assert not torch.allclose(head(torch.zeros(1, 4), bumped), base)


@pytest.mark.parametrize(
    "make",
    [flow_head, diffusion_head, lambda: diffusion_head(target="eps")],
    ids=["flow", "diffusion-v", "diffusion-eps"],
)
def test_the_training_loss_is_minimised_by_the_field_the_sampler_integrates(make):
    """The loss and the sampler share their conventions (direction of time, which of x₀ and z
    the path starts from, the ᾱ index): with one Gaussian target N(mu, std²) the exact field
    of the sampler's convention has a lower loss than that field shifted or scaled a little."""
    head = make()
    mu, std = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.5, 0.5]])
    target = dict(weights=torch.ones(1, dtype=torch.float64), means=mu.double(), stds=std[:, 0].double())
    if isinstance(head, FlowHead):
        head.net = ExactVelocity(**target)
    else:
        head.net = ExactDenoiser(head.alphas_cumprod, head.target, **target)
    head.num_samples = 200_000
    exact = head.net.forward

    def loss_with(change):
        head.net.forward = lambda x, t, c: change(exact(x, t, c))
        torch.manual_seed(0)  # the same draws for every variant
        return float(head.loss(torch.zeros(1, 4), mu, std)[0].sum())

    best = loss_with(lambda f: f)
    for change in (lambda f: f + 0.1, lambda f: f - 0.1, lambda f: 1.1 * f, lambda f: 0.9 * f):
        assert loss_with(change) > best + 1e-3
