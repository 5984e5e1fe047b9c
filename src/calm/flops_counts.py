"""Analytic counts for `calm.flops`: per part of a model, its stored parameters and the
weight-matrix entries one application multiplies by, computed from the config alone.

`calm.flops` turns these into FLOPs per text token by its counting rules (its docstring) and
re-exports them; tests/test_flops.py checks them against instantiated modules (`numel`) and
measured forward and backward passes.
"""

from __future__ import annotations

from calm.config import AutoencoderConfig, CALMConfig


def backbone_counts(cfg) -> tuple[int, int]:
    """Llama-style backbone: (parameters, matmul weights per position)."""
    d, L = cfg.d_model, cfg.num_layers
    head_dim = d // cfg.num_heads
    q_o = 2 * d * cfg.num_heads * head_dim
    k_v = 2 * d * cfg.kv_heads * head_dim
    mlp = 3 * d * cfg.ffn_dim
    matmul = L * (q_o + k_v + mlp)
    norms = L * 2 * d + d
    return matmul + norms, matmul


def attention_flops(cfg, context: int) -> int:
    """Attention-score FLOPs per position: QKᵀ and A·V over `context` keys in every layer."""
    return 2 * 2 * context * cfg.num_heads * (cfg.d_model // cfg.num_heads) * cfg.num_layers


def compression_counts(cfg: CALMConfig) -> tuple[int, int]:
    """CALM input compression Linear(K·d→2d) → SiLU → Linear(2d→d) → LayerNorm."""
    d, K = cfg.d_model, cfg.chunk_size
    matmul = K * d * 2 * d + 2 * d * d
    biases, layer_norm = 2 * d + d, 2 * d
    return matmul + biases + layer_norm, matmul


def energy_head_counts(cfg: CALMConfig) -> tuple[int, int, int]:
    """Energy head: (parameters, matmul weights per sample, of which depend on h alone)."""
    d, l, n = cfg.d_model, cfg.latent_dim, cfg.num_head_layers
    noise_embd, hidden_embd = cfg.noise_dim * d, d * d
    block = 2 * d * d + d * d + d * 2 * d + d * d  # Linear(2d→d), Linear(d→d), Linear(d→2d), down_proj
    final = d * d + d * l
    matmul = noise_embd + hidden_embd + n * block + final
    biases = 2 * d + n * (d + d + 2 * d + d) + d + l
    layer_norms = 2 * (2 * d) + n * 2 * d + 2 * d
    h_only = hidden_embd + n * d * d  # hidden_embd, and the h-half of each block's Linear(2d→d)
    return matmul + biases + layer_norms, matmul, h_only


ADALN_FREQ_DIM = 256  # sinusoidal time features of the flow / diffusion network (= adaln_mlp.FREQ_DIM)


def adaln_head_counts(cfg: CALMConfig) -> dict[str, int]:
    """Flow / diffusion head (`calm.models.adaln_mlp.AdaLNMLP`, width d): parameters and the
    matmul weights used per sample row, per (position, time) and once per position."""
    d, l, n, F = cfg.d_model, cfg.latent_dim, cfg.num_head_layers, ADALN_FREQ_DIM
    per_row = l * d + n * 2 * d * d + d * l  # input_proj, the blocks' MLPs, the output projection
    time_mlp = F * d + d * d
    modulations = n * 3 * d * d + 2 * d * d  # (shift, scale, gate) per block, (shift, scale) at the end
    per_position = d * d  # cond_embed(h)
    biases = d + 2 * d + d + n * (2 * d + 3 * d) + l + 2 * d
    layer_norms = n * 2 * d  # the final LayerNorm has no affine parameters
    matmul = per_row + time_mlp + modulations + per_position
    return {
        "params": matmul + biases + layer_norms,
        "per_row": per_row,
        "per_time": time_mlp + modulations,
        "per_position": per_position,
        "no_input_grad": l * d + F * d,  # input_proj and the time MLP's first layer
    }


def head_evals_per_sample(cfg: CALMConfig) -> int:
    """Network evaluations per sample of the config's head (as its `evals_per_sample`)."""
    if cfg.head == "flow":
        return cfg.flow_steps * (2 if cfg.flow_solver == "midpoint" else 1)
    if cfg.head == "diffusion":
        return cfg.diffusion_steps
    return 1


def autoencoder_counts(ae: AutoencoderConfig) -> dict[str, int]:
    """Chunk autoencoder: parameters and matmul weights per chunk for encoder and decoder."""
    d, K, l, V, half = ae.d_model, ae.chunk_size, ae.latent_dim, ae.vocab_size, ae.num_layers // 2
    block_matmul = 3 * d * ae.ffn_dim  # SwiGLU of one residual block
    block_params = block_matmul + d  # + its RMSNorm
    embed = V * d  # tied with the decoder's vocabulary projection: stored once
    enc_params = 2 * half * block_params + (K * d * d + d) + d + (d * 2 * l + 2 * l)
    dec_params = (l * d + d) + 2 * half * block_params + (d * K * d + K * d) + d
    enc_matmul = K * half * block_matmul + K * d * d + half * block_matmul + d * 2 * l
    dec_matmul = l * d + half * block_matmul + d * K * d + K * half * block_matmul + K * V * d
    # what the temperature samplers' lazy draw classes pay per draw: the shared layers, then one
    # position's slice of `expand` and its blocks (the vocabulary projection not included)
    first_token = l * d + half * block_matmul + d * d + half * block_matmul
    return {
        "embeddings": embed,
        "encoder": enc_params,
        "decoder": dec_params,
        "total": embed + enc_params + dec_params,
        "encoder_matmul": enc_matmul,
        "decoder_matmul": dec_matmul,
        "decoder_first_token_matmul": first_token,
    }


def count_parameters(module) -> int:
    """Parameters of an instantiated module (shared tensors once), for cross-checks."""
    return sum(p.numel() for p in module.parameters())
