"""Llama-style decoder-only Transformer backbone, shared by CALM and the token baseline.

The backbone maps input vectors [B, T, d] to hidden states [B, T, d] (after the final norm).
What the inputs are (token embeddings, compressed chunks) and what is read from the outputs
(logits, an energy head) is the business of the model that owns it.

Decoding uses a cache: `KVCache` for incremental decoding, `SharedPrefixCache` for many
continuations of one context (BrierLM rollouts). A cache stores each layer's new keys and
values and says what the new queries may attend to (`store`, `attention`); the block itself
is the same in every case. Left-padded batches pass `positions` (per-row position ids, so a
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

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, span: tuple[int, int]):
        """Write the new keys/values [B, H_kv, T, hd] into `span`; return all keys/values so far."""
        start, end = span
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention(self, T: int, past: int) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [B, 1, T, past+T] or None, is_causal) for T new queries after `past` slots."""
        if self.dense and (T == 1 or past == 0):
            # Every cached slot is real: one new query may see all of them (no mask, not
            # causal: SDPA's causal mask is top-left aligned), a first block is plainly causal.
            return None, T > 1
        return _padding_mask(self.valid[:, : past + T], past, T), False

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows in `rows` (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]


class StaticKVCache:
    """Fixed-shape keys and values [B, H_kv, L, hd] per layer with a fill position per row.

    Every step has the same tensor shapes and no Python state changes, so a decoding step
    through it compiles once (``torch.compile(fullgraph=True)``, CUDA graphs) and rows may sit
    at different lengths (a row can be reset and refilled while the others go on: continuous
    batching). Each step attends over all L slots with a mask of the filled slots up to the
    query's own. The caller sizes it: writing past L is an indexing error, not checked here
    (that check would need the positions' values, i.e. a host sync).
    """

    def __init__(self, config: BackboneConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.d_model // config.num_heads
        shape = (batch_size, config.kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.filled = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next slot of each row
        self.slots_index = torch.arange(max_len, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self.max_len = max_len
        self.length = 0  # unused (rows have their own lengths); Backbone reads it for `past`

    def reserve(self, n: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Slots [B, n] for n new elements of every row (marked filled unless `valid` is False)."""
        slots = self.pos[:, None] + self.slots_index[:n]
        self.filled[self.rows[:, None], slots] = True if valid is None else valid
        self.pos += n
        return slots

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        rows = self.rows[:, None]
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)
        self.values[layer][rows, :, slots] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]

    def attention(self, T: int, past: int, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        # query t of row b (at slot slots[b, t]) sees the filled slots up to its own, and
        # always itself (a pad query stays finite; its output is never used)
        upto = self.slots_index[None, None, :] <= slots[:, :, None]  # [B, T, L]
        mask = (upto & self.filled[:, None, :]) | (self.slots_index[None, None, :] == slots[:, :, None])
        return mask[:, None], False

    def reset(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a finished sequence's row can take a new one)."""
        self.filled[rows] = False
        self.pos[rows] = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows in `rows`."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.filled, self.pos = self.filled[rows], self.pos[rows]
        self.rows = torch.arange(len(self.pos), device=self.pos.device)

    # -- continuous batching: rows join with their prefilled prefix, the slot count follows need
    @classmethod
    def from_cache(cls, cache: KVCache, max_len: int) -> StaticKVCache:
        """A static cache of `max_len` slots holding what a `KVCache` holds (e.g. a prompt
        prefilled alone): the same slots filled, each row's next slot right after them."""
        if cache.length > max_len:
            raise ValueError(f"{cache.length} filled slots do not fit in {max_len}")
        self = cls.__new__(cls)
        n = cache.length
        self.keys = [F.pad(k[:, :, :n], (0, 0, 0, max_len - n)) for k in cache.keys]
        self.values = [F.pad(v[:, :, :n], (0, 0, 0, max_len - n)) for v in cache.values]
        self.filled = F.pad(cache.valid[:, :n], (0, max_len - n))
        device = self.filled.device
        self.pos = torch.full((self.filled.shape[0],), n, dtype=torch.long, device=device)
        self.slots_index = torch.arange(max_len, device=device)
        self.rows = torch.arange(self.filled.shape[0], device=device)
        self.max_len, self.length = max_len, 0
        return self

    def resize(self, max_len: int) -> None:
        """Change the slot count (a longer row is joining, or the longest one left). Shrinking
        drops slots at the end: the caller makes sure no row has filled them or will need them."""
        n = min(max_len, self.max_len)
        grow = max_len - n
        self.keys = [F.pad(k[:, :, :n], (0, 0, 0, grow)) for k in self.keys]
        self.values = [F.pad(v[:, :, :n], (0, 0, 0, grow)) for v in self.values]
        self.filled = F.pad(self.filled[:, :n], (0, grow))
        self.slots_index = torch.arange(max_len, device=self.pos.device)
        self.max_len = max_len

    def extend(self, *others: StaticKVCache) -> None:
        """Append the rows of `others` (same layers and slot count) after this cache's rows."""
        for other in others:
            if other.max_len != self.max_len:
                raise ValueError(f"cannot join caches of {self.max_len} and {other.max_len} slots")
        caches = (self, *others)
        self.keys = [torch.cat(ks) for ks in zip(*(c.keys for c in caches))]
        self.values = [torch.cat(vs) for vs in zip(*(c.values for c in caches))]
        self.filled = torch.cat([c.filled for c in caches])
        self.pos = torch.cat([c.pos for c in caches])
        self.rows = torch.arange(len(self.pos), device=self.pos.device)


class SharedPrefixCache:
    """Continuations of Q queries that share one context cache per window, without copies.

    Query q of window b may attend to the first ``ctx[q]`` slots of ``base`` (a filled
    `KVCache` of B windows; its invalid slots stay invisible) and to its own earlier steps.
    Each step feeds one element per query ([B, Q] inputs, ``positions`` [B, Q]); the new keys
    are appended step-major, and one boolean mask over [context | own keys of all queries]
    lets each query see exactly its own context and its own continuation, so the backbone's
    ordinary SDPA block serves all Q·B continuations in one call per step.
    """

    def __init__(self, base: KVCache, ctx: torch.Tensor, steps: int):
        self.base, self.steps = base, steps
        self.prefix = int(ctx.max())  # context slots read (once per cache)
        self.Q = len(ctx)
        slots = torch.arange(self.prefix, device=ctx.device)
        # [B, 1, Q, S]: a query's context slots that hold real elements of its window
        self.context_mask = ((slots[None, :] < ctx[:, None])[None] & base.valid[:, None, : self.prefix])[
            :, None
        ]
        self.own: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(base.keys)
        self.length = 0  # continuation steps stored

    def reserve(self, n: int, valid) -> None:
        if n != self.Q or valid is not None:
            raise ValueError(
                f"a SharedPrefixCache takes one element per query and step ({self.Q}), without padding; got {n}"
            )
        if self.length >= self.steps:
            raise ValueError(f"SharedPrefixCache full: {self.steps} continuation steps allocated")
        self.length += 1
        return None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, span) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H_kv, Q, hd] (one new key per query) -> [context | own keys so far]."""
        prev = self.own[layer]
        own = (k, v) if prev is None else (torch.cat([prev[0], k], 2), torch.cat([prev[1], v], 2))
        self.own[layer] = own
        S = self.prefix
        return (
            torch.cat([self.base.keys[layer][:, :, :S], own[0]], 2),
            torch.cat([self.base.values[layer][:, :, :S], own[1]], 2),
        )

    def attention(self, T: int, past: int) -> tuple[torch.Tensor, bool]:
        # own slot (step j, query q') is visible to query q iff q' == q (steps so far only)
        eye = torch.eye(self.Q, dtype=torch.bool, device=self.context_mask.device)
        own = eye.repeat(1, self.length)[None, None].expand(self.context_mask.shape[0], 1, -1, -1)
        return torch.cat([self.context_mask, own], -1), False


def _padding_mask(key_ok: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """[B, 1, T, past+T]: causal, real keys only; a slot may always see itself so that pad
    queries have one key and stay finite (their outputs are never used)."""
    total = past + T
    q_idx = torch.arange(past, total, device=key_ok.device)[:, None]
    k_idx = torch.arange(total, device=key_ok.device)[None, :]
    mask = ((k_idx <= q_idx)[None] & key_ok[:, None, :]) | (k_idx == q_idx)[None]
    return mask[:, None]


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
            k, v = cache.store(layer, k, v, span)
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

    def new_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype=None, *, static: bool = False
    ) -> KVCache | StaticKVCache:
        """A cache for `batch_size` rows of at most `max_len` positions (default: the context);
        ``static=True``: a `StaticKVCache` (fixed shapes, per-row lengths)."""
        p = self.norm.weight
        cls = StaticKVCache if static else KVCache
        return cls(
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
        if positions is None:  # consecutive positions: the bound is checked from the shapes
            cos, sin = self.rotary.table(past, T)
        else:
            cos, sin = self.rotary(positions)
        span = cache.reserve(T, valid) if cache is not None else None
        if isinstance(cache, StaticKVCache):
            mask, causal = cache.attention(T, past, span)
        elif cache is not None:
            mask, causal = cache.attention(T, past)
        elif valid is not None:
            mask, causal = _padding_mask(valid, 0, T), False
        else:
            mask, causal = None, True
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, causal, cache, i, span)
        return self.norm(x)
