"""What a training run starts or resumes from, besides the optimizer and the schedule.

* RNG states (python, numpy, torch CPU and CUDA), in a form ``torch.load(weights_only=True)``
  reads: checkpoints carry one per rank, so a resumed run draws what an uninterrupted one would.
  (Not `calm.rng`: that is stateless per-row streams for generation; this is the process's
  global generators, which the models' training draws come from.)
* Weights copied into the materialised model: initial ones (CALM's trained autoencoder) on a
  fresh run, a checkpoint's model.safetensors on resume; `build_calm_from_autoencoder` builds a
  CALM around an autoencoder directly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calm.checkpoint import checked_weights, load_weights
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


def build_calm_from_autoencoder(config, ae: nn.Module) -> nn.Module:
    """A CALM model around the frozen, trained autoencoder `ae`."""
    from calm.models.calm import CALM

    if hasattr(CALM, "from_autoencoder"):
        return CALM.from_autoencoder(config, ae)
    model = CALM(config)
    model.autoencoder.load_state_dict(ae.state_dict())
    model.autoencoder.requires_grad_(False)
    return model
