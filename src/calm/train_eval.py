"""Validation during training: weighted means of the loss and the model's metrics over the
validation windows of every rank, kept as device tensors until one all-reduce and one host read."""

from __future__ import annotations

from typing import Any

import torch

from calm.distributed import all_reduce_sum


class _Averager:
    """Weighted running sums of scalars for evaluation (kept as tensors: no host read until
    `_global_means`)."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, values: dict[str, Any], weight: float = 1.0) -> None:
        for k, v in values.items():
            v = v.detach().float().mean() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
        self.count += weight


def _global_means(avg: _Averager) -> dict[str, float]:
    """Means of an averager's scalars over all ranks: one all-reduce and one host read."""
    keys = sorted(avg.sums)
    if not keys:
        return {}
    device = next((v.device for v in avg.sums.values() if torch.is_tensor(v)), torch.device("cpu"))
    vec = torch.stack(
        [torch.as_tensor(avg.sums[k], device=device).detach().double().reshape(()) for k in keys]
    )
    count = torch.full((1,), float(avg.count), dtype=torch.float64, device=device)
    host = all_reduce_sum(torch.cat([vec, count])).tolist()
    return {k: host[i] / host[-1] for i, k in enumerate(keys)} if host[-1] else {}
