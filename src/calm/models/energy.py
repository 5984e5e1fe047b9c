"""Energy head and energy loss (DESIGN §2.2): a one-step implicit generator of latent vectors.

`EnergyHead` maps a backbone hidden state h and a uniform noise vector to one latent vector;
different noise, different samples. It is trained with `energy_loss`, the negative energy
score, which needs only samples (no likelihood):

    loss = 2/(N·M) Σ_n Σ_m ‖x̃_n − y_m‖^α  −  1/(N(N−1)) Σ_{n≠k} ‖x̃_n − x̃_k‖^α

for N model samples x̃ and M target samples y; strictly proper for 0 < α < 2.

The head is run N = 8 times per position during training, so its cost matters. Everything
that depends on h alone — h' = LN(W h) and, in every block, the h-half of the first linear
layer (Linear(concat(a, b)) = W_a a + W_b b + bias) — is computed once per position and
broadcast over the samples. The parameters are the plain ones (the weight matrix is split at
call time), so the layout matches the authors' `MLPGenerator` and their checkpoints map 1:1.

`EnergyHead` is CALM's default `calm.models.head.GenerativeHead`: its `loss` draws M targets
from the encoder's posterior and N samples, and returns the energy loss per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.models.head import GenerativeHead
from calm.models.layers import built_on_meta


class HeadBlock(nn.Module):
    """x ← x + down(SiLU(gate) ⊙ up), with (gate, up) = MLP(concat(LN(x), h'))."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=eps)
        self.linears = nn.Sequential(
            nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 2 * dim)
        )
        self.down_proj = nn.Linear(dim, dim)

    def hidden_part(self, h: torch.Tensor) -> torch.Tensor:
        """The h'-half of the first linear layer plus its bias: W_h h' + b ([..., d])."""
        first = self.linears[0]
        return F.linear(h, first.weight[:, h.shape[-1] :], first.bias)

    def forward(self, x: torch.Tensor, h_part: torch.Tensor) -> torch.Tensor:
        """x [..., n, d] (one row per sample); h_part [..., d] from `hidden_part`, shared by the n rows."""
        first = self.linears[0]
        u = F.linear(self.in_ln(x), first.weight[:, : x.shape[-1]]) + h_part.unsqueeze(-2)
        u = self.linears[1:](u)
        gate, up = u.chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    """LN → Linear(d→d) → SiLU → Linear(d→l); the last linear starts at zero."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=eps)
        self.linears = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(GenerativeHead):
    """Implicit generator of latent vectors conditioned on a hidden state (one pass per sample)."""

    name = "energy"

    @built_on_meta
    def __init__(
        self,
        d_model: int,
        latent_dim: int,
        noise_dim: int = 64,
        num_blocks: int = 1,
        eps: float = 1e-6,
        *,
        zero_last: bool = True,
        noise_atoms: int = 0,
        num_model_samples: int = 8,
        num_target_samples: int = 100,
        alpha: float = 1.0,
    ):
        super().__init__()
        self.zero_last = zero_last
        self.d_model, self.latent_dim, self.noise_dim = d_model, latent_dim, noise_dim
        # training-loss settings (N, M, the exponent); they are not weights
        self.num_model_samples, self.num_target_samples, self.alpha = (
            num_model_samples,
            num_target_samples,
            alpha,
        )
        self.noise_embd = nn.Linear(noise_dim, d_model)
        self.hidden_embd = nn.Linear(d_model, d_model)
        self.norm_hidden = nn.LayerNorm(d_model, eps=eps)
        self.norm_noise = nn.LayerNorm(d_model, eps=eps)
        # Discrete part of the noise (noise_atoms > 0): the first noise coordinate also picks one
        # of `noise_atoms` learned vectors, added to the noise projection. The noise is still
        # Uniform(-0.5, 0.5)^noise_dim; the head is just a step function of its first coordinate,
        # which a smooth MLP can hardly learn: it lets samples fall into separate modes at once.
        self.noise_atoms = noise_atoms
        self.atoms = nn.Embedding(noise_atoms, d_model) if noise_atoms > 0 else None
        self.blocks = nn.ModuleList(HeadBlock(d_model, eps) for _ in range(num_blocks))
        self.final_layer = FinalLayer(d_model, latent_dim, eps)

    def reset_parameters(self) -> None:
        """Xavier-uniform linears with zero biases, LayerNorms at identity, last layer zero.

        The zero last layer makes every initial sample the zero vector, so training starts from
        a collapsed but harmless predictor (the authors' choice, as in MAR's diffusion head).
        The price: while that layer is zero, no gradient reaches the head's blocks or the
        backbone, and at small scale escaping costs a few hundred steps. ``zero_last=False``
        keeps the last layer Xavier-initialised like the others (bias still zero).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.atoms is not None:  # several times the noise projection's spread: distinct modes
            nn.init.normal_(self.atoms.weight)
        if self.zero_last:
            nn.init.zeros_(self.final_layer.linears[-1].weight)

    def noise(
        self, shape: tuple[int, ...], device=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform(−0.5, 0.5) noise of shape [*shape, noise_dim] (torch's global RNG by default)."""
        w = self.noise_embd.weight
        u = torch.rand(
            (*shape, self.noise_dim), device=device or w.device, dtype=w.dtype, generator=generator
        )
        return u.sub_(0.5)

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latent samples [..., n, l] for hidden states h [..., d] and noise [..., n, noise_dim].

        Deterministic given the noise. The h-dependent terms are computed once per position.
        """
        h = self.norm_hidden(self.hidden_embd(h))
        x = self.noise_embd(noise)
        if self.atoms is not None:
            index = ((noise[..., 0] + 0.5) * self.noise_atoms).long().clamp_(0, self.noise_atoms - 1)
            x = x + self.atoms(index)
        x = self.norm_noise(x)
        for block in self.blocks:
            x = block(x, block.hidden_part(h))
        return self.final_layer(x)

    def sample(
        self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`num_samples` independent samples per position: h [..., d] -> [..., num_samples, l]."""
        return self(h, self.noise((*h.shape[:-1], num_samples), device=h.device, generator=generator))

    @classmethod
    def from_config(cls, config) -> EnergyHead:
        """The head of a `CALMConfig` (sizes and the energy-loss settings N, M, alpha)."""
        return cls(
            config.d_model,
            config.latent_dim,
            config.noise_dim,
            config.num_head_layers,
            num_model_samples=config.num_model_samples,
            num_target_samples=config.num_target_samples,
            alpha=config.energy_alpha,
            zero_last=config.head_init == "zero",
            noise_atoms=config.head_noise_atoms,
        )

    def noise_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform(−0.5, 0.5) noise from uniforms in (0, 1), in place."""
        return u.sub_(0.5)

    def loss(self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Energy loss per position [...] for hidden states h [..., d] and the posterior
        N(mu, std²) [..., l] of the next chunk; metrics: mean fidelity and diversity.

        M targets y_m = mu + std·ε_m are drawn first, then N head samples (torch's RNG). Both
        are kept relative to mu: distances are shift-invariant, and the shifted vectors are
        small, which keeps the matmul distance identity of `energy_loss` accurate.
        """
        with torch.no_grad():
            eps = torch.randn((*mu.shape[:-1], self.num_target_samples, mu.shape[-1]), device=mu.device)
            targets = eps.mul_(std.unsqueeze(-2))
        samples = self.sample(h, self.num_model_samples)  # [..., N, l]
        per_pos, fidelity, diversity = energy_loss(
            samples.float() - mu.unsqueeze(-2), targets, self.alpha, return_parts=True, center=False
        )
        return per_pos, {"fidelity": fidelity.detach().mean(), "diversity": diversity.detach().mean()}


# ---------------------------------------------------------------------------------------------
# Energy loss

_TINY = 1e-12  # squared distances are clamped here before the root: no infinite gradient at 0


def _powered_distance(sq: torch.Tensor, alpha: float) -> torch.Tensor:
    sq = sq.clamp_min(_TINY)
    return sq.sqrt() if alpha == 1.0 else sq.pow(alpha / 2)


def energy_loss(
    samples: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    *,
    return_parts: bool = False,
    center: bool = True,
):
    """Negative energy score per position: samples [..., N, l], targets [..., M, l] -> [...].

    loss = 2 · fidelity − diversity, with fidelity = mean_{n,m} ‖x̃_n − y_m‖^α and
    diversity = mean_{n≠k} ‖x̃_n − x̃_k‖^α. Computed in float32 (autocast off) whatever the
    input dtype. With ``return_parts=True`` returns (loss, fidelity, diversity).

    The N×M cross distances use ‖a‖² + ‖b‖² − 2a·b with one batched matmul: forward +
    backward of the whole loss takes 82 ms vs 325 ms with `torch.cdist` on one CPU thread at
    P=2000 positions, N=8, M=100, l=128. To keep that identity accurate when the distances are small compared with the
    vectors themselves, both sides are first shifted by the (detached) target mean; pass
    ``center=False`` when the caller has already centred them (e.g. relative to the posterior
    mean). The N(N−1)/2 sample pairs come from the N×N Gram matrix the same way. Squared
    distances are clamped at a tiny positive value before the root, so identical samples (a
    zero distance) give a finite gradient, never a NaN.
    """
    N, M = samples.shape[-2], targets.shape[-2]
    if N < 2:
        raise ValueError("energy_loss needs at least 2 model samples per position")
    if samples.shape[-1] != targets.shape[-1] or samples.shape[:-2] != targets.shape[:-2]:
        raise ValueError(
            f"samples {tuple(samples.shape)} and targets {tuple(targets.shape)} must agree "
            "in all but the sample dimension"
        )
    with torch.autocast(samples.device.type, enabled=False):
        x, y = samples.float(), targets.float()
        if center:
            c = y.detach().mean(dim=-2, keepdim=True)
            x, y = x - c, y - c
        lead = x.shape[:-2]
        x3, y3 = x.reshape(-1, N, x.shape[-1]), y.reshape(-1, M, y.shape[-1])
        x_sq = x3.square().sum(-1)  # [P, N]
        y_sq = torch.linalg.vector_norm(y3, dim=-1).square()  # [P, M]; no [P, M, l] temporary
        # cross term: [P, N, M] squared distances with one bmm
        sq = torch.baddbmm(y_sq.unsqueeze(1) + x_sq.unsqueeze(2), x3, y3.transpose(1, 2), alpha=-2.0)
        fidelity = _powered_distance(sq, alpha).mean(dim=(-2, -1))
        # pairs n < k (the n ≠ k sum is twice that), from the N×N Gram matrix. Two identical
        # samples give a squared distance of (nearly) zero; the clamp keeps its gradient finite.
        i, k = torch.triu_indices(N, N, offset=1, device=x.device)
        gram = torch.bmm(x3, x3.transpose(1, 2))
        pair_sq = x_sq[:, i] + x_sq[:, k] - 2 * gram[:, i, k]
        diversity = _powered_distance(pair_sq, alpha).mean(-1)
        fidelity, diversity = fidelity.reshape(lead), diversity.reshape(lead)
        loss = 2 * fidelity - diversity
    return (loss, fidelity, diversity) if return_parts else loss
