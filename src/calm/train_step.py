"""One optimizer step that never waits for the device, and the numbers it leaves on the device.

`StepRunner.run(step, batch)` queues forward, backward, gradient clipping and the AdamW update
of one step and returns without reading anything back: on a GPU the host can run ahead and the
device never idles. What a step would otherwise need the host for happens on the device:

* **Non-finite losses or gradients** (found-inf style, as `torch.amp.GradScaler` does): the
  step's flag "every micro-batch loss and the gradient norm are finite" is agreed by all ranks
  (a MIN all-reduce of a device tensor) and handed to the fused AdamW kernel as ``found_inf``;
  a flagged step leaves weights, moments and the step count untouched. The host learns of it at
  the next `read` (a log line), which reports how many steps were skipped.
* **The learning-rate schedule** is evaluated on the device from the number of updates applied
  so far (`lr_multiplier` on tensors), because only the device knows whether the last step was
  skipped, and a skipped step does not advance the schedule. Each parameter group's ``lr`` is a
  0-dim device tensor that the fused AdamW kernel reads.
* **Metrics** (the loss, the model's metrics, the gradient norm) are summed over the applied
  steps of the interval in one device vector, with counts of applied and skipped steps and the
  current run of consecutive skipped steps.

`StepRunner.read()` is the one host read: at a log line it all-reduces the sums over ranks and
turns them into means, in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calm.config import TrainConfig
from calm.distributed import all_reduce_min, all_reduce_sum, gradient_sync

# Positions in `StepRunner.counters`.
_APPLIED, _SKIPPED, _STREAK, _MAX_STREAK, _LAST_BAD = range(5)


class DeviceSchedule:
    """`calm.train_optim.lr_multiplier` evaluated on the device from the count of applied updates.

    Installs a 0-dim float32 device tensor as every group's ``lr`` (the fused AdamW kernel
    reads it there) and keeps each group's base lr (``cfg.lr`` times its `lr_scale` factor) on
    the host. ``updates`` is the schedule's position, a device tensor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device):
        self.optimizer, self.cfg, self.device = optimizer, cfg, device
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.updates = torch.zeros((), dtype=torch.float32, device=device)
        self.install()

    def install(self) -> None:
        """(Re)place each group's lr by its own device tensor (after loading optimizer state too)."""
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = torch.full((), base, dtype=torch.float32, device=self.device)
            g["base_lr"] = base

    def multiplier(self, updates: torch.Tensor) -> torch.Tensor:
        """lr_multiplier(updates) on tensors (same formula, float32)."""
        c = self.cfg
        warm = (updates + 1) / max(1, c.warmup_steps)
        if c.schedule == "constant":
            after = torch.ones_like(updates)
        else:
            progress = ((updates - c.warmup_steps) / max(1, c.steps - c.warmup_steps)).clamp(0.0, 1.0)
            after = c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(updates < c.warmup_steps, warm, after)

    def set_lr(self) -> None:
        """Write this update's lr into every group (device ops only)."""
        mult = self.multiplier(self.updates)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            torch.mul(mult, base, out=g["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Host read: for checkpoints (the key LambdaLR used, so old checkpoints still resume)."""
        return {"last_epoch": int(self.updates.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates.fill_(float(state["last_epoch"]))


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state without changing anything: one step with zero
    gradients that the fused kernel skips (``found_inf`` = 1). Sharded checkpoints
    (`torch.distributed.checkpoint`) need the state to exist before they can load into it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.found_inf = torch.ones((), dtype=torch.float32, device=device)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)


@dataclass
class IntervalStats:
    """What `StepRunner.read` returns (host values)."""

    means: dict[str, float]  # over the interval's applied steps and all ranks; {} if none applied
    applied: int
    skipped: int
    streak: int  # consecutive skipped steps up to now (carried across intervals)
    max_streak: int  # longest run of consecutive skipped steps seen in the interval
    last_bad_step: int  # 1-based step of the last skipped step (0: none yet)
    lr: float  # the lr of the interval's last step (before any group's lr_scale factor)


class StepRunner:
    """Queues training steps (see the module docstring); `read` is the one host read."""

    def __init__(
        self,
        wrapped: nn.Module,
        loss_call,
        optimizer: torch.optim.Optimizer,
        schedule: DeviceSchedule,
        params: list[nn.Parameter],
        cfg: TrainConfig,
        device: torch.device,
        amp,
    ):
        self.wrapped, self.loss_call, self.optimizer, self.schedule = wrapped, loss_call, optimizer, schedule
        self.params, self.cfg, self.device, self.amp = params, cfg, device, amp
        self.keys: list[str] | None = None  # metric names, fixed by the first step
        self.sums: torch.Tensor | None = None
        self.counters = torch.zeros(5, dtype=torch.float64, device=device)

    def _values(self, loss: torch.Tensor, metrics: dict[str, Any]) -> torch.Tensor:
        names = [k for k in metrics if k != "loss"] + ["loss"]
        if self.keys is None:
            self.keys = names + ["grad_norm"]
            self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        elif names != self.keys[:-1]:
            raise ValueError(f"the model's training metrics changed from {self.keys[:-1]} to {names}")
        parts = [torch.as_tensor(metrics[k], device=self.device).detach().float().mean() for k in names[:-1]]
        return torch.stack(parts + [loss.detach().float()])

    def run(self, step: int, batch: torch.Tensor) -> None:
        """Queue step `step` (0-based) on `batch` (this rank's windows); no host read."""
        cfg = self.cfg
        micro_batches = batch.split(len(batch) // cfg.grad_accum)
        values, finite = None, torch.ones((), device=self.device)
        for i, tokens in enumerate(micro_batches):
            with gradient_sync(self.wrapped, i == len(micro_batches) - 1), self.amp:
                loss, metrics = self.loss_call(tokens)
            (loss / cfg.grad_accum).backward()
            v = self._values(loss, metrics)
            values = v if values is None else values + v
            finite = finite * torch.isfinite(loss.detach()).float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = all_reduce_min(finite * torch.isfinite(grad_norm).float())  # every rank: step or skip
        ok = finite > 0
        self.schedule.set_lr()
        self.optimizer.found_inf = 1.0 - finite  # the fused kernel skips the whole update if 1
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.updates += finite
        step_values = torch.cat([values / len(micro_batches), grad_norm.detach().float().reshape(1)])
        self.sums += torch.where(ok, step_values.double(), 0.0)
        c = self.counters
        bad = 1.0 - finite.double()
        c[_APPLIED] += finite.double()
        c[_SKIPPED] += bad
        c[_STREAK] = (c[_STREAK] + 1) * bad
        c[_MAX_STREAK] = torch.maximum(c[_MAX_STREAK], c[_STREAK])
        c[_LAST_BAD] = torch.where(ok, c[_LAST_BAD], float(step + 1))

    def read(self) -> IntervalStats:
        """Host read at a log line: interval means over ranks, counters, lr; then a new interval."""
        if self.sums is None:
            return IntervalStats({}, 0, 0, 0, 0, 0, float(self.cfg.lr))
        c = self.counters
        totals = all_reduce_sum(torch.cat([self.sums, c[_APPLIED : _APPLIED + 1]]))
        # the schedule's lr without any group's lr_scale factor (group 0 may be a scaled one)
        unscaled = self.cfg.lr / self.schedule.base_lrs[0] if self.schedule.base_lrs[0] else 1.0
        lr = self.optimizer.param_groups[0]["lr"].detach().double().reshape(1) * unscaled
        host = torch.cat([totals, c, lr]).tolist()
        n = len(self.keys)
        sums, applied_all = host[:n], host[n]
        applied, skipped, streak, max_streak, last_bad = (int(x) for x in host[n + 1 : n + 6])
        means = {k: s / applied_all for k, s in zip(self.keys, sums)} if applied_all else {}
        self.sums.zero_()
        c[_APPLIED] = 0
        c[_SKIPPED] = 0
        c[_MAX_STREAK] = c[_STREAK]
        return IntervalStats(means, applied, skipped, streak, max_streak, last_bad, host[-1])

    def set_streak(self, bad_steps: int) -> None:
        """Restore the run of consecutive skipped steps (from a checkpoint)."""
        self.counters[_STREAK] = float(bad_steps)
        self.counters[_MAX_STREAK] = float(bad_steps)

    def streak(self) -> int:
        """Host read (for checkpoints): consecutive skipped steps up to now."""
        return int(self.counters[_STREAK].item())
