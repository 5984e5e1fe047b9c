"""Explicit key maps: every tensor name of the authors' modules and its name in ours."""

from __future__ import annotations

import re

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
