"""Config translation: the authors' config.json (checked against the tensor shapes) -> our config dataclasses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from calm.config import LLAMA3_VOCAB, AutoencoderConfig, CALMConfig
from calm.official.keymaps import _layer_count
from calm.official.layout import (
    _AE_TRAINING_DEFAULTS,
    CONFIG_FILE,
    LLAMA3_EOT_ID,
    LLAMA3_PAD_ID,
    OFFICIAL_MASK_ID,
    OfficialFormatError,
)

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
