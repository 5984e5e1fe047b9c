"""Finding, verifying and loading checkpoint directories: strict loads with errors that say why.

Loads verify what COMPLETE records (size, then SHA-256 of model.safetensors and train_state.pt;
``verify=False`` / ``--no-verify`` skips the hashes) and that every floating-point weight is
finite, so a corrupted or diverged checkpoint is an error naming the file or the tensor.
`resolve_checkpoint` is the one rule for which directory a path means: never a temporary
directory of a save, never one without the COMPLETE marker, and the ``.old`` sibling when a
crash between the two renames of a save left only that (`calm.checkpoint_writing`). The layout
is `calm.checkpoint_layout`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.checkpoint_layout import (
    _SIZED_FILES,
    _TMP_NAME,
    COMPLETE_FILE,
    CONFIG_FILE,
    FORMAT,
    TOKENIZER_FILES,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _siblings,
    is_complete,
)
from calm.filesystem import HASH_ALGORITHM, contained_path, file_digest

# Shape mismatches listed in a load error before "... and N more".
_MAX_LISTED = 4


def _looks_official(path: Path) -> bool:
    """The authors' released layout: a config.json with `patch_size` and HF-style weights."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or "format" in cfg or "patch_size" not in cfg:
        return False
    return any(path.glob("pytorch_model*.bin")) or any(path.glob("*.safetensors"))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory to read for `path`, or a `CheckpointError` saying why not.

    Follows the ``.old`` sibling a crash between the two renames of a save can leave.
    """
    path = Path(path)
    if _TMP_NAME.match(path.name):
        raise CheckpointError(
            f"{path} is the temporary directory of an unfinished or interrupted save; it is never loaded"
        )
    if is_complete(path):
        return path
    if not path.exists():
        old = [p for p in _siblings(path, "old") if is_complete(p)]
        if old:
            warnings.warn(
                f"{path} is missing but a complete previous version {old[0].name} exists "
                "(a save was interrupted); using it",
                stacklevel=2,
            )
            return old[0]
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a calm checkpoint: it has no {CONFIG_FILE} (expected a directory written by "
            "calm train/train-ae or calm.checkpoint.save_checkpoint)"
        )
    raise CheckpointError(
        f"{path} is an incomplete or interrupted checkpoint (no {COMPLETE_FILE} marker); "
        "it cannot be trusted, use an earlier checkpoint or re-run the save"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / CONFIG_FILE} is not a calm checkpoint config (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})"
        )
    return meta


def _verify_files(path: Path, verify: bool = True, names: tuple[str, ...] = _SIZED_FILES) -> None:
    """Check `names` of checkpoint `path` against its COMPLETE marker: sizes always, hashes if `verify`.

    A marker that is not JSON is corruption too. Markers written before hashes were recorded
    (sizes only, or an empty file) are checked as far as they go.
    """
    try:
        text = (path / COMPLETE_FILE).read_text()
        marker = json.loads(text) if text.strip() else {}
        if not isinstance(marker, dict):
            raise ValueError(f"a JSON {type(marker).__name__}, not an object")
    except ValueError as err:
        raise CheckpointError(
            f"{path / COMPLETE_FILE} is corrupted (not the JSON object a save writes: {err}); "
            "the checkpoint cannot be trusted"
        ) from err
    sizes, hashes = marker.get("sizes") or {}, marker.get(HASH_ALGORITHM) or {}
    if not isinstance(sizes, dict) or not isinstance(hashes, dict):
        raise CheckpointError(f"{path / COMPLETE_FILE} is corrupted (sizes/{HASH_ALGORITHM} are not maps)")
    for name in names:
        if name not in sizes and name not in hashes:
            continue
        file = contained_path(path, name, f"{path / COMPLETE_FILE} entry")
        actual = file.stat().st_size if file.is_file() else None
        if name in sizes and actual != sizes[name]:
            raise CheckpointError(
                f"{file} is {'missing' if actual is None else f'{actual} bytes'}, "
                f"but {sizes[name]} bytes were written: the checkpoint is corrupted"
            )
        if verify and name in hashes:
            if actual is None:
                raise CheckpointError(f"{file} is missing: the checkpoint is corrupted")
            digest = file_digest(file)
            if digest != hashes[name]:
                raise CheckpointError(
                    f"{file} does not have the content that was saved ({HASH_ALGORITHM} {digest[:16]}..., "
                    f"recorded {str(hashes[name])[:16]}...): the checkpoint is corrupted. "
                    "(--no-verify / verify=False skips this check)"
                )


def _config_and_missing(path: Path):
    """(model config of checkpoint `path`, names of config fields its config.json lacks)."""
    meta = _read_meta(path)
    kind = meta.get("kind")
    from calm.config import CONFIG_CLASSES, config_from_dict

    if kind not in CONFIG_CLASSES:
        raise CheckpointError(
            f"{path}: unknown model kind {kind!r}; expected one of {sorted(CONFIG_CLASSES)}"
        )
    data = meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: 'config' is not a JSON object")
    try:
        config = config_from_dict(kind, dict(data))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid {kind} config: {err}") from err
    missing = sorted(set(config.to_dict()) - set(data))
    return config, missing


def _missing_fields_note(path: Path, config, missing: list[str]) -> str:
    values = ", ".join(f"{k}={getattr(config, k)!r}" for k in missing)
    return f"{path / CONFIG_FILE} has no field(s) {', '.join(missing)}; the default(s) {values} were used"


def load_config(path: str | os.PathLike):
    """The model config object stored in checkpoint `path` (no weights are read).

    Fields absent from config.json (a checkpoint written before the field existed, or an
    edited file) take their defaults, with a warning naming them.
    """
    path = resolve_checkpoint(path)
    config, missing = _config_and_missing(path)
    if missing:
        warnings.warn(_missing_fields_note(path, config, missing), stacklevel=2)
    return config


def _shared_groups(state_dict: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """name -> all names (itself included) that are the very same tensor (tied weights), for a
    ``state_dict(keep_vars=True)`` (tied names hold one Parameter object; sharded ones too)."""
    by_key: dict[int, set[str]] = defaultdict(set)
    for name, t in state_dict.items():
        by_key[id(t)].add(name)
    return {name: group for group in by_key.values() for name in group}


def _nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity (one min/max pass each)."""
    names = [n for n, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    extremes = torch.stack([torch.stack(torch.aminmax(tensors[n])).float() for n in names])
    bad = (~torch.isfinite(extremes).all(dim=1)).tolist()
    return [n for n, b in zip(names, bad) if b]


def load_weights(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, *, verify: bool = True
) -> nn.Module:
    """Load ``path/model.safetensors`` into `model` in place, with explicit errors.

    Names missing from the file are fine when they are tied to a name that is present (that is
    how `save_model` stores tied weights); the tie survives because the modules share the
    Parameter and values are copied in place. For a checkpoint directory the file's size and
    (if `verify`) its SHA-256 are checked against the COMPLETE marker first. A weight holding
    NaN or infinity is an error naming it (`verify=False` loads it anyway).
    """
    tensors = checked_weights(model, path, strict, verify=verify)
    model_sd = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            if name in model_sd:
                model_sd[name].copy_(value)
    return model


def checked_weights(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors`` (CPU), checked against `model`'s names and
    shapes as `load_weights` does, without copying them in (e.g. for a sharded model)."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if path.is_dir() and (path / COMPLETE_FILE).is_file():
        _verify_files(path, verify, (WEIGHTS_FILE,))
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as err:  # the Rust error types do not share a Python base class
        raise CheckpointError(f"cannot read {file} (corrupted or not a safetensors file): {err}") from err

    model_sd = model.state_dict(keep_vars=True)
    groups = _shared_groups(model_sd)
    unexpected = sorted(set(tensors) - set(model_sd))
    missing = sorted(n for n in set(model_sd) - set(tensors) if not (groups.get(n, {n}) & set(tensors)))
    mismatched = [
        f"{n}: checkpoint {tuple(tensors[n].shape)} vs model {tuple(model_sd[n].shape)}"
        for n in sorted(set(tensors) & set(model_sd))
        if tensors[n].shape != model_sd[n].shape
    ]
    problems = []
    if mismatched:
        more = len(mismatched) - _MAX_LISTED
        problems.append(
            "shape mismatch for "
            + "; ".join(mismatched[:_MAX_LISTED])
            + (f"; ... and {more} more" if more > 0 else "")
        )
    if strict and missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected key(s): {', '.join(unexpected)}")
    if problems:
        raise CheckpointError(f"{file} does not match {type(model).__name__}: " + " | ".join(problems))
    bad = _nonfinite_tensors(tensors) if verify else []
    if bad:
        raise CheckpointError(
            f"{file}: weight(s) {', '.join(bad[:_MAX_LISTED])}"
            + (f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
            + " hold NaN or infinite values (the run that saved them diverged, or the file is "
            "corrupted); the model would produce garbage"
        )
    return tensors


def load_model(
    path: str | os.PathLike,
    device=None,
    dtype=None,
    strict: bool = True,
    *,
    ae_path=None,
    verify: bool = True,
) -> nn.Module:
    """The model stored in checkpoint directory `path`, in eval mode, tokenizer attached.

    Also accepts the authors' released layout (delegated to `calm.official.load_official`);
    ``ae_path`` is then the autoencoder directory of a released CALM model that neither holds a
    copy of it nor has it beside it. Our own CALM checkpoints always carry their autoencoder.
    ``verify``: check the weights' SHA-256 against the COMPLETE marker and refuse non-finite
    weights (False skips both; sizes are always checked).
    ``path`` and ``ae_path`` may also be Hugging Face repo ids in the local cache (`calm.hub`).
    """
    from calm.hub import is_hub_name, resolve_model_path

    path = Path(path)
    if is_hub_name(path) and not _siblings(path, "old"):  # not here (nor its .old copy): a Hub repo id
        path = resolve_model_path(path)
    if ae_path is not None and is_hub_name(ae_path):
        ae_path = resolve_model_path(ae_path)
    if path.is_dir() and not (path / COMPLETE_FILE).exists() and _looks_official(path):
        try:
            from calm.official import load_official
        except ImportError as err:
            raise CheckpointError(
                f"{path} looks like an official CALM release, but calm.official is not available: {err}"
            ) from err
        return load_official(path, ae_path=ae_path, device=device, dtype=dtype)
    if ae_path is not None:
        raise CheckpointError(
            f"an autoencoder directory (ae_path={str(ae_path)!r}) is only for the authors' released CALM "
            f"models; {path} is a calm checkpoint, and a CALM checkpoint of ours carries its autoencoder"
        )

    path = resolve_checkpoint(path)
    if not (path / WEIGHTS_FILE).exists() and (path / "dcp" / ".metadata").is_file():
        from calm.sharded_checkpoint import load_sharded_model  # a sharded training checkpoint

        model = load_sharded_model(path, verify=verify)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model
    config, missing = _config_and_missing(path)
    _verify_files(path, verify=False)  # sizes first: cheap, and names a truncated file
    from calm.models import build_model

    try:  # every weight comes from the file (strict): allocate them, draw nothing
        model = build_model(config, device="cpu", init=not strict)
    except (TypeError, ValueError) as err:  # e.g. a CALM config's nested autoencoder dict
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid {config.kind} config: {err}") from err
    try:
        load_weights(model, path, strict=strict, verify=verify)
    except CheckpointError as err:
        if missing:
            raise CheckpointError(f"{_missing_fields_note(path, config, missing)}, and {err}") from err
        raise
    if missing:
        warnings.warn(_missing_fields_note(path, config, missing), stacklevel=2)
    if dtype is None:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            float_dtypes = {f.get_slice(k).get_dtype() for k in f.keys()} & {"BF16", "F16"}
        if len(float_dtypes) == 1:
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[float_dtypes.pop()]
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.tokenizer = load_tokenizer(path)
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in checkpoint (or prepared data) directory `path`, or None."""
    path = Path(path)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    from calm.tokenizer import Tokenizer

    return Tokenizer.load(path)


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state (optimizer, scheduler, step, RNG, config, metrics) of checkpoint `path`."""
    path = resolve_checkpoint(path)
    file = path / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no {TRAIN_STATE_FILE}: it is a model-only checkpoint, not resumable"
        )
    _verify_files(path, True, (TRAIN_STATE_FILE,))
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a training run directory, or None.

    Prefers ``run_dir/checkpoint`` (always the latest save); otherwise the highest
    ``run_dir/checkpoint-<step>``. `run_dir` may itself be a checkpoint.
    """
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        return run_dir
    try:
        return resolve_checkpoint(run_dir / "checkpoint")
    except CheckpointError:
        pass
    numbered = []
    for p in run_dir.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and is_complete(p):
            numbered.append((int(suffix), p))
    return max(numbered)[1] if numbered else None
