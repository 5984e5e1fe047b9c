"""Data parallelism applied from outside the model code (torchrun, DDP, FSDP2).

One process per device, started by ``torchrun --nproc-per-node N -m calm train ...``.
`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
process group (NCCL on CUDA, Gloo on CPU); without those variables everything here degrades to
single-process no-ops, so the training loop has one code path.

Models expose ``loss(tokens)``; DDP and FSDP only see ``forward``. The convention is therefore
that every model's ``forward(tokens)`` returns exactly what ``loss(tokens)`` returns, and the
training loop calls ``model(tokens)`` so that the wrapper's hooks (gradient all-reduce,
parameter all-gather) run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The one device rule of the library (training, ``--device`` of every command).

    ``None``/``"auto"`` -> this process's CUDA device if there is one, else CPU; a name that is
    not a device, or CUDA asked for where there is none, is a ValueError naming it."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a valid device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; return this process's `DistInfo`.

    Backend: NCCL when the device is CUDA, Gloo otherwise. Safe to call twice, and a no-op
    (rank 0 of 1) when WORLD_SIZE is unset or 1.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP.clear()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the one process that logs and saves."""
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (a new tensor; the input is left alone)."""
    if not _active():
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum of `tensor` over all processes (used to agree on skipping a step)."""
    if not _active():
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor; no host read)."""
    if not _active():
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


_HOST_GROUP: list = []  # [process group] once created


def _host_group():
    """A Gloo group for agreeing on host values without touching the device: the default group
    when it is Gloo already, else one created on first use (every rank gets here in step 1)."""
    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def agree_max(value: int) -> int:
    """The largest of every process's `value` (a host int), agreed without any device work.

    A Gloo all-reduce of one CPU integer: it waits for the other ranks' hosts to reach the same
    point, never for a device, so a step that calls it still queues all its GPU work ahead.
    """
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return int(t[0])


def all_gather_object(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` (a one-element list in a single process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Wrapping


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to shard one by one: `model.fsdp_units()` if the model names them."""
    units = getattr(model, "fsdp_units", None)
    return list(units()) if callable(units) else []


def wrap_model(
    model: nn.Module,
    strategy: str = "ddp",
    device: torch.device | None = None,
    *,
    mp_policy=None,
    broadcast: bool = True,
) -> nn.Module:
    """Wrap `model` for data parallelism; returns it unchanged in a single process.

    - ``"ddp"``: `DistributedDataParallel` (replicated weights, all-reduced gradients).
    - ``"fsdp"``: FSDP2 `fully_shard` on each unit of ``model.fsdp_units()`` (e.g. transformer
      blocks) and then on the root, which collects the remaining parameters. Applied in place:
      the returned object is `model` itself, whose parameters are now sharded DTensors.
      `mp_policy`: an FSDP2 `MixedPrecisionPolicy` (`calm.parallelize.mixed_precision`).

    The model must already be on its device, or (FSDP2 only) still on the meta device, to be
    materialised shard by shard afterwards (`calm.parallelize.materialize_model`). A model that
    exists in full on every rank is first broadcast from rank 0 (`broadcast`), so that ranks
    that built it differently still start alike; a meta model has nothing to broadcast.
    """
    if not _active():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if broadcast:
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, src=0)
        kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
        for unit in _fsdp_units(model):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}; expected 'ddp' or 'fsdp'")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 works in place, so nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce unless `sync` (the last one).

    DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync`; otherwise nothing.
    """
    if sync:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not is_fsdp(model):
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()
