"""Writing checkpoint directories atomically, and repairing what a crash mid-save left behind.

Atomicity: everything is written into a hidden sibling ``.<name>.tmp-<pid>-<rand>``, fsynced,
marked COMPLETE, and only then renamed into place. Replacing an existing checkpoint renames the
old one to ``.<name>.old-<pid>-<rand>``, renames the new one in, then deletes the old one, so at
every instant a complete checkpoint exists under one of the two names. If a crash hits the
short window between the two renames, `load_model`, `latest_checkpoint` and the next save find
the ``.old`` sibling and use (or restore) it. Temp directories are never loaded.

`save_checkpoint` is the whole save; `begin_checkpoint`, `write_model_files`,
`commit_checkpoint` and `abort_checkpoint` are its parts, for writers that fill the temporary
directory themselves (`calm.sharded_checkpoint`). The layout is `calm.checkpoint_layout`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.checkpoint_layout import (
    _SIZED_FILES,
    COMPLETE_FILE,
    CONFIG_FILE,
    FORMAT,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _is_checkpoint_like,
    _siblings,
    is_complete,
)
from calm.filesystem import HASH_ALGORITHM, file_digest, is_disk_full


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(path: Path) -> None:
    """Repair what a crash mid-save can leave behind, before writing `path` again."""
    if not path.exists():
        old = [p for p in _siblings(path, "old") if is_complete(p)]
        if old:
            os.rename(old[0], path)
    if is_complete(path):
        for p in _siblings(path, "old"):
            shutil.rmtree(p, ignore_errors=True)
    for p in _siblings(path, "tmp"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _dedup_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop all but the first name of tensors that are the same view of the same storage."""
    seen: dict[tuple, str] = {}
    out = {}
    for name in sorted(state_dict):
        t = state_dict[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    tokenizer=None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes | os.PathLike] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write `model` (and optionally its tokenizer and training state) to `path`.

    `extra_files` maps a file name to its text/bytes content, or to a path to copy.
    `state_dict` replaces ``model.state_dict()`` (e.g. a full state dict gathered from shards).
    Returns the checkpoint path.
    """
    path = Path(path)
    model = _unwrap(model)
    tmp = begin_checkpoint(path, model)
    try:
        write_model_files(tmp, model, tokenizer=tokenizer, train_state=train_state, extra_files=extra_files)
        if state_dict is None:
            from safetensors.torch import save_model

            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            from safetensors.torch import save_file

            save_file(_dedup_state_dict(state_dict), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        commit_checkpoint(tmp, path)
    except BaseException as err:
        abort_checkpoint(tmp, path, err)
        raise
    return path


def begin_checkpoint(path: Path, model: nn.Module) -> Path:
    """First part of an atomic save: check `path`, repair what an earlier crash left, and create
    the hidden temporary sibling to write into (returned)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "kind", ""):
        raise CheckpointError(f"{type(model).__name__} has no .config with a kind; cannot write a checkpoint")
    if path.exists() and not _is_checkpoint_like(path):
        raise CheckpointError(
            f"refusing to overwrite {path}: it exists and is not a calm checkpoint directory"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def write_model_files(
    tmp: Path,
    model: nn.Module,
    *,
    tokenizer=None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes | os.PathLike] | None = None,
) -> None:
    """config.json, tokenizer, train_state.pt and `extra_files` of a checkpoint (not the weights)."""
    from calm import __version__

    config = _unwrap(model).config
    meta = {"format": FORMAT, "kind": config.kind, "config": config.to_dict(), "calm_version": __version__}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
    for name, content in (extra_files or {}).items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            shutil.copyfile(content, target)


def commit_checkpoint(tmp: Path, path: Path, records: dict[str, tuple[int, str]] | None = None) -> None:
    """Last part of an atomic save: fsync `tmp`, write the COMPLETE marker and move it to `path`.

    The marker records size and SHA-256 of model.safetensors and train_state.pt (hashed here)
    and of the files in `records` ({name: (bytes, hex digest)}, e.g. shards other processes
    wrote and hashed).
    """
    if (tmp / WEIGHTS_FILE).exists():
        # safetensors creates its file with mode 0600; give it the mode Python gave config.json
        # (0666 less the umask), like every other file of the checkpoint.
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
    _fsync_tree(tmp)
    present = [n for n in _SIZED_FILES if (tmp / n).exists()]
    sizes = {n: (tmp / n).stat().st_size for n in present}
    hashes = {n: file_digest(tmp / n) for n in present}
    for name, (size, digest) in sorted((records or {}).items()):
        sizes[name], hashes[name] = size, digest
    marker = {"format": FORMAT, "sizes": sizes, HASH_ALGORITHM: hashes}
    (tmp / COMPLETE_FILE).write_text(json.dumps(marker) + "\n")
    _fsync_path(tmp / COMPLETE_FILE)
    _fsync_path(tmp)

    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(path, old)
        os.rename(tmp, path)
        _fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_path(path.parent)


def abort_checkpoint(tmp: Path, path: Path, err: BaseException) -> None:
    """Clean up after a failed save; a full disk becomes one `CheckpointError` naming the path."""
    full = isinstance(err, Exception) and is_disk_full(err, tmp if tmp.exists() else path.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    if full:
        kept = f"; the previous checkpoint in {path} is intact" if is_complete(path) else ""
        raise CheckpointError(
            f"cannot write checkpoint {path}: no space left on the device of {path.parent}{kept}"
        ) from err
