"""What a training run starts or resumes from: weights, RNG states, optimizer and schedule state.

* RNG states (python, numpy, torch CPU and CUDA), in a form ``torch.load(weights_only=True)``
  reads: checkpoints carry one per rank, so a resumed run draws what an uninterrupted one would.
  (Not `calm.rng`: that is stateless per-row streams for generation; this is the process's
  global generators, which the models' training draws come from.)
* Weights copied into the materialised model: initial ones (CALM's trained autoencoder) on a
  fresh run, a checkpoint's model.safetensors on resume; `build_calm_from_autoencoder` builds a
  CALM around an autoencoder directly.
* Resuming (`_restore_train_state`): the optimizer state, the schedule's position, the run of
  skipped steps and the RNG states of a checkpoint put back, and where the run stood.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calm.checkpoint import checked_weights, load_weights
from calm.config import TrainConfig
from calm.distributed import DistInfo
from calm.train_log import _say
from calm.train_step import DeviceSchedule, StepRunner, init_optimizer_state
from calm.train_stop import TrainingError


def capture_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_initial_weights(raw: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (e.g. CALM's trained autoencoder) into the materialised model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    unknown = sorted(set(weights) - set(raw.state_dict()))
    if unknown:
        raise TrainingError(f"initial weights name no parameter of {type(raw).__name__}: {unknown[:4]}")
    set_model_state_dict(raw, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _load_full_weights(raw: nn.Module, found: Path, sharded: bool) -> None:
    """The model.safetensors of checkpoint `found` into the model (sharded or not)."""
    if not sharded:
        load_weights(raw, found)
        return
    _load_initial_weights(raw, checked_weights(raw, found))


def _restore_train_state(
    state: dict[str, Any],
    found: Path,
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: DeviceSchedule,
    runner: StepRunner,
    cfg: TrainConfig,
    info: DistInfo,
    sharded: bool,
) -> tuple[int, list[dict[str, Any]], float]:
    """Resume from checkpoint `found` (`state`: its ``load_train_state``): the optimizer state
    (from the shards, which hold the weights too, or a full state dict), the schedule's position,
    the run of skipped steps and this rank's RNG state. Returns the step to continue from, the
    metrics records logged up to it and the elapsed seconds before it."""
    from calm.sharded_checkpoint import is_sharded, load_sharded

    if is_sharded(found):  # every rank reads its own part of the weights and optimizer state
        init_optimizer_state(optimizer)
        load_sharded(found, raw, optimizer)
    elif sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        init_optimizer_state(optimizer)
        set_optimizer_state_dict(
            raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state["optimizer"])
    schedule.install()  # the loaded groups carry the saved lr; the schedule owns it
    schedule.load_state_dict(state["scheduler"])
    runner.set_streak(int(state.get("bad_steps", 0)))
    start_step, history = int(state["step"]), list(state.get("metrics", []))
    elapsed_before = float(state.get("elapsed_s", 0.0))
    rngs = state.get("rng") or []
    if len(rngs) == info.world_size:
        restore_rng_state(rngs[info.rank])
    else:
        if info.is_main:
            _say(
                f"note: checkpoint was written by {len(rngs)} process(es), now {info.world_size}: "
                "RNG streams reseeded, the run will not match an uninterrupted one bit for bit"
            )
        seed_everything(cfg.seed + 1000 * info.rank + 7919 * start_step)
    return start_step, history, elapsed_before


def build_calm_from_autoencoder(config, ae: nn.Module) -> nn.Module:
    """A CALM model around the frozen, trained autoencoder `ae`."""
    from calm.models.calm import CALM

    if hasattr(CALM, "from_autoencoder"):
        return CALM.from_autoencoder(config, ae)
    model = CALM(config)
    model.autoencoder.load_state_dict(ae.state_dict())
    model.autoencoder.requires_grad_(False)
    return model
