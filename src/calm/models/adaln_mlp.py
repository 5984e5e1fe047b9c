"""The conditional MLP shared by the flow-matching and diffusion heads (adaLN-zero, as in DiT/MAR).

    x [..., n, l] ─ input_proj ─ blocks ─ final ─ [..., n, l]        (a velocity or a noise estimate)
                                 ↑ y = time_embed(t) + condition(h)   (adaptive LayerNorm)

Each residual block: (shift, scale, gate) = Linear(SiLU(y)); x ← x + gate ⊙ MLP(LN(x)·(1 + scale)
+ shift), with MLP = Linear(w→w) → SiLU → Linear(w→w). The final layer modulates a
LayerNorm without affine parameters the same way and projects to l. The modulation layers
and the output projection start at zero ("adaLN-zero"): every block starts as the identity
and the network's first output is 0.

Cost: ``condition(h)`` depends on h alone, so a head computes it once per position and
passes it to every evaluation. The time embedding and the modulations depend on (h, t)
only: when all n samples of a position share t (sampling), t has shape [...] or [..., 1] and
they are computed once per position and step, broadcast over the samples; with one t per
sample (training), t is [..., n].
"""

from __future__ import annotations

import math

import torch
from torch import nn

FREQ_DIM = 256  # sinusoidal features of the time before its MLP (DiT, MAR)


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [..., dim] of times t [...] (cos of the first half, sin of the second)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x ← x + gate ⊙ MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from y."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class AdaLNFinal(nn.Module):
    """Linear(modulate(LN(x), shift, scale)) with (shift, scale) from y; LN without affine."""

    def __init__(self, width: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(width, out_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class AdaLNMLP(nn.Module):
    """The network f(x, t, h) of a flow or diffusion head (module docstring).

    in_dim: size of x and of the output (the latent size l); width: hidden width (d);
    cond_dim: size of h; depth: residual blocks; time_scale: t is multiplied by it before the
    sinusoidal features (1000 maps a flow's t in [0, 1] onto a diffusion's step range).
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        cond_dim: int,
        depth: int,
        *,
        time_scale: float = 1.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.in_dim, self.width, self.time_scale = in_dim, width, time_scale
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, eps) for _ in range(depth))
        self.final = AdaLNFinal(width, in_dim, eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears with zero biases; time MLP N(0, 0.02); modulations and the
        output projection zero (adaLN-zero: identity blocks, zero output at the start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for m in [*(b.modulation[1] for b in self.blocks), self.final.modulation[1], self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """The h-part of the conditioning, [..., width]: computed once per position."""
        return self.cond_embed(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """f for x [..., n, in_dim], times t ([], [...], [..., 1] shared by the n rows, or
        [..., n]) and cond [..., width] from `condition` -> [..., n, in_dim]."""
        temb = self.time_embed(timestep_features(t * self.time_scale).to(cond.dtype))
        if t.dim() == cond.dim() - 1 and t.dim() > 0:  # one time per position: broadcast over rows
            temb = temb.unsqueeze(-2)
        y = cond.unsqueeze(-2) + temb  # [..., 1 or n, width]
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x, y)
        return self.final(x, y)
