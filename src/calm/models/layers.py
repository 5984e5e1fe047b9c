"""Building blocks shared by the autoencoder, the backbone and the heads, and how models are built.

Construction (`built_on_meta`): a model's modules are created on the ``meta`` device (no
memory, no random draws), then materialised on the default device and filled by the model's
own ``init_weights()``, its one seeded initialisation. So ``torch.manual_seed(s); Model(cfg)``
and ``with torch.device("meta"): m = Model(cfg)`` followed later by ``materialize(m, device)``
and ``torch.manual_seed(s); m.init_weights()`` give the same weights: the random draws happen
in ``init_weights`` only, in the same order. The second form lets FSDP2 shard a model before
any weight exists (each rank then allocates only its shards) and lets a loader skip the random
initialisation of weights it is about to overwrite.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 for bf16 stability."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """Llama feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ResidualMLP(nn.Module):
    """Pre-norm residual feed-forward block: x + SwiGLU(RMSNorm(x)). No attention."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half convention (as Hugging Face Llama)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        # Not saved in checkpoints: a pure function of the config (`reset_buffers` recomputes it
        # after the module was built on the meta device).
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Compute the cos/sin tables (in float64 on the CPU, stored as float32) on `device`
        (default: where the buffers are; nothing is computed while they are on meta)."""
        device = torch.device(device) if device is not None else self.cos.device
        if device.type == "meta":
            return
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64, device="cpu"), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def table(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the consecutive positions start .. start+length-1 -> each [1, 1, length, head_dim].

        The bound is checked from the numbers (shapes), so this is free of host syncs.
        """
        if start + length > self.max_positions:
            raise ValueError(
                f"position {start + length - 1} is beyond the model's context of {self.max_positions} "
                "positions (max_seq_len)"
            )
        return self.cos[start : start + length][None, None], self.sin[start : start + length][None, None]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for integer `positions` [B, T] -> each [B, 1, T, head_dim]."""
        # The check reads the positions' values (a host sync): eager only; a compiled step
        # relies on its caller having checked the lengths from shapes.
        if (
            not torch.compiler.is_compiling()
            and positions.numel()
            and int(positions.max()) >= self.max_positions
        ):
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's context of {self.max_positions} "
                "positions (max_seq_len)"
            )
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases, ones for norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RotaryEmbedding):
            m.reset_buffers()


def reset_buffers(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute every buffer that is a function of the config (the rotary tables), where each
    buffer is or on `device` (e.g. "cpu" for buffers still on meta)."""
    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers(device)


# ---------------------------------------------------------------------------------------------
# Construction on the meta device


def tie_groups(module: nn.Module) -> list[list[str]]:
    """Names that share one Parameter (e.g. an embedding tied to an output matrix), per group."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(module: nn.Module, groups: list[list[str]]) -> None:
    """Make every name of each group refer to the group's first Parameter again."""
    for names in groups:
        shared = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, shared)


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate a module built on the meta device on `device` (`nn.Module.to_empty`, whose
    values are garbage until initialised or loaded), keeping tied parameters tied."""
    groups = tie_groups(module)
    module.to_empty(device=device)
    retie(module, groups)
    return module


def built_on_meta(init):
    """Decorator for a model's ``__init__``: build its modules on the meta device, then (unless
    the default device is itself meta) materialise them there and call ``self.init_weights()``.

    Nested models built inside another one stay on meta and are initialised by the outer
    model's ``init_weights``, so the random draws of a whole model happen in one place.
    """

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        device = torch.get_default_device()
        with torch.device("meta"):
            init(self, *args, **kwargs)
        if device.type != "meta":
            materialize(self, device)
            with torch.no_grad():
                self.init_weights()

    return __init__
