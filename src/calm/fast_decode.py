"""Inference-time precomputations, cached while the weights they come from are unchanged.

At small batch a decoding step is bound by the bytes of weights it reads and by per-op
overhead, not by FLOPs. What is here trades a one-off precomputation for less of both:

- `ChunkInputTable`: CALM's chunk input (embed K tokens, flatten, first compression layer) as
  K lookups in a precomputed table instead of a [K·d → 2d] matmul per step.
- `_cached`: the cache itself (also holds `calm.decoding`'s decoder and bf16 screen).

Turning latents into tokens is `calm.decoding`'s job.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

__all__ = ["ChunkInputTable"]


# ---------------------------------------------------------------------------------------------
# Precomputations cached while the weights they come from are unchanged

_cache: dict[tuple, tuple[weakref.ref, tuple, object]] = {}


def _cached(kind, tensors: list[torch.Tensor], build):
    """``build()``, computed once per state of `tensors`: the entry is rebuilt when one of them
    is modified in place (its version counter moves), replaced or moved, and is dropped as soon
    as the first of them is freed."""
    key = (kind, id(tensors[0]))
    state = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)
    ref, old_state, value = _cache.get(key, (None, None, None))
    if ref is not None and ref() is tensors[0] and old_state == state:
        return value
    value = build()
    # the entry goes with the tensor (a 64 MiB table should not outlive its model)
    # (the dict is bound now: at interpreter exit the module global may already be None)
    _cache[key] = (weakref.ref(tensors[0], lambda _, key=key, c=_cache: c.pop(key, None)), state, value)
    return value


# ---------------------------------------------------------------------------------------------
# CALM's chunk inputs by table lookup


class ChunkInputTable:
    """CALM's backbone input for whole chunks of K tokens, by K row lookups.

    `CALM.chunk_inputs` embeds a chunk's K tokens, flattens them and compresses the K·d vector,
    starting with a linear layer: W [e_1; ...; e_K] + b = Σ_k W_k E[c_k] + b. Its output is
    therefore a sum of K rows of a table T_k = E W_kᵀ ([K, V, 2d], b folded into T_1), which
    a decoding step reads instead of the whole of W (K·d × 2d floats: 2 MiB at the CPU preset,
    as much as one backbone layer). Equal to `CALM.chunk_inputs` up to float rounding (another
    summation order). The table holds K·V·2d float32 values; `for_model` builds it only when
    that is at most `max_bytes` (the CPU preset: 64 MiB; a 128k-token vocabulary at d = 1024
    would need 4 GiB, and gets None) and caches it while the weights are unchanged.
    """

    max_bytes = 256 << 20

    def __init__(self, model):
        embed = model.embed.weight.detach().float()  # [V, d]
        first = model.compress[0]
        V, d = embed.shape
        K = first.in_features // d
        w = first.weight.detach().float().view(first.out_features, K, d)
        table = torch.einsum("vd,okd->kvo", embed, w)  # [K, V, 2d]
        if first.bias is not None:
            table[0] += first.bias.detach().float()
        self.table = table.reshape(K * V, -1)
        self.offsets = torch.arange(K, device=embed.device) * V
        self.rest = model.compress[1:]
        self.dtype = first.weight.dtype

    @classmethod
    def for_model(cls, model) -> ChunkInputTable | None:
        """The cached table of CALM `model`, or None if it would exceed `max_bytes`."""
        first = model.compress[0]
        V = model.embed.weight.shape[0]
        K = first.in_features // model.embed.weight.shape[1]
        if K * V * first.out_features * 4 > cls.max_bytes:
            return None
        tensors = [model.embed.weight, first.weight] + ([first.bias] if first.bias is not None else [])
        with torch.no_grad():
            return _cached(("chunk-inputs", id(model)), tensors, lambda: cls(model))

    def __call__(self, chunks: torch.Tensor) -> torch.Tensor:
        """Backbone inputs [..., d] for chunks [..., K] of real tokens (no pads)."""
        K = self.offsets.numel()
        first = F.embedding_bag((chunks + self.offsets).reshape(-1, K), self.table, mode="sum")
        return self.rest(first.to(self.dtype)).view(*chunks.shape[:-1], -1)
