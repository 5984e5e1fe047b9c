"""How training updates the weights, and at what precision: the AdamW parameter groups, the
learning-rate schedule (on the host; `calm.train_step.DeviceSchedule` evaluates the same formula
on the device) and the bf16 autocast context."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from calm.config import ConfigError, TrainConfig
from calm.train_stop import TrainingError


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor applied to ``cfg.lr`` for optimizer update number `step` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` (full lr at update ``warmup_steps - 1``), then
    constant, or a half-cosine from lr down to ``min_lr_ratio * lr`` reached at ``cfg.steps``
    and held after.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: decay for matrices, none for vectors/scalars (norms, biases) and embeddings.

    Frozen parameters (``requires_grad=False``, e.g. CALM's autoencoder) are left out. Tied
    parameters appear once (under their first name). lr_scales ({module prefix: factor},
    `TrainConfig.lr_scales`) puts the parameters under each prefix into groups of their own
    with ``lr * factor`` (the schedule multiplies every group's lr alike).
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    scales = lr_scales or {}
    unknown = [p for p in scales if not any(n.startswith(p + ".") for n, _ in model.named_parameters())]
    if unknown:
        raise ConfigError(f"lr_scale names no parameters of {type(model).__name__}: {', '.join(unknown)}")
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or id(p) in embedding_params)
        factor = next((f for prefix, f in scales.items() if name.startswith(prefix + ".")), 1.0)
        groups.setdefault((decay, factor), []).append(p)
    out = []
    for (decay, factor), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if factor != 1.0:
            group["lr"] = lr * factor if lr is not None else None
        out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None):
    """AdamW over `param_groups`, fused (one kernel per step on CPU and CUDA; it also takes the
    ``found_inf`` flag that skips a non-finite step on the device, `calm.train_step`)."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scales)
    if not groups:
        raise TrainingError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast for ``dtype="bf16"``, or ``"auto"`` on CUDA; nothing for fp32."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
