"""The on-disk layout of a checkpoint directory: file names, the format tag, what makes one complete.

A checkpoint is a directory::

    config.json        {"format": "calm-checkpoint-v1", "kind": ..., "config": {...}, "calm_version": ...}
    model.safetensors  weights; tied tensors stored once (safetensors.torch.save_model)
    tokenizer.json ... whatever `Tokenizer.save(dir)` writes, when the model has a tokenizer
    train_state.pt     training checkpoints only: optimizer, scheduler, step, RNG states, metrics
    COMPLETE           written last: {"format", "sizes": {file: bytes}, "sha256": {file: hex}} for
                       the weight files; a directory without it is never loaded

Saves write into a hidden sibling ``.<name>.tmp-<pid>-<rand>`` and park a replaced checkpoint in
``.<name>.old-<pid>-<rand>`` (`calm.checkpoint_writing`); loads follow those rules
(`calm.checkpoint_reading`). Both import the names and `CheckpointError` from here; users import
everything from `calm.checkpoint`. No torch here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

FORMAT = "calm-checkpoint-v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
COMPLETE_FILE = "COMPLETE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")
# Files whose byte size and SHA-256 the COMPLETE marker records and loads check.
_SIZED_FILES = (WEIGHTS_FILE, TRAIN_STATE_FILE)


_TMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


class CheckpointError(ValueError):
    """A directory that is not a complete, loadable checkpoint (message says why)."""


def is_complete(path: str | os.PathLike) -> bool:
    """True if `path` is a directory with our config.json and the COMPLETE marker."""
    path = Path(path)
    return path.is_dir() and (path / COMPLETE_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _is_checkpoint_like(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / COMPLETE_FILE).exists():
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _siblings(path: Path, tag: str) -> list[Path]:
    """Hidden siblings ``.<name>.<tag>-*`` of checkpoint `path`, newest first."""
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob(f".{path.name}.{tag}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
