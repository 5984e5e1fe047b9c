"""Layout detection and file reading for the authors' release directories (`calm.official`).

A release directory holds a ``config.json`` with ``patch_size`` and ``latent_size`` and the weights as
``pytorch_model.bin``, sharded ``pytorch_model-0000k-of-0000n.bin`` + index, or ``model.safetensors``
(optionally sharded with an index). Tensors are memory-mapped: nothing is read until it is used.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm.filesystem import UnsafePathError, contained_path

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PT_SINGLE = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^(pytorch_model|model)-(\d+)-of-(\d+)\.(bin|safetensors)$")

# Llama-3 special tokens as the CALM authors use them.
LLAMA3_EOT = "<|end_of_text|>"  # id 128001
LLAMA3_PAD = "[PAD]"  # id 128256, added by the authors
LLAMA3_EOT_ID = 128_001
LLAMA3_PAD_ID = 128_256
#: The released autoencoder's token-drop value (it multiplied dropped ids by 0).
OFFICIAL_MASK_ID = 0

# Prefixes in the authors' CALM checkpoints.
HEAD_PREFIXES = ("generative_head.", "mlp_generator.")
AE_PREFIX = "ae_model."
# Keys the authors' files may carry that hold nothing we need (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Paper defaults for the autoencoder's training-only settings (used when a config lacks them).
_AE_TRAINING_DEFAULTS = {"kl_weight": 1e-3, "kl_clamp": 0.5, "ae_dropout": 0.15}


class OfficialFormatError(ValueError):
    """A directory that is not a usable release checkpoint (the message says what is wrong)."""


# =============================================================================================
# Reading a release directory


@dataclass
class OfficialCheckpoint:
    """A release directory opened lazily: its config and memory-mapped tensors."""

    path: Path
    kind: str  # "calm" or "autoencoder"
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: list[Path]
    file_of: dict[str, str]  # key -> file name, for error messages
    format: str  # "pytorch" or "safetensors"
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of distinct tensor data (tensors sharing storage counted once)."""
        return _unique_nbytes(self.tensors.values())

    def where(self, key: str) -> str:
        return f"{self.file_of.get(key, '?')}"


def _unique_nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        total += t.numel() * t.element_size()
    return total


def read_official_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise OfficialFormatError(
            f"{path} is not a directory (expected a released CALM checkpoint directory)"
        )
    if not file.is_file():
        raise OfficialFormatError(
            f"{path} is not a released CALM checkpoint: it has no {CONFIG_FILE} "
            "(expected config.json + pytorch_model*.bin or model*.safetensors)"
        )
    try:
        cfg = json.loads(file.read_text())
    except ValueError as err:
        raise OfficialFormatError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise OfficialFormatError(f"{file} does not hold a JSON object")
    return cfg


def detect_layout(path: str | Path, config: dict[str, Any] | None = None) -> str:
    """``"calm"`` or ``"autoencoder"`` for a release directory; `OfficialFormatError` otherwise."""
    path = Path(path)
    cfg = read_official_config(path) if config is None else config
    if "format" in cfg and "kind" in cfg:
        raise OfficialFormatError(
            f"{path} is a checkpoint in this library's own format, not an official release: load it with calm.load()"
        )
    missing = [k for k in ("patch_size", "latent_size") if k not in cfg]
    if missing:
        raise OfficialFormatError(
            f"{path / CONFIG_FILE} is not a CALM release config: it lacks {', '.join(missing)} "
            "(a CALM or CALM-autoencoder config.json has patch_size and latent_size)"
        )
    if "num_hidden_layers" in cfg and ("num_mlp_layers" in cfg or "noise_size" in cfg):
        return "calm"
    if "num_encoder_layers" in cfg:
        return "autoencoder"
    raise OfficialFormatError(
        f"{path / CONFIG_FILE} has patch_size/latent_size but is neither a CALM config "
        "(num_hidden_layers + num_mlp_layers/noise_size) nor an autoencoder config (num_encoder_layers)"
    )


def _weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, files, weight_map or None) for the weights in `path`; safetensors preferred."""
    for index_name, single, fmt in ((ST_INDEX, ST_SINGLE, "safetensors"), (PT_INDEX, PT_SINGLE, "pytorch")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}, not an object")
            except (ValueError, KeyError, TypeError) as err:
                raise OfficialFormatError(
                    f"{index} is not a valid shard index (no weight_map): {err}"
                ) from err
            try:  # every shard named by the index must lie in the release directory
                shard_of = {
                    n: contained_path(path, n, f"{index} weight_map entry {k!r}") for k, n in weight_map.items()
                }
            except UnsafePathError as err:
                raise OfficialFormatError(str(err)) from err
            names = sorted(shard_of)
            missing = [n for n in names if not shard_of[n].is_file()]
            if missing:
                raise OfficialFormatError(
                    f"{path}: missing shard(s) {', '.join(missing)} listed in {index_name} "
                    f"({len(names) - len(missing)} of {len(names)} present); download the complete checkpoint"
                )
            return fmt, [shard_of[n] for n in names], weight_map
        if (path / single).is_file():
            return fmt, [path / single], None
    # Shards without an index: accept them if the set is complete.
    for ext, fmt in (("safetensors", "safetensors"), ("bin", "pytorch")):
        shards = sorted(p for p in path.glob(f"*.{ext}") if _SHARD_RE.match(p.name))
        if shards:
            total = int(_SHARD_RE.match(shards[0].name).group(3))
            stem = _SHARD_RE.match(shards[0].name).group(1)
            width = len(_SHARD_RE.match(shards[0].name).group(2))
            expected = [f"{stem}-{i:0{width}d}-of-{total:0{width}d}.{ext}" for i in range(1, total + 1)]
            missing = [n for n in expected if not (path / n).is_file()]
            if missing:
                raise OfficialFormatError(
                    f"{path}: missing shard(s) {', '.join(missing)} (and no index file)"
                )
            return fmt, [path / n for n in expected], None
    raise OfficialFormatError(
        f"{path} has a CALM {CONFIG_FILE} but no weights: expected {PT_SINGLE}, {PT_INDEX} + shards, "
        f"{ST_SINGLE} or {ST_INDEX} + shards"
    )


def _load_file(file: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors of one weights file (nothing is read until a tensor is used)."""
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # the Rust errors share no Python base class
            raise OfficialFormatError(
                f"cannot read {file} (corrupted or not a safetensors file): {err}"
            ) from err
    try:
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "zip" not in str(err).lower() and "mmap" not in str(err).lower():
            raise OfficialFormatError(f"cannot read {file}: {err}") from err
        # The legacy (pre-zip) torch format cannot be memory-mapped: read it whole.
        warnings.warn(f"{file} uses torch's legacy format; it is read into memory", stacklevel=3)
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err2:
            raise OfficialFormatError(f"cannot read {file}: {err2}") from err2
    except Exception as err:
        raise OfficialFormatError(f"cannot read {file} (corrupted or not a torch checkpoint): {err}") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise OfficialFormatError(f"{file} does not hold a flat dict of tensors (a state dict)")
    return sd


def open_official(path: str | Path) -> OfficialCheckpoint:
    """Open a release directory: detect its layout and memory-map all its tensors."""
    path = Path(path)
    config = read_official_config(path)
    kind = detect_layout(path, config)
    fmt, files, weight_map = _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    file_of: dict[str, str] = {}
    for file in files:
        for k, v in _load_file(file, fmt).items():
            tensors[k] = v
            file_of[k] = file.name
    if weight_map is not None:
        absent = sorted(k for k, f in weight_map.items() if k not in tensors)
        if absent:
            raise OfficialFormatError(
                f"{path}: the shard index lists tensors that no shard holds: {_short_list(absent)} "
                f"(e.g. {absent[0]} should be in {weight_map[absent[0]]}); the shards are incomplete or stale"
            )
    return OfficialCheckpoint(path, kind, config, tensors, files, file_of, fmt)


def _short_list(names: list[str], n: int = 12) -> str:
    head = ", ".join(names[:n])
    return head + (f", ... ({len(names)} in all)" if len(names) > n else "")
