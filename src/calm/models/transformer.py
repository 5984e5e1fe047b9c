"""Llama-style decoder-only Transformer backbone, shared by CALM and the token baseline.

The backbone maps input vectors [B, T, d] to hidden states [B, T, d] (after the final norm).
What the inputs are (token embeddings, compressed chunks) and what is read from the outputs
(logits, an energy head) is the business of the model that owns it.

Decoding uses `KVCache`. Left-padded batches pass `positions` (per-row position ids, so a
row's first real element sits at position 0) and `valid` (False on pad slots); pad slots
are never attended to by real positions, so a padded row computes exactly what it would
without the pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import BackboneConfig
from calm.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary


class KVCache:
    """Pre-allocated keys and values for every layer, plus which slots hold real elements."""

    def __init__(self, config: BackboneConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.d_model // config.num_heads
        shape = (batch_size, config.kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (same for every row)
        self.max_len = max_len
        # True while every filled slot of every row is real (no left padding): then a decoding
        # step needs no attention mask. Whoever marks slots invalid by hand must clear it.
        self.dense = True

    def reserve(self, n: int, valid: torch.Tensor | None) -> tuple[int, int]:
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.valid[:, start:end] = True if valid is None else valid
        if valid is not None and self.dense:
            self.dense = bool(valid.all())
        self.length = end
        return start, end

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows in `rows` (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.d_model // config.num_heads
        d = config.d_model
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self, x, cos, sin, mask, causal, cache: KVCache | None, layer: int, span: tuple[int, int] | None
    ):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start, end = span
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
        gqa = self.kv_heads != self.num_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_dim)

    def forward(self, x, cos, sin, mask, causal, cache, layer, span):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal, cache, layer, span)
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    """Stack of pre-norm Transformer blocks with RoPE and causal SDPA attention."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.rotary = RotaryEmbedding(
            config.d_model // config.num_heads, config.max_seq_len, config.rope_theta
        )

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.norm.weight
        return KVCache(
            self.config, batch_size, max_len or self.config.max_seq_len, device or p.device, dtype or p.dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, d] for inputs `x` [B, T, d].

        positions: [B, T] position ids (default: consecutive, continuing the cache).
        valid: [B, T] bool, False for pad elements (left padding); they are never attended to.
        cache: a `KVCache`; the new keys/values are appended to it.
        """
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = self.rotary(positions)
        span = cache.reserve(T, valid) if cache is not None else None
        mask, causal = None, True
        if cache is not None and cache.dense and (T == 1 or past == 0):
            # Every cached slot is real: one new query may see all of them (no mask, not
            # causal: SDPA's causal mask is top-left aligned), a first block is plainly causal.
            causal = T > 1
        elif cache is not None or valid is not None:
            # Boolean mask [B, 1, T, past+T]: causal, real keys only; a slot may always see itself
            # so that pad queries have one key and stay finite (their outputs are never used).
            total = past + T
            q_idx = torch.arange(past, total, device=x.device)[:, None]
            k_idx = torch.arange(total, device=x.device)[None, :]
            causal = k_idx <= q_idx
            key_ok = cache.valid[:, :total] if cache is not None else valid
            mask = (causal[None] & key_ok[:, None, :]) | (k_idx == q_idx)[None]
            mask = mask[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, causal, cache, i, span)
        return self.norm(x)
