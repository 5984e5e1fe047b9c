"""The generative-head interface of CALM and the registry of its implementations.

A head turns a backbone hidden state h into latent vectors (the next chunk's, in the frozen
autoencoder's latent space). Every head is an `nn.Module` with the same small contract, so
the rest of the library (training, BrierLM, both temperature samplers, `generate`, FLOPs)
never needs to know which one it holds:

    loss(h [..., d], mu [..., l], std [..., l]) -> (per-position loss [...], metrics)
        the training objective, given the frozen encoder's posterior N(mu, std²) of the
        true next chunk (heads draw their own targets from it);
    forward(h [..., d], noise [..., n, noise_dim]) -> latents [..., n, l]
        deterministic given the noise: all of a sample's randomness is in its noise vector;
    sample(h, n, generator=None) -> latents [..., n, l]
        n independent samples (noise from torch's RNG / `generator`): one draw each;
    noise(shape, device, generator) and noise_from_uniform(u)
        the head's noise distribution, from torch's RNG or from given uniforms in (0, 1)
        (`calm.generation` draws its own counter-based uniforms per row);
    noise_dim, evals_per_sample, describe()
        noise values per sample, network evaluations per sample, a JSON-ready summary;
    init_weights()
        the head's one seeded initialisation. Heads are built on the meta device
        (`calm.models.layers.built_on_meta`), so every parameter must be set here: the CALM
        model calls it from its own ``init_weights`` (tests/test_meta_init.py checks that
        nothing is left out).

Sampling settings (steps, solver) are config fields read by ``configure(config)``, so they
can change at use time: ``CALM.set_head_sampling(steps=4)`` (``calm generate --head-steps``,
``calm eval --head-steps``). A new head is one module with a `GenerativeHead` subclass, one
entry in `HEADS`, and its name (and settings, with their checks) in `calm.config`.
"""

from __future__ import annotations

import importlib
import typing

import torch
from torch import nn

from calm.config import CALMConfig, ConfigError

# head name -> (module, class name); imported lazily, as `calm.models.MODEL_CLASSES`. The
# names are `calm.config.HEAD_NAMES` (tests/test_heads.py checks that the two agree).
HEADS: dict[str, tuple[str, str]] = {
    "energy": ("calm.models.energy", "EnergyHead"),
    "flow": ("calm.models.flow", "FlowHead"),
    "diffusion": ("calm.models.diffusion", "DiffusionHead"),
}


class GenerativeHead(nn.Module):
    """Base class of CALM's heads: the shared defaults of the contract in the module docstring.

    Subclasses set `name`, implement `from_config`, `forward`, `loss` and `reset_parameters`
    (every weight, from torch's RNG), decorate ``__init__`` with `built_on_meta`, give
    `noise_dim` (an attribute or a property) and, if they have sampling settings, name their
    config fields in `steps_field` / `solver_field` and read them in `configure`.
    """

    name: typing.ClassVar[str] = ""
    steps_field: typing.ClassVar[str | None] = None  # CALMConfig field of the sampling steps
    solver_field: typing.ClassVar[str | None] = None  # CALMConfig field of the solver
    latent_dim: int
    noise_dim: int

    @classmethod
    def from_config(cls, config: CALMConfig) -> GenerativeHead:
        raise NotImplementedError

    def configure(self, config: CALMConfig) -> None:
        """Read the sampling settings from `config` (the weights do not depend on them)."""

    def init_weights(self) -> None:
        """The seeded initialisation of every weight (`reset_parameters`)."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define reset_parameters")

    @property
    def evals_per_sample(self) -> int:
        """Network evaluations per sample (1 for a one-step head)."""
        return 1

    @property
    def noise_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def noise(
        self, shape: tuple[int, ...], device=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Standard Gaussian noise [*shape, noise_dim] (torch's global RNG by default)."""
        w = next(self.parameters())
        return torch.randn(
            (*shape, self.noise_dim), device=device or w.device, dtype=w.dtype, generator=generator
        )

    def noise_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """The head's noise from uniforms u in (0, 1) of the same shape (may reuse u's storage):
        by default standard Gaussians by the inverse normal CDF."""
        return torch.special.ndtri(u)

    def sample(
        self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`num_samples` independent samples per position: h [..., d] -> [..., num_samples, l]."""
        return self(h, self.noise((*h.shape[:-1], num_samples), device=h.device, generator=generator))

    def loss(self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def sampling_changes(self, steps: int | None = None, solver: str | None = None) -> dict:
        """The config changes that set this head's sampling steps / solver (ConfigError naming
        the option if the head has no such setting)."""
        changes = {}
        for option, value, field in (
            ("steps", steps, self.steps_field),
            ("solver", solver, self.solver_field),
        ):
            if value is None:
                continue
            if field is None:
                raise ConfigError(
                    f"head_{option}: the {self.name} head has no sampling {option} (it draws a sample "
                    f"in {self.evals_per_sample} network evaluation(s)); only flow and diffusion heads do"
                )
            changes[field] = value
        return changes

    def describe(self) -> dict:
        """What the head is and how it samples (for reports and JSON results)."""
        out = {"name": self.name, "evals_per_sample": self.evals_per_sample}
        for option in ("steps", "solver"):
            field = getattr(self, f"{option}_field")
            if field is not None:
                out[option] = getattr(self, option)
        return out


def head_class(name: str) -> type[GenerativeHead]:
    """The head class registered under `name` (ConfigError naming the field if there is none)."""
    if name not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {name!r}")
    module, cls = HEADS[name]
    return getattr(importlib.import_module(module), cls)


def build_head(config: CALMConfig) -> GenerativeHead:
    """The head `config.head` names, sized and set up from `config`."""
    head = head_class(config.head).from_config(config)
    head.configure(config)
    return head
