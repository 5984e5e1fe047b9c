"""Diffusion head: Gaussian diffusion over latent vectors, sampled on a respaced schedule.

Forward process (T = `diffusion_train_steps`, default 1000): x_t = √ᾱ_t·z + √(1 − ᾱ_t)·ε with
ε ~ N(0, I), ᾱ_t the cumulative product of 1 − β over steps 0..t, and β from the cosine
schedule of Nichol & Dhariwal (2021) (β clipped at 0.999) or the linear one of DDPM.

Prediction target and loss: the network predicts the noise ε from (x_t, t, h), trained with
the plain mean squared error (DDPM's "simple" loss), t uniform over the T steps. The
authors' code (like MAR's) also learns the reverse variance with the hybrid loss of Nichol &
Dhariwal; we do not: the variance mainly buys likelihood (which BrierLM does not use) and
few-step quality of the ancestral sampler, it doubles the output and adds a second loss
term, and DDIM gives a few-step sampler without it. The simple loss is the one DDPM found
best for sample quality, and its optimum, E[ε | x_t], is the exact score up to a factor.

Sampling: S = `diffusion_steps` timesteps evenly spaced over 0..T−1 (the respacing of
Nichol & Dhariwal; S = 1 uses step T−1 alone), one network evaluation each, from
x_{T−1} ~ N(0, I):
  "ddpm": ancestral steps of the respaced chain, β'_i = 1 − ᾱ_i/ᾱ_{i−1}, with the posterior
          variance β̃ = β'(1 − ᾱ_{i−1})/(1 − ᾱ_i) ("fixed small"); fresh noise at every step
          but the last, so a sample's noise is S·l values;
  "ddim": the deterministic DDIM update (η = 0); a sample's noise is x_{T−1} (l values).
`diffusion_sample` is the sampler on its own, for any noise predictor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from calm.config import DIFFUSION_SCHEDULES, DIFFUSION_SOLVERS, ConfigError
from calm.models.adaln_mlp import AdaLNMLP
from calm.models.head import GenerativeHead


def cumulative_alphas(train_steps: int, schedule: str = "cosine") -> torch.Tensor:
    """ᾱ_t for t = 0..train_steps−1 (float64)."""
    T = train_steps
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    elif schedule == "linear":
        scale = 1000 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    else:
        raise ConfigError(
            f"diffusion_schedule must be one of {', '.join(DIFFUSION_SCHEDULES)}, not {schedule!r}"
        )
    return torch.cumprod(1 - betas, 0)


def respaced_timesteps(train_steps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over 0..train_steps−1, ascending (step T−1 alone if 1)."""
    if steps < 1 or steps > train_steps:
        raise ConfigError(f"diffusion_steps must be in 1..{train_steps}, got {steps}")
    if steps == 1:
        return [train_steps - 1]
    stride = (train_steps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def diffusion_noise_dim(latent_dim: int, steps: int, solver: str) -> int:
    """Noise values per sample: the start x_{T−1}, plus one vector per step but the last (ddpm)."""
    return latent_dim * (steps if solver == "ddpm" else 1)


def diffusion_sample(
    predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    solver: str = "ddpm",
) -> torch.Tensor:
    """Samples [..., l] from `noise` [..., noise_dim] (`diffusion_noise_dim` values per sample:
    x_{T−1} first, then the ddpm step noises) with the noise predictor ``predict_noise(x, t)``
    (t a 0-dim tensor holding the training-step index), over the ascending `timesteps`."""
    if solver not in DIFFUSION_SOLVERS:
        raise ConfigError(f"diffusion_solver must be one of {', '.join(DIFFUSION_SOLVERS)}, not {solver!r}")
    acp = [float(alphas_cumprod[t]) for t in timesteps]  # Python floats: no device sync in the loop
    l = noise.shape[-1] // (len(timesteps) if solver == "ddpm" else 1)
    x = noise[..., :l]
    for i in reversed(range(len(timesteps))):
        a, a_prev = acp[i], (acp[i - 1] if i > 0 else 1.0)
        eps = predict_noise(x, torch.tensor(float(timesteps[i]), device=x.device))
        if solver == "ddim":
            # x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·ε with x̂₀ = (x − √(1 − ᾱ)·ε)/√ᾱ
            c_x = math.sqrt(a_prev / a)
            c_eps = math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a) / a)
            x = c_x * x + c_eps * eps
        else:
            # posterior mean in ε-form, (x − β'/√(1 − ᾱ)·ε)/√(1 − β'), plus √β̃ · fresh noise
            alpha = a / a_prev  # 1 − β' (computed directly: β' is close to 1 at the first steps)
            beta = 1 - alpha
            x = (x - (beta / math.sqrt(1 - a)) * eps) / math.sqrt(alpha)
            if i > 0:
                std = math.sqrt(beta * (1 - a_prev) / (1 - a))
                j = len(timesteps) - i  # noise vectors 1..S−1 follow the start
                x = x + std * noise[..., j * l : (j + 1) * l]
    return x


class DiffusionHead(GenerativeHead):
    """ε-prediction diffusion head: noise [..., n, noise_dim] -> latents by S denoising steps."""

    name = "diffusion"
    steps_field = "diffusion_steps"
    solver_field = "diffusion_solver"

    def __init__(
        self,
        d_model: int,
        latent_dim: int,
        num_blocks: int = 1,
        *,
        num_samples: int = 8,
        steps: int = 100,
        solver: str = "ddpm",
        train_steps: int = 1000,
        schedule: str = "cosine",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.d_model, self.latent_dim = d_model, latent_dim
        self.num_samples = num_samples  # (target, step, noise) draws per position in training
        self.train_steps, self.schedule = train_steps, schedule
        # not a buffer: the schedule follows from the config, and stays float64 when the
        # weights are cast (bf16 copies for decoding)
        self.alphas_cumprod = cumulative_alphas(train_steps, schedule)
        self._acp_on: dict[torch.device, torch.Tensor] = {}
        self.steps, self.solver = steps, solver
        self.timesteps = respaced_timesteps(train_steps, steps)
        self.net = AdaLNMLP(
            latent_dim, d_model, d_model, num_blocks, time_scale=1000.0 / train_steps, eps=eps
        )

    @classmethod
    def from_config(cls, config) -> DiffusionHead:
        return cls(
            config.d_model,
            config.latent_dim,
            config.num_head_layers,
            num_samples=config.num_model_samples,
            steps=config.diffusion_steps,
            solver=config.diffusion_solver,
            train_steps=config.diffusion_train_steps,
            schedule=config.diffusion_schedule,
        )

    def configure(self, config) -> None:
        if (config.diffusion_train_steps, config.diffusion_schedule) != (self.train_steps, self.schedule):
            raise ConfigError(
                "diffusion_train_steps and diffusion_schedule are fixed by training; "
                "only diffusion_steps and diffusion_solver change at sampling time"
            )
        self.steps, self.solver = config.diffusion_steps, config.diffusion_solver
        self.timesteps = respaced_timesteps(self.train_steps, self.steps)

    @property
    def noise_dim(self) -> int:
        return diffusion_noise_dim(self.latent_dim, self.steps, self.solver)

    @property
    def evals_per_sample(self) -> int:
        return self.steps

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents [..., n, l] for h [..., d] and Gaussian noise [..., n, noise_dim]."""
        cond = self.net.condition(h)  # once per position, shared by every step and sample
        return diffusion_sample(
            lambda x, t: self.net(x, t, cond), noise, self.alphas_cumprod, self.timesteps, self.solver
        )

    def _acp(self, device) -> torch.Tensor:
        acp = self._acp_on.get(device)
        if acp is None:
            acp = self._acp_on[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return acp

    def loss(self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Noise MSE per position [...] (mean over the N draws and the l dimensions)."""
        shape = (*mu.shape[:-1], self.num_samples)
        with torch.no_grad():
            z = (
                torch.randn((*shape, mu.shape[-1]), device=mu.device)
                .mul_(std.unsqueeze(-2))
                .add_(mu.unsqueeze(-2))
            )
            eps = torch.randn_like(z)
            t = torch.randint(0, self.train_steps, shape, device=mu.device)
            a = self._acp(mu.device)[t].unsqueeze(-1)
            xt = a.sqrt() * z + (1 - a).sqrt() * eps
        pred = self.net(xt, t, self.net.condition(h))
        per_pos = (pred.float() - eps).square().mean(dim=(-2, -1))
        return per_pos, {"noise_mse": per_pos.detach().mean()}
