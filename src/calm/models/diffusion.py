"""Diffusion head: Gaussian diffusion over latent vectors, sampled on a respaced schedule.

Forward process (T = `diffusion_train_steps`, default 1000): x_t = √ᾱ_t·z + √(1 − ᾱ_t)·ε with
ε ~ N(0, I), ᾱ_t the cumulative product of 1 − β over steps 0..t, and β from the cosine
schedule of Nichol & Dhariwal (2021) (β clipped at 0.999) or the linear one of DDPM.

Prediction target and loss (`diffusion_target`): by default the network predicts the
"velocity" v = √ᾱ_t·ε − √(1 − ᾱ_t)·z (Salimans & Ho, 2022), with "eps" it predicts the noise ε
(DDPM, and the authors' code); either way the plain mean squared error, t uniform over the T
steps. Why v: a sampler needs the clean estimate x̂₀, which v gives as √ᾱ·x − √(1 − ᾱ)·v̂,
while ε gives it as (x − √(1 − ᾱ)·ε̂)/√ᾱ, multiplying the network's error by 1/√ᾱ ≈ 2·10⁴ at
the cosine schedule's last step. On our benchmark after 600 training steps (benchmarks/
bench_heads.py) that made the ε-head's samples blow up to norms ~5·10⁴ (the latents' is ~11);
image models hide it by clipping x̂₀ to the pixel range, which latents do not have. The
authors (like MAR) also learn the reverse variance with the hybrid loss of Nichol & Dhariwal;
we do not: the variance mainly buys likelihood (which BrierLM does not use) and few-step
quality of the ancestral sampler, it doubles the output and adds a second loss term, and
DDIM gives a few-step sampler without it. The MSE's optimum is E[target | x_t], which is
the exact score up to an affine map, so the sampler below is exact for an exact network
(tests/test_head_samplers.py).

Sampling: S = `diffusion_steps` timesteps evenly spaced over 0..T−1 (the respacing of
Nichol & Dhariwal; S = 1 uses step T−1 alone), one network evaluation each, from
x_{T−1} ~ N(0, I):
  "ddpm": ancestral steps of the respaced chain, β'_i = 1 − ᾱ_i/ᾱ_{i−1}, with the posterior
          variance β̃ = β'(1 − ᾱ_{i−1})/(1 − ᾱ_i) ("fixed small"); fresh noise at every step
          but the last, so a sample's noise is S·l values;
  "ddim": the deterministic DDIM update (η = 0); a sample's noise is x_{T−1} (l values).
Both use x̂₀ and ε̂ from the network's output; the ddpm posterior mean is
c₁·x̂₀ + c₂·x with c₁ = √ᾱ_{i−1}·β'/(1 − ᾱ_i), c₂ = √(1 − β')(1 − ᾱ_{i−1})/(1 − ᾱ_i).
`diffusion_sample` is the sampler on its own, for any predictor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from calm.config import DIFFUSION_SCHEDULES, DIFFUSION_SOLVERS, DIFFUSION_TARGETS, ConfigError
from calm.models.adaln_mlp import AdaLNMLP
from calm.models.head import GenerativeHead
from calm.models.layers import built_on_meta


def cumulative_alphas(train_steps: int, schedule: str = "cosine") -> torch.Tensor:
    """ᾱ_t for t = 0..train_steps−1 (float64, on the CPU also while a model is built on meta)."""
    T = train_steps
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor(
            [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64, device="cpu"
        )
    elif schedule == "linear":
        scale = 1000 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64, device="cpu")
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


def clean_and_noise(
    out: torch.Tensor, x: torch.Tensor, a: float, target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from the network output `out` at x = x_t with ᾱ_t = a, for `target` "v" or "eps"."""
    if target == "v":
        return math.sqrt(a) * x - math.sqrt(1 - a) * out, math.sqrt(1 - a) * x + math.sqrt(a) * out
    return (x - math.sqrt(1 - a) * out) / math.sqrt(a), out


def diffusion_sample(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    solver: str = "ddpm",
    target: str = "v",
) -> torch.Tensor:
    """Samples [..., l] from `noise` [..., noise_dim] (`diffusion_noise_dim` values per sample:
    x_{T−1} first, then the ddpm step noises) with the network ``predict(x, t)`` of `target`
    ("v" or "eps"; t a 0-dim tensor holding the training-step index), over the ascending
    `timesteps`."""
    if solver not in DIFFUSION_SOLVERS:
        raise ConfigError(f"diffusion_solver must be one of {', '.join(DIFFUSION_SOLVERS)}, not {solver!r}")
    if target not in DIFFUSION_TARGETS:
        raise ConfigError(f"diffusion_target must be one of {', '.join(DIFFUSION_TARGETS)}, not {target!r}")
    acp = [float(alphas_cumprod[t]) for t in timesteps]  # Python floats: no device sync in the loop
    l = noise.shape[-1] // (len(timesteps) if solver == "ddpm" else 1)
    x = noise[..., :l]
    for i in reversed(range(len(timesteps))):
        a, a_prev = acp[i], (acp[i - 1] if i > 0 else 1.0)
        x0, eps = clean_and_noise(
            predict(x, torch.tensor(float(timesteps[i]), device=x.device)), x, a, target
        )
        if solver == "ddim":
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        else:
            alpha = a / a_prev  # 1 − β' of the respaced chain
            beta = 1 - alpha
            x = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a)) * x
            if i > 0:
                std = math.sqrt(beta * (1 - a_prev) / (1 - a))
                j = len(timesteps) - i  # noise vectors 1..S−1 follow the start
                x = x + std * noise[..., j * l : (j + 1) * l]
    return x


class DiffusionHead(GenerativeHead):
    """Diffusion head (v- or ε-prediction): noise [..., n, noise_dim] -> latents by S denoising steps."""

    name = "diffusion"
    steps_field = "diffusion_steps"
    solver_field = "diffusion_solver"

    @built_on_meta
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
        target: str = "v",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.d_model, self.latent_dim = d_model, latent_dim
        self.num_samples = num_samples  # (target, step, noise) draws per position in training
        self.train_steps, self.schedule, self.target = train_steps, schedule, target
        # not a buffer: the schedule follows from the config, and stays float64 when the
        # weights are cast (bf16 copies for decoding)
        self.alphas_cumprod = cumulative_alphas(train_steps, schedule)
        self._acp_on: dict[torch.device, torch.Tensor] = {}
        self.steps, self.solver = steps, solver
        self.timesteps = respaced_timesteps(train_steps, steps)
        self.net = AdaLNMLP(
            latent_dim, d_model, d_model, num_blocks, time_scale=1000.0 / train_steps, eps=eps
        )

    def reset_parameters(self) -> None:
        """adaLN-zero (`AdaLNMLP.reset_parameters`)."""
        self.net.reset_parameters()

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
            target=config.diffusion_target,
        )

    def configure(self, config) -> None:
        trained = (config.diffusion_train_steps, config.diffusion_schedule, config.diffusion_target)
        if trained != (self.train_steps, self.schedule, self.target):
            raise ConfigError(
                "diffusion_train_steps, diffusion_schedule and diffusion_target are fixed by training; "
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
            lambda x, t: self.net(x, t, cond),
            noise,
            self.alphas_cumprod,
            self.timesteps,
            self.solver,
            self.target,
        )

    def _acp(self, device) -> torch.Tensor:
        acp = self._acp_on.get(device)
        if acp is None:
            acp = self._acp_on[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return acp

    def loss(self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """v (or ε) MSE per position [...] (mean over the N draws and the l dimensions)."""
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
            target = a.sqrt() * eps - (1 - a).sqrt() * z if self.target == "v" else eps
        pred = self.net(xt, t, self.net.condition(h))
        per_pos = (pred.float() - target).square().mean(dim=(-2, -1))
        return per_pos, {f"{self.target}_mse": per_pos.detach().mean()}
