"""Load and convert the checkpoints the CALM authors released (Hugging Face layout).

The authors publish an autoencoder (``cccczshao/CALM-Autoencoder``) and CALM models
(``cccczshao/CALM-M``, ``-L``, ``-XL``) as Hugging Face directories: a ``config.json`` with
``patch_size`` and ``latent_size``, and the weights as ``pytorch_model.bin``, sharded
``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``, or
``model.safetensors`` (optionally sharded with ``model.safetensors.index.json``).

This module maps them onto our modules with *explicit* key maps (`autoencoder_key_map`,
`calm_key_map`: every official name and the name it gets here), checks that the config and the
tensors agree, and builds the model without ever holding two copies of the weights:

* tensors are memory-mapped (``torch.load(..., mmap=True, weights_only=True)`` and safetensors'
  ``safe_open``), so nothing is read until it is used;
* the model is built with its *parameters* on the ``meta`` device (no allocation, no random
  init) and the mapped tensors are then assigned into it (``load_state_dict(assign=True)``).

So a loaded model's weights are (copy-on-write) views of the files, and converting a checkpoint
(`convert_official`) touches each byte once on the way to the new ``model.safetensors``: peak
memory stays near one copy of the weights (``benchmarks/bench_convert.py`` measures it).

Things about the release worth knowing (all handled here):

* The autoencoder's output matrix ``decoder.lm_head_weight`` *is* the input embedding (tied).
  safetensors files drop it; it is restored from ``encoder.embed_tokens.weight``. When present it
  must equal the embedding: our autoencoder ties the two, so an *untied* head cannot be
  represented and is refused (`OfficialFormatError`) rather than silently replaced.
* The CALM head is stored twice, as ``generative_head.`` and ``mlp_generator.`` (one module under
  two names). One copy is taken; when both are present they must be identical.
* A CALM checkpoint saved by the authors' training code also holds the whole frozen autoencoder
  under ``ae_model.``; it is used when no separate autoencoder directory is given. Its config is
  not stored, so its sizes are read off the tensor shapes (its training-only settings — KL clamp
  and weight, dropout — get the paper's values).
* ``ae_path`` in the CALM config is an absolute path on the authors' machine and is ignored,
  except that its last component is looked for beside the CALM directory (e.g. a sibling
  ``CALM-Autoencoder`` download).
* The released autoencoder was trained with token id 0 as its token-drop "mask" (an ordinary
  token in Llama-3). The converted autoencoder keeps ``mask_id = 0`` so its embedding table keeps
  its 128,257 rows and its behaviour is the one it was trained with. The mask only matters for
  *training* (fine-tuning) the autoencoder; encoding, decoding, evaluation and generation never
  use it. The tokenizer attached to a converted model uses the same ids (end of text
  ``<|end_of_text|>`` = 128001, ``[PAD]`` = 128256, mask 0) so model and tokenizer agree.

Command line: ``calm convert-official --calm DIR --ae DIR [--tokenizer DIR] --out DIR [--json]``
(``--ae`` alone converts just an autoencoder).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.config import LLAMA3_VOCAB, AutoencoderConfig, CALMConfig
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
                    n: contained_path(path, n, f"{index} weight_map entry {k!r}")
                    for k, n in weight_map.items()
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


# =============================================================================================
# Explicit key maps (official name -> our name)


def autoencoder_key_map(num_layers: int, *, prefix: str = "", ours: str = "") -> dict[str, str]:
    """Every tensor of the authors' `Autoencoder` and where it goes in `ChunkAutoencoder`.

    Official layer i < num_layers/2 of each stack runs before the squeeze/expand (our ``*_pre``),
    the others after (``*_post``). ``decoder.lm_head_weight`` is the tied output matrix.
    """
    half = num_layers // 2
    m = {
        "encoder.embed_tokens.weight": "embed.weight",
        "encoder.squeeze_layer.weight": "squeeze.weight",
        "encoder.squeeze_layer.bias": "squeeze.bias",
        "encoder.norm.weight": "encoder_norm.weight",
        "encoder.hidden_to_latent.weight": "to_latent.weight",  # rows [:l] = μ, [l:] = log σ (same in ours)
        "encoder.hidden_to_latent.bias": "to_latent.bias",
        "decoder.latent_to_hidden.weight": "from_latent.weight",
        "decoder.latent_to_hidden.bias": "from_latent.bias",
        "decoder.expand_layer.weight": "expand.weight",
        "decoder.expand_layer.bias": "expand.bias",
        "decoder.norm.weight": "decoder_norm.weight",
        "decoder.lm_head_weight": "lm_head.weight",
    }
    for side, stack in (("encoder", "encoder_layers"), ("decoder", "decoder_layers")):
        for i in range(num_layers):
            ours_block = f"{side}_pre.{i}" if i < half else f"{side}_post.{i - half}"
            m[f"{side}.{stack}.{i}.layernorm.weight"] = f"{ours_block}.norm.weight"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                m[f"{side}.{stack}.{i}.mlp.{proj}.weight"] = f"{ours_block}.mlp.{proj}.weight"
    return {prefix + k: ours + v for k, v in m.items()}


def calm_key_map(
    num_layers: int, num_head_layers: int, *, head_prefix: str = "generative_head."
) -> dict[str, str]:
    """Every tensor of the authors' `EnergyTransformer` (minus its autoencoder) and its name in `CALM`."""
    m = {
        "transformer.embed_tokens.weight": "embed.weight",
        "transformer.norm.weight": "backbone.norm.weight",
    }
    for i in (0, 2, 3):  # Linear(K·d→2d), SiLU, Linear(2d→d), LayerNorm
        for p in ("weight", "bias"):
            m[f"embed_proj.{i}.{p}"] = f"compress.{i}.{p}"
    for i in range(num_layers):
        src, dst = f"transformer.layers.{i}", f"backbone.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"{src}.self_attn.{proj}.weight"] = f"{dst}.attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m[f"{src}.mlp.{proj}.weight"] = f"{dst}.mlp.{proj}.weight"
        m[f"{src}.input_layernorm.weight"] = f"{dst}.attn_norm.weight"
        m[f"{src}.post_attention_layernorm.weight"] = f"{dst}.mlp_norm.weight"
    head = {}
    for name in ("noise_embd", "hidden_embd", "norm_hidden", "norm_noise"):
        head[name] = name
    for j in range(num_head_layers):
        head[f"mlp_blocks.{j}.in_ln"] = f"blocks.{j}.in_ln"
        for k in (0, 2, 4):
            head[f"mlp_blocks.{j}.linears.{k}"] = f"blocks.{j}.linears.{k}"
        head[f"mlp_blocks.{j}.down_proj"] = f"blocks.{j}.down_proj"
    head["final_layer.in_ln"] = "final_layer.in_ln"
    for k in (0, 2):
        head[f"final_layer.linears.{k}"] = f"final_layer.linears.{k}"
    for src, dst in head.items():
        for p in ("weight", "bias"):
            m[f"{head_prefix}{src}.{p}"] = f"head.{dst}.{p}"
    return m


def _layer_count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


# =============================================================================================
# Configs


def _int_or_none(v) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _disagree(path: Path, field_name: str, value, key: str, shape, what: str) -> OfficialFormatError:
    return OfficialFormatError(
        f"{path}: config.json and the weights disagree: config says {field_name}={value}, but {key} has shape "
        f"{tuple(shape)} ({what})"
    )


def _check_llama_features(path: Path, cfg: dict[str, Any]) -> None:
    """Refuse Llama options our backbone does not implement (instead of computing something else)."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise OfficialFormatError(f"{path}: hidden_act={act!r} is not supported (only silu)")
    if cfg.get("rope_scaling"):
        raise OfficialFormatError(f"{path}: rope_scaling={cfg['rope_scaling']!r} is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise OfficialFormatError(
                f"{path}: {flag}=true is not supported (the CALM backbone has no biases)"
            )


_ID_KEYS = ("eos_token_id", "pad_token_id")


def _ae_special_ids(raw: dict[str, Any], vocab_size: int, tokenizer, notes: list[str]) -> dict[str, int]:
    """pad/eot/mask ids for the converted autoencoder (see the module docstring on the mask).

    From the tokenizer when there is one, else from ``eos_token_id`` / ``pad_token_id`` of
    `raw` (for a CALM release: its own config's, filled in from the autoencoder's), else
    Llama-3's ids for its vocabulary size, else the last two ids (with a note)."""
    if tokenizer is not None:
        eot, pad = tokenizer.eot_id, tokenizer.pad_id
    else:
        eot, pad = _int_or_none(raw.get("eos_token_id")), _int_or_none(raw.get("pad_token_id"))
        if vocab_size == LLAMA3_VOCAB:
            eot = LLAMA3_EOT_ID if eot is None else eot
            pad = LLAMA3_PAD_ID if pad is None else pad
        if eot is None or not 0 <= eot < vocab_size:
            eot = vocab_size - 2
            notes.append(f"no end-of-text id in the config or a tokenizer: eot_id set to {eot}")
        if pad is None or not 0 <= pad < vocab_size:
            pad = vocab_size - 1
            notes.append(f"no pad id in the config or a tokenizer: pad_id set to {pad}")
    return {"eot_id": eot, "pad_id": pad, "mask_id": OFFICIAL_MASK_ID}


def autoencoder_config_from_official(
    raw: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    path: Path,
    tokenizer=None,
    notes: list[str] | None = None,
    prefix: str = "",
    special_ids: dict[str, Any] | None = None,
) -> AutoencoderConfig:
    """Our `AutoencoderConfig` for the authors' autoencoder config `raw` (checked against `tensors`).

    `raw` may be empty (the ``ae_model.`` copy inside a CALM checkpoint has no config): the sizes
    are then read off the tensor shapes. `special_ids` (``eos_token_id`` / ``pad_token_id``, e.g.
    from the CALM config) take precedence over `raw`'s.
    """
    notes = [] if notes is None else notes
    emb_key = prefix + "encoder.embed_tokens.weight"
    needed = [emb_key, prefix + "encoder.squeeze_layer.weight", prefix + "encoder.hidden_to_latent.weight"]
    gate_key = prefix + "encoder.encoder_layers.0.mlp.gate_proj.weight"
    needed.append(gate_key)
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise OfficialFormatError(f"{path}: autoencoder tensor(s) missing: {', '.join(absent)}")
    emb, squeeze = tensors[emb_key], tensors[prefix + "encoder.squeeze_layer.weight"]
    to_lat, gate = tensors[prefix + "encoder.hidden_to_latent.weight"], tensors[gate_key]
    n_enc = _layer_count(tensors, re.escape(prefix) + r"encoder\.encoder_layers\.(\d+)\.")
    n_dec = _layer_count(tensors, re.escape(prefix) + r"decoder\.decoder_layers\.(\d+)\.")
    shape_facts = {
        "vocab_size": emb.shape[0],
        "hidden_size": emb.shape[1],
        "intermediate_size": gate.shape[0],
        "latent_size": to_lat.shape[0] // 2,
        "patch_size": squeeze.shape[1] // max(emb.shape[1], 1),
        "num_encoder_layers": n_enc,
        "num_decoder_layers": n_dec,
    }
    cfg = {**shape_facts, **{k: v for k, v in raw.items() if k in shape_facts}}
    # config vs weights
    checks = [
        ("vocab_size", emb_key, emb.shape, emb.shape[0], "rows = vocab_size"),
        ("hidden_size", emb_key, emb.shape, emb.shape[1], "columns = hidden_size"),
        ("intermediate_size", gate_key, gate.shape, gate.shape[0], "rows = intermediate_size"),
        ("latent_size", prefix + "encoder.hidden_to_latent.weight", to_lat.shape, to_lat.shape[0] / 2,
         "rows = 2 × latent_size"),
        ("patch_size", prefix + "encoder.squeeze_layer.weight", squeeze.shape,
         squeeze.shape[1] / max(emb.shape[1], 1), "columns = patch_size × hidden_size"),
    ]  # fmt: skip
    for name, key, shape, found, what in checks:
        if cfg[name] != found:
            raise _disagree(path, name, cfg[name], key, shape, what)
    for name, count, stack in (
        ("num_encoder_layers", n_enc, "encoder"),
        ("num_decoder_layers", n_dec, "decoder"),
    ):
        if cfg[name] != count:
            raise OfficialFormatError(
                f"{path}: config.json and the weights disagree: config says {name}={cfg[name]}, but the "
                f"checkpoint has {count} {stack} layer(s) ({prefix}{stack}.{stack}_layers.*)"
            )
    if cfg["num_encoder_layers"] != cfg["num_decoder_layers"]:
        raise OfficialFormatError(
            f"{path}: num_encoder_layers={cfg['num_encoder_layers']} != num_decoder_layers="
            f"{cfg['num_decoder_layers']}; our autoencoder has one layer count for both stacks"
        )
    layers = cfg["num_encoder_layers"]
    if layers < 2 or layers % 2:
        raise OfficialFormatError(
            f"{path}: num_encoder_layers={layers} is not supported: the reference code runs half the layers "
            "before the squeeze and half after, so the count must be even and >= 2"
        )
    if not raw:
        notes.append(
            "autoencoder config read off the tensor shapes (the ae_model. copy has none); "
            "kl_weight/kl_clamp/dropout set to the paper's values (training-only)"
        )
    dropout = float(raw.get("ae_dropout", _AE_TRAINING_DEFAULTS["ae_dropout"]))
    ids_from = {k: raw[k] for k in _ID_KEYS if raw.get(k) is not None}
    ids_from.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    ids = _ae_special_ids(ids_from, cfg["vocab_size"], tokenizer, notes)
    return AutoencoderConfig(
        vocab_size=cfg["vocab_size"],
        chunk_size=cfg["patch_size"],
        latent_dim=cfg["latent_size"],
        d_model=cfg["hidden_size"],
        ffn_dim=cfg["intermediate_size"],
        num_layers=layers,
        kl_weight=float(raw.get("kl_weight", _AE_TRAINING_DEFAULTS["kl_weight"])),
        kl_clamp=float(raw.get("kl_clamp", _AE_TRAINING_DEFAULTS["kl_clamp"])),
        token_mask_prob=dropout,
        latent_dropout=dropout,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        **ids,
    )


def calm_config_from_official(
    raw: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    ae: AutoencoderConfig,
    *,
    path: Path,
    head_prefix: str,
) -> CALMConfig:
    """Our `CALMConfig` for the authors' CALM config `raw` (checked against `tensors` and the AE)."""
    _check_llama_features(path, raw)
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    absent = [k for k in required if k not in raw]
    if absent:
        raise OfficialFormatError(f"{path / CONFIG_FILE} lacks {', '.join(absent)}")
    d, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        raise OfficialFormatError(
            f"{path}: head_dim={head_dim} × num_attention_heads={heads} != hidden_size={d} is not supported"
        )
    K, latent = int(raw["patch_size"]), int(raw["latent_size"])
    n_layers = int(raw["num_hidden_layers"])
    n_head = _layer_count(tensors, re.escape(head_prefix) + r"mlp_blocks\.(\d+)\.")
    n_head_cfg = int(raw.get("num_mlp_layers", n_head))

    def tensor(key):
        if key not in tensors:
            raise OfficialFormatError(f"{path}: missing tensor {key}")
        return tensors[key]

    emb = tensor("transformer.embed_tokens.weight")
    gate = tensor("transformer.layers.0.mlp.gate_proj.weight") if n_layers else None
    q = tensor("transformer.layers.0.self_attn.q_proj.weight") if n_layers else None
    k = tensor("transformer.layers.0.self_attn.k_proj.weight") if n_layers else None
    proj0 = tensor("embed_proj.0.weight")
    noise = tensor(head_prefix + "noise_embd.weight")
    final = tensor(head_prefix + "final_layer.linears.2.weight")
    checks = [
        ("vocab_size", int(raw["vocab_size"]), "transformer.embed_tokens.weight", emb.shape, emb.shape[0],
         "rows = vocab_size"),
        ("hidden_size", d, "transformer.embed_tokens.weight", emb.shape, emb.shape[1], "columns = hidden_size"),
        ("patch_size", K, "embed_proj.0.weight", proj0.shape, proj0.shape[1] / max(d, 1),
         "columns = patch_size × hidden_size"),
        ("latent_size", latent, head_prefix + "final_layer.linears.2.weight", final.shape, final.shape[0],
         "rows = latent_size"),
    ]  # fmt: skip
    if "noise_size" in raw:
        checks.append(
            ("noise_size", int(raw["noise_size"]), head_prefix + "noise_embd.weight", noise.shape, noise.shape[1],
             "columns = noise_size")
        )  # fmt: skip
    if gate is not None:
        checks += [
            ("intermediate_size", int(raw["intermediate_size"]), "transformer.layers.0.mlp.gate_proj.weight",
             gate.shape, gate.shape[0], "rows = intermediate_size"),
            ("num_attention_heads", heads, "transformer.layers.0.self_attn.q_proj.weight", q.shape,
             q.shape[0] * heads / max(d, 1), "rows = hidden_size (num_attention_heads × head_dim)"),
            ("num_key_value_heads", kv, "transformer.layers.0.self_attn.k_proj.weight", k.shape,
             k.shape[0] * heads / max(d, 1), "rows = num_key_value_heads × hidden_size / num_attention_heads"),
        ]  # fmt: skip
    for name, value, key, shape, found, what in checks:
        if value != found:
            raise _disagree(path, name, value, key, shape, what)
    found_layers = _layer_count(tensors, r"transformer\.layers\.(\d+)\.")
    if found_layers != n_layers:
        raise OfficialFormatError(
            f"{path}: config.json and the weights disagree: config says num_hidden_layers={n_layers}, but the "
            f"checkpoint has {found_layers} Transformer layer(s) (transformer.layers.*)"
        )
    if n_head != n_head_cfg:
        raise OfficialFormatError(
            f"{path}: config.json and the weights disagree: config says num_mlp_layers={n_head_cfg}, but the "
            f"checkpoint has {n_head} head block(s) ({head_prefix}mlp_blocks.*)"
        )
    for name, ours in (
        ("vocab_size", ae.vocab_size),
        ("patch_size", ae.chunk_size),
        ("latent_size", ae.latent_dim),
    ):
        value = {"vocab_size": emb.shape[0], "patch_size": K, "latent_size": latent}[name]
        if value != ours:
            raise OfficialFormatError(
                f"{path}: the CALM model has {name}={value} but its autoencoder has {ours}: they do not belong together"
            )
    return CALMConfig(
        d_model=d,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv if kv != heads else 0,
        ffn_dim=int(raw["intermediate_size"]),
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),  # already counted in chunks
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        vocab_size=int(emb.shape[0]),
        chunk_size=K,
        latent_dim=latent,
        head_layers=n_head,
        noise_dim=int(noise.shape[1]),
        num_model_samples=int(raw.get("num_samples", 8)),
        energy_alpha=float(raw.get("beta", 1.0)),
        autoencoder=ae.to_dict(),
    )


# =============================================================================================
# Building our model on top of memory-mapped tensors


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every module parameter on the ``meta`` device (no memory, no init); buffers stay real.

    Buffers computed from the config (rotary cos/sin) are thus built normally, while the
    parameters, which are about to be replaced by the checkpoint's tensors, cost nothing.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    # Initialisers are pointless on meta tensors, and the first one costs seconds (it imports
    # torch's reference decompositions): skip them there.
    def skip_on_meta(fn):
        def init(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                return tensor
            return fn(tensor, *args, **kwargs)

        return init

    inits = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS if hasattr(nn.init, n)}
    nn.Module.register_parameter = register
    for n, fn in inits.items():
        setattr(nn.init, n, skip_on_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for n, fn in inits.items():
            setattr(nn.init, n, fn)


_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


def _tie_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _target_dtype(tensors: dict[str, torch.Tensor], dtype, notes: list[str]) -> torch.dtype | None:
    if dtype is not None:
        return dtype
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if len(counts) <= 1:
        return next(iter(counts), None)
    chosen = max(counts, key=counts.get)
    notes.append(
        f"mixed weight dtypes {sorted(str(d).replace('torch.', '') for d in counts)}: all cast to "
        f"{str(chosen).replace('torch.', '')}"
    )
    return chosen


def build_from_tensors(
    model_factory: Callable[[], nn.Module],
    state: dict[str, torch.Tensor],
    *,
    origin: dict[str, str],
    path: Path,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a model with `model_factory` (parameters on meta) and assign `state` (our names) into it.

    `origin` maps each of our names to the official name it came from, for error messages.
    Tied parameters stay tied; shapes are checked against the model built from the config.
    """
    with _parameters_on_meta():
        model = model_factory()
    expected = model.state_dict(keep_vars=True)
    groups = _tie_groups(model)
    state = dict(state)
    # tied names: one provided tensor serves the whole group
    for group in groups:
        provided = [n for n in group if n in state]
        if provided:
            for n in group:
                state.setdefault(n, state[provided[0]])
    unknown = sorted(set(state) - set(expected))
    if unknown:  # our key map names something the model does not have: a bug here, not in the file
        raise RuntimeError(f"calm.official key map out of date with the model: no parameter(s) {unknown}")
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in param_names if n not in state)
    if missing:
        named = [f"{origin[n]} (-> {n})" if n in origin else n for n in missing]
        raise OfficialFormatError(f"{path}: missing tensor(s): {_short_list(named)}")
    bad = []
    for name, t in state.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            bad.append(
                f"{origin.get(name, name)} (-> {name}): expected {want} from the config, found {tuple(t.shape)}"
            )
    if bad:
        raise OfficialFormatError(f"{path}: shape mismatch: " + "; ".join(bad[:12]))
    if dtype is not None:
        state = {
            k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in state.items()
        }
    model.load_state_dict(state, strict=False, assign=True)
    for group in groups:  # assign wraps each name in its own Parameter: make the group one again
        shared = model.get_parameter(group[0])
        for n in group[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, shared)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise OfficialFormatError(f"{path}: no weights for: {_short_list(left)}")
    if dtype is not None:
        model.to(dtype=dtype)  # buffers (rotary tables) too, as calm.load does; parameters are not copied
    return model


# -- autoencoder -------------------------------------------------------------------------------


def _map_autoencoder(
    tensors: dict[str, torch.Tensor],
    config: AutoencoderConfig,
    *,
    path: Path,
    prefix: str,
    ours: str,
    notes: list[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """(our state, our name -> official name, official names used) for an autoencoder."""
    key_map = autoencoder_key_map(config.num_layers, prefix=prefix, ours=ours)
    emb_key, head_key = prefix + "encoder.embed_tokens.weight", prefix + "decoder.lm_head_weight"
    if head_key in tensors:
        emb, head = tensors[emb_key], tensors[head_key]
        if tuple(head.shape) != tuple(emb.shape):
            raise OfficialFormatError(
                f"{path}: shape mismatch: {head_key} has shape {tuple(head.shape)} but {emb_key} has "
                f"{tuple(emb.shape)}; the output matrix must be the (tied) input embedding"
            )
        same = head.data_ptr() == emb.data_ptr() and head.stride() == emb.stride()
        if not same and not torch.equal(head, emb):
            raise OfficialFormatError(
                f"{path}: {head_key} differs from {emb_key}. The authors' autoencoder ties its output matrix "
                "to the input embedding and so does ours: an untied output matrix cannot be represented, "
                "and converting would silently change the model"
            )
    else:
        notes.append(f"{head_key} absent (safetensors drops tied tensors): tie restored from {emb_key}")
    state, origin = {}, {}
    for src, dst in key_map.items():
        origin[dst] = src
        if src != head_key and src in tensors:  # lm_head.weight is embed.weight (the tie)
            state[dst] = tensors[src]
    return state, origin, set(key_map)


def _unexpected(keys, used: set[str], path: Path, *, ignore_prefixes: tuple[str, ...] = ()) -> None:
    extra = sorted(
        k
        for k in keys
        if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(ignore_prefixes)
    )
    if extra:
        raise OfficialFormatError(
            f"{path}: unexpected tensor(s) the key map does not know: {_short_list(extra)}"
        )


def _load_autoencoder(ck: OfficialCheckpoint, tokenizer, dtype, notes: list[str]) -> nn.Module:
    from calm.models.autoencoder import ChunkAutoencoder

    cfg = autoencoder_config_from_official(
        ck.config, ck.tensors, path=ck.path, tokenizer=tokenizer, notes=notes
    )
    state, origin, used = _map_autoencoder(ck.tensors, cfg, path=ck.path, prefix="", ours="", notes=notes)
    _unexpected(ck.tensors, used, ck.path)
    dtype = _target_dtype(state, dtype, notes)
    return build_from_tensors(lambda: ChunkAutoencoder(cfg), state, origin=origin, path=ck.path, dtype=dtype)


# -- CALM ------------------------------------------------------------------------------------


def _head_prefix(ck: OfficialCheckpoint, notes: list[str]) -> str:
    """The head copy to read; both copies, when present, must be identical."""
    present = [p for p in HEAD_PREFIXES if any(k.startswith(p) for k in ck.tensors)]
    if not present:
        raise OfficialFormatError(
            f"{ck.path}: no generative head: expected tensors under {' or '.join(HEAD_PREFIXES)}"
        )
    if len(present) == 2:
        a, b = HEAD_PREFIXES
        keys_a = {k[len(a) :] for k in ck.tensors if k.startswith(a)}
        keys_b = {k[len(b) :] for k in ck.tensors if k.startswith(b)}
        if keys_a != keys_b:
            diff = sorted(keys_a ^ keys_b)
            raise OfficialFormatError(
                f"{ck.path}: the two head copies {a} and {b} hold different tensors ({_short_list(diff)})"
            )
        for k in sorted(keys_a):
            ta, tb = ck.tensors[a + k], ck.tensors[b + k]
            if ta.shape != tb.shape:
                raise OfficialFormatError(
                    f"{ck.path}: shape mismatch between head copies: {a}{k} {tuple(ta.shape)} vs {b}{k} {tuple(tb.shape)}"
                )
            shared = ta.data_ptr() == tb.data_ptr() and ta.stride() == tb.stride()
            if not shared and not torch.equal(ta, tb):
                raise OfficialFormatError(
                    f"{ck.path}: {a}{k} and {b}{k} differ; in the authors' model they are one module, "
                    "so the checkpoint is inconsistent"
                )
        notes.append(f"head stored twice ({a}, {b}): identical, one copy kept")
    return present[0]


def _find_sibling_autoencoder(ck: OfficialCheckpoint) -> Path | None:
    """An autoencoder directory beside the release: the last part of the config's ``ae_path``,
    then ``CALM-Autoencoder``. Only a plain directory name is taken (never ``..``)."""
    names = []
    ae_path = ck.config.get("ae_path")
    if isinstance(ae_path, str) and ae_path.strip("/"):
        name = Path(ae_path.rstrip("/")).name
        if name in ("", ".", ".."):
            raise OfficialFormatError(
                f"{ck.path / CONFIG_FILE}: ae_path {ae_path!r} does not end in a directory name (its last "
                f"part is {name!r}), so it names no sibling of {ck.path}; pass the autoencoder directory "
                "with --ae AE_DIR (ae_path=AE_DIR)"
            )
        names.append(name)
    names.append("CALM-Autoencoder")
    for name in names:
        cand = ck.path.parent / name
        if cand.resolve() == ck.path.resolve() or not (cand / CONFIG_FILE).is_file():
            continue
        try:
            if detect_layout(cand) == "autoencoder":
                return cand
        except OfficialFormatError:
            continue
    from calm.hub import cached_sibling  # a release in the Hub cache: OWNER/<name> cached beside it

    for name in names:
        cand = cached_sibling(ck.path, name)
        try:
            if cand is not None and detect_layout(cand) == "autoencoder":
                return cand
        except OfficialFormatError:
            continue
    return None


def _load_calm(
    ck: OfficialCheckpoint, ae_path: Path | None, tokenizer, dtype, notes: list[str]
) -> tuple[nn.Module, OfficialCheckpoint | None]:
    from calm.models.calm import CALM

    has_copy = any(k.startswith(AE_PREFIX) for k in ck.tensors)
    if ae_path is None and not has_copy:
        ae_path = _find_sibling_autoencoder(ck)
        if ae_path is not None:
            notes.append(f"autoencoder found beside the checkpoint: {ae_path}")
    ae_ck = None
    if ae_path is not None:
        ae_ck = open_official(ae_path)
        if ae_ck.kind != "autoencoder":
            raise OfficialFormatError(
                f"{ae_path} is a CALM checkpoint, not an autoencoder (given as the autoencoder)"
            )
        ae_tensors, ae_raw, prefix, where = ae_ck.tensors, ae_ck.config, "", ae_ck.path
        if has_copy:
            notes.append(
                f"the checkpoint's own {AE_PREFIX} copy is ignored: using the autoencoder in {ae_path}"
            )
    elif has_copy:
        ae_tensors, ae_raw, prefix, where = ck.tensors, {}, AE_PREFIX, ck.path
        notes.append(f"autoencoder taken from the checkpoint's {AE_PREFIX} copy")
    else:
        raise OfficialFormatError(
            f"{ck.path} is a CALM checkpoint without its autoencoder (no {AE_PREFIX} tensors, and "
            f"ae_path={ck.config.get('ae_path')!r} in its config points to the authors' machine). Pass the "
            "autoencoder directory: `--ae AE_DIR` to calm generate / calm eval, "
            "`calm convert-official --calm DIR --ae AE_DIR --out OUT`, or "
            "calm.official.load_official(DIR, ae_path=AE_DIR)"
        )
    # The special ids the model generates with come from the release's configs whichever way
    # the autoencoder is found: the CALM config's, else the autoencoder config's.
    calm_ids = {k: ck.config[k] for k in _ID_KEYS if _int_or_none(ck.config.get(k)) is not None}
    differ = [
        f"{k} {ck.config[k]} (CALM config) vs {ae_raw[k]} (autoencoder config)"
        for k in calm_ids
        if _int_or_none(ae_raw.get(k)) is not None and _int_or_none(ae_raw[k]) != _int_or_none(calm_ids[k])
    ]
    if differ and tokenizer is None:
        notes.append("the configs disagree on " + "; ".join(differ) + ": the CALM config's ids are used")
    ae_cfg = autoencoder_config_from_official(
        ae_raw, ae_tensors, path=where, tokenizer=tokenizer, notes=notes, prefix=prefix, special_ids=calm_ids
    )
    head_prefix = _head_prefix(ck, notes)
    cfg = calm_config_from_official(ck.config, ck.tensors, ae_cfg, path=ck.path, head_prefix=head_prefix)
    key_map = calm_key_map(cfg.num_layers, cfg.num_head_layers, head_prefix=head_prefix)
    state, origin = {}, {}
    for src, dst in key_map.items():
        origin[dst] = src
        if src in ck.tensors:
            state[dst] = ck.tensors[src]
    ae_state, ae_origin, ae_used = _map_autoencoder(
        ae_tensors, ae_cfg, path=where, prefix=prefix, ours="autoencoder.", notes=notes
    )
    state.update(ae_state)
    origin.update(ae_origin)
    other_head = tuple(p for p in HEAD_PREFIXES if p != head_prefix)
    ignore = other_head + ((AE_PREFIX,) if prefix == "" else ())
    _unexpected(ck.tensors, set(key_map) | (ae_used if prefix else set()), ck.path, ignore_prefixes=ignore)
    if ae_ck is not None:
        _unexpected(ae_ck.tensors, ae_used, ae_ck.path)
    dtype = _target_dtype(state, dtype, notes)
    model = build_from_tensors(lambda: CALM(cfg), state, origin=origin, path=ck.path, dtype=dtype)
    return model, ae_ck


# -- tokenizer -------------------------------------------------------------------------------


def load_official_tokenizer(path: str | Path, *, vocab_size: int | None = None):
    """The Llama-3 ``tokenizer.json`` of a release as our `Tokenizer`, with the ids the model uses.

    End of text is ``<|end_of_text|>``; pad is the authors' ``[PAD]`` (added, at the next id, when
    the file is Meta's original without it); the mask id is 0, the value the released autoencoder
    was trained with (see the module docstring), so nothing is added beyond ``[PAD]`` and the
    vocabulary matches the model's embedding table. Tokenizers without ``<|end_of_text|>`` fall back
    to `Tokenizer.from_file` (which adds its own pad and mask tokens).
    """
    from tokenizers import Tokenizer as HFTokenizer

    from calm.tokenizer import Tokenizer, TokenizerError

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise OfficialFormatError(f"no {TOKENIZER_FILE} at {path}")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as err:
        raise OfficialFormatError(f"{file}: not a valid tokenizer.json ({err})") from err
    eot = hf.token_to_id(LLAMA3_EOT)
    if eot is None:
        tok = Tokenizer.from_file(file)
    else:
        added = []
        pad = hf.token_to_id(LLAMA3_PAD)
        if pad is None:
            hf.add_special_tokens([LLAMA3_PAD])
            pad = hf.token_to_id(LLAMA3_PAD)
            added.append(LLAMA3_PAD)
        try:
            tok = Tokenizer(
                hf, eot_id=eot, pad_id=pad, mask_id=OFFICIAL_MASK_ID, added_tokens=added, source=str(file)
            )
        except TokenizerError as err:
            raise OfficialFormatError(f"{file}: {err}") from err
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise OfficialFormatError(
            f"{file} has {tok.vocab_size} entries but the model's vocabulary has {vocab_size}: "
            "this tokenizer does not belong to the checkpoint"
        )
    return tok


def _find_tokenizer(*dirs: Path | None) -> Path | None:
    for d in dirs:
        if d is not None and (Path(d) / TOKENIZER_FILE).is_file():
            return Path(d) / TOKENIZER_FILE
    return None


# =============================================================================================
# Public entry points


@dataclass
class LoadReport:
    """What `load_official` did: sources, sizes, notes (printed by the converter)."""

    kind: str
    source: str
    autoencoder_source: str | None
    tokenizer_source: str | None
    files: list[str]
    format: str
    source_bytes: int
    num_tensors: int
    params: int
    dtype: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _load(path, ae_path, tokenizer_path, dtype) -> tuple[nn.Module, LoadReport]:
    path = Path(path)
    ae_path = Path(ae_path) if ae_path is not None else None
    ck = open_official(path)
    notes: list[str] = list(ck.notes)
    if ck.kind == "autoencoder" and ae_path is not None and ae_path.resolve() != path.resolve():
        raise OfficialFormatError(
            f"{path} is itself an autoencoder checkpoint; ae_path is only for CALM models"
        )
    tok_file = Path(tokenizer_path) if tokenizer_path is not None else _find_tokenizer(path, ae_path)
    if tok_file is not None and tok_file.is_dir():
        tok_file = tok_file / TOKENIZER_FILE
    tokenizer = load_official_tokenizer(tok_file) if tok_file is not None else None
    if tokenizer is None:
        notes.append(
            f"no {TOKENIZER_FILE} found: the model has no tokenizer (pass the Llama-3 tokenizer directory)"
        )
    ae_ck = None
    if ck.kind == "autoencoder":
        model = _load_autoencoder(ck, tokenizer, dtype, notes)
        vocab = model.config.vocab_size
    else:
        model, ae_ck = _load_calm(ck, ae_path, tokenizer, dtype, notes)
        vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise OfficialFormatError(
            f"{tok_file} has {tokenizer.vocab_size} entries but the model's vocabulary has {vocab}: "
            "this tokenizer does not belong to the checkpoint"
        )
    model.tokenizer = tokenizer
    first = next(iter(model.parameters()))
    sources = [ck] + ([ae_ck] if ae_ck is not None else [])
    report = LoadReport(
        kind=ck.kind,
        source=str(ck.path),
        autoencoder_source=str(ae_ck.path) if ae_ck is not None else None,
        tokenizer_source=str(tok_file) if tok_file is not None else None,
        files=[str(f) for c in sources for f in c.files],
        format=ck.format,
        source_bytes=sum(c.nbytes for c in sources),
        num_tensors=len(model.state_dict()),
        params=sum(p.numel() for p in model.parameters()),
        dtype=str(first.dtype).replace("torch.", ""),
        notes=notes,
    )
    return model, report


def load_official(
    path: str | Path,
    *,
    ae_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device=None,
    dtype=None,
) -> nn.Module:
    """Our model (a `CALM` with its autoencoder inside, or a `ChunkAutoencoder`) for a release directory.

    ``ae_path``: the autoencoder directory for a CALM checkpoint; by default the checkpoint's own
    ``ae_model.`` copy, or an autoencoder directory beside it named like the config's ``ae_path``
    (or ``CALM-Autoencoder``). ``tokenizer_path``: a ``tokenizer.json`` or its directory; by default
    the one in ``path`` (or in ``ae_path``). The tokenizer is attached as ``model.tokenizer``.
    The weights stay memory-mapped (copy-on-write) unless ``device``/``dtype`` move them.
    """
    model, report = _load(path, ae_path, tokenizer_path, dtype)
    if device is not None:
        model.to(device)
    model.official_load_report = report
    return model.eval()


def convert_official(
    calm_dir: str | Path | None,
    ae_dir: str | Path | None,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Convert a release (CALM + autoencoder, or an autoencoder alone) to a checkpoint of ours.

    Writes ``out_dir`` with `calm.checkpoint.save_checkpoint` (config.json, de-duplicated
    model.safetensors with the autoencoder tie restored, tokenizer files) and returns a summary.
    """
    from calm.checkpoint import save_checkpoint

    log = log or (lambda _msg: None)
    if calm_dir is None and ae_dir is None:
        raise OfficialFormatError(
            "nothing to convert: give a CALM directory, an autoencoder directory, or both"
        )
    source = Path(calm_dir if calm_dir is not None else ae_dir)
    out = Path(out_dir)
    for src in (calm_dir, ae_dir):
        if src is not None and out.resolve() == Path(src).resolve():
            raise OfficialFormatError(f"--out {out} is the source directory; choose a new directory")
    t0 = time.perf_counter()
    log(f"reading {source}" + (f" (autoencoder: {ae_dir})" if calm_dir is not None and ae_dir else ""))
    model, report = _load(source, ae_dir if calm_dir is not None else None, tokenizer_dir, dtype)
    t_load = time.perf_counter() - t0
    log(
        f"mapped {report.num_tensors} tensors, {report.params / 1e6:.1f}M parameters ({report.dtype}) "
        f"from {len(report.files)} file(s), {report.source_bytes / 1e9:.2f} GB"
    )
    for note in report.notes:
        log(f"  note: {note}")
    log(f"writing {out}")
    save_checkpoint(out, model, tokenizer=model.tokenizer)
    elapsed = time.perf_counter() - t0
    out_bytes = (out / "model.safetensors").stat().st_size
    summary = {
        **report.to_dict(),
        "out": str(out),
        "out_bytes": out_bytes,
        "seconds": round(elapsed, 3),
        "seconds_load": round(t_load, 3),
    }
    if isinstance(model.config, CALMConfig):
        summary["autoencoder_params"] = sum(p.numel() for p in model.autoencoder.parameters())
    log(f"done in {elapsed:.1f} s: {out} ({out_bytes / 1e9:.2f} GB); load it with calm.load({str(out)!r})")
    return summary


__all__ = [
    "OfficialFormatError",
    "OfficialCheckpoint",
    "LoadReport",
    "autoencoder_key_map",
    "calm_key_map",
    "detect_layout",
    "open_official",
    "autoencoder_config_from_official",
    "calm_config_from_official",
    "load_official_tokenizer",
    "load_official",
    "convert_official",
]
