"""Flow-matching head (rectified flow): latent vectors by integrating a learned velocity field.

Training: for a target z drawn from the encoder's posterior N(mu, std²), noise x₀ ~ N(0, I)
and t ~ U(0, 1), the path point is x_t = (1 − t)·x₀ + t·z and the network v(x_t, t, h) is
regressed on the path's velocity z − x₀ (mean squared error). Its minimiser is the
conditional expectation E[z − x₀ | x_t], whose flow carries N(0, I) at t = 0 to the target
distribution at t = 1.

Sampling: integrate dx/dt = v(x, t, h) from a Gaussian x₀ at t = 0 to t = 1 in `steps` equal
steps, with the explicit midpoint rule (2 network evaluations per step; the authors' choice,
10 steps) or Euler's (1 per step). Deterministic given x₀, so the noise of a sample is x₀.
`integrate_flow` is the solver on its own, for any velocity function.

The network is `calm.models.adaln_mlp.AdaLNMLP` (width d, depth = the head's blocks), fed
t·1000 so its time features span the same range as the diffusion head's steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calm.config import FLOW_SOLVERS, ConfigError
from calm.models.adaln_mlp import AdaLNMLP
from calm.models.head import GenerativeHead
from calm.models.layers import built_on_meta


def integrate_flow(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    steps: int,
    solver: str = "midpoint",
) -> torch.Tensor:
    """x(1) for dx/dt = velocity(x, t) from x(0) = x0, in `steps` equal steps of `solver`
    ("euler" or "midpoint"). t is passed as a 0-dim tensor (the same time for every row)."""
    if solver not in FLOW_SOLVERS:
        raise ConfigError(f"flow_solver must be one of {', '.join(FLOW_SOLVERS)}, not {solver!r}")
    if steps < 1:
        raise ConfigError(f"flow_steps must be >= 1, got {steps}")
    dt = 1.0 / steps
    x = x0
    for i in range(steps):
        t = torch.tensor(i * dt, device=x.device)
        if solver == "euler":
            x = x + dt * velocity(x, t)
        else:
            x_mid = x + (0.5 * dt) * velocity(x, t)
            x = x + dt * velocity(x_mid, t + 0.5 * dt)
    return x


class FlowHead(GenerativeHead):
    """Rectified-flow head: noise [..., n, l] (Gaussian x₀) -> latents by ODE integration."""

    name = "flow"
    steps_field = "flow_steps"
    solver_field = "flow_solver"

    @built_on_meta
    def __init__(
        self,
        d_model: int,
        latent_dim: int,
        num_blocks: int = 1,
        *,
        num_samples: int = 8,
        steps: int = 10,
        solver: str = "midpoint",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.d_model, self.latent_dim = d_model, latent_dim
        self.num_samples = num_samples  # (target, time, noise) draws per position in training
        self.steps, self.solver = steps, solver
        self.net = AdaLNMLP(latent_dim, d_model, d_model, num_blocks, time_scale=1000.0, eps=eps)

    def reset_parameters(self) -> None:
        """adaLN-zero (`AdaLNMLP.reset_parameters`)."""
        self.net.reset_parameters()

    @classmethod
    def from_config(cls, config) -> FlowHead:
        return cls(
            config.d_model,
            config.latent_dim,
            config.num_head_layers,
            num_samples=config.num_model_samples,
            steps=config.flow_steps,
            solver=config.flow_solver,
        )

    def configure(self, config) -> None:
        self.steps, self.solver = config.flow_steps, config.flow_solver

    @property
    def noise_dim(self) -> int:
        return self.latent_dim

    @property
    def evals_per_sample(self) -> int:
        return self.steps * (2 if self.solver == "midpoint" else 1)

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents [..., n, l] for h [..., d] and Gaussian starting points noise [..., n, l]."""
        cond = self.net.condition(h)  # once per position, shared by every step and sample
        return integrate_flow(lambda x, t: self.net(x, t, cond), noise, self.steps, self.solver)

    def loss(self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Velocity MSE per position [...] (mean over the N draws and the l dimensions)."""
        shape = (*mu.shape[:-1], self.num_samples)
        with torch.no_grad():
            z = (
                torch.randn((*shape, mu.shape[-1]), device=mu.device)
                .mul_(std.unsqueeze(-2))
                .add_(mu.unsqueeze(-2))
            )
            x0 = torch.randn_like(z)
            t = torch.rand(shape, device=mu.device)
            xt = torch.lerp(x0, z, t.unsqueeze(-1))  # (1 − t)·x₀ + t·z
            target = z - x0
        pred = self.net(xt, t, self.net.condition(h))
        per_pos = (pred.float() - target).square().mean(dim=(-2, -1))
        return per_pos, {"velocity_mse": per_pos.detach().mean()}
