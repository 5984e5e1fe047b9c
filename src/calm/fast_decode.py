"""Inference-time shortcuts for decoding: the same results as the plain modules, fewer bytes read.

At small batch a decoding step is bound by the bytes of weights it reads and by per-op
overhead, not by FLOPs. What is here trades a one-off precomputation (cached while the weights
are unchanged) for less of both:

- `tied_argmax`: the float32 argmax through a tied vocabulary projection, read through a bf16
  copy of the matrix with a proven error bound and rescored in float32 where it matters.
- `ChunkInputTable`: CALM's chunk input (embed K tokens, flatten, first compression layer) as
  K lookups in a precomputed table instead of a [K·d → 2d] matmul per step.
- `decode_chunks`: latents to token chunks through the autoencoder decoder and `tied_argmax`.
- `low_precision_copies`: cached bf16/fp16 copies of CALM's head and decoder
  (``decode_dtype``; faster, not exact).
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

__all__ = ["ChunkInputTable", "decode_chunks", "low_precision_copies", "tied_argmax"]


# ---------------------------------------------------------------------------------------------
# Exact, fast argmax through a tied vocabulary projection

_SCREEN_GROUP = 16  # tokens per group in the bf16 screen


@cache
def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls many times faster than float32 on this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_fast_bf16()


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


@dataclass
class _Screen:
    weight_bf16: torch.Tensor  # [Vp, d], V padded to a multiple of the group size
    max_norm: float  # largest row norm of the float32 weight
    groups: int


def _screen_for(weight: torch.Tensor) -> _Screen:
    def build() -> _Screen:
        V, _ = weight.shape
        G = -(-V // _SCREEN_GROUP)
        w = weight.detach()
        if G * _SCREEN_GROUP > V:  # pad by repeating the last row: same logit as a real token
            w = torch.cat([w, w[-1:].expand(G * _SCREEN_GROUP - V, -1)])
        return _Screen(w.to(torch.bfloat16).contiguous(), float(weight.detach().float().norm(dim=1).max()), G)

    return _cached("screen", [weight], build)


def tied_argmax(hidden: torch.Tensor, weight: torch.Tensor, *, screen: bool | None = None) -> torch.Tensor:
    """argmax_v hidden · weight[v]: hidden [R, d], weight [V, d] -> LongTensor [R].

    The float32 argmax (first index on exact ties), computed either directly or, with
    ``screen=True``, through a bf16 screen: one bf16 matmul gives logits l~ with
    |l~_v - l_v| <= eps = (3.05 u + 1.1 γ_d) · ||h|| · max_v ||w_v|| (u = 2^-8 the bf16 unit
    roundoff of h, w and the output, γ_d = d·2^-24 the float32 accumulation; 12 u on CUDA,
    whose bf16 GEMMs may reduce partial sums in bf16). Only tokens with l~_v >= max l~ - 2 eps
    can be the argmax; they are found via group maxima over 16-token groups and rescored in
    float32 (a handful per row). ``screen=None`` picks the screen for float32 inputs when the device
    has fast bf16 and the weight is large (V·d >= 2^20: reading half the bytes pays even for a
    single row). Other dtypes use the direct path.
    """
    R, d = hidden.shape
    V = weight.shape[0]
    if screen is None:
        screen = (
            hidden.dtype == torch.float32
            and weight.dtype == torch.float32
            and V * d >= (1 << 20)
            and _fast_bf16(hidden.device)
        )
    if not screen or R == 0:
        return F.linear(hidden, weight).max(dim=-1).indices
    s = _screen_for(weight)
    h = hidden.float()
    # Row blocks keep each block's bf16 logits ([Vp, rows], ~2-4 MB) in cache while they are
    # reduced and gathered; one [Vp, R] matmul at R in the thousands is several times slower.
    block = max(64, (1 << 21) // (s.groups * _SCREEN_GROUP))
    if R <= block:
        return _screened_argmax(h, weight, s)
    return torch.cat([_screened_argmax(h[i : i + block], weight, s) for i in range(0, R, block)])


def _screen_eps(h: torch.Tensor, s: _Screen) -> torch.Tensor:
    """Per-row bound on |bf16 screen logit - float32 logit| (see `tied_argmax`)."""
    u = 2.0**-8
    coef = (12 * u if h.device.type == "cuda" else 3.05 * u) + 1.1 * h.shape[1] * 2.0**-24
    return h.norm(dim=1).mul_(coef * s.max_norm * (1 + 1e-4))


def _screened_argmax(h: torch.Tensor, weight: torch.Tensor, s: _Screen) -> torch.Tensor:
    R, d = h.shape
    V = weight.shape[0]
    gs = _SCREEN_GROUP
    hb = h.to(torch.bfloat16)
    # [Vp, R]: the weight streams through once and the group reduction runs along R (contiguous)
    grouped = F.linear(s.weight_bf16, hb).view(s.groups, gs, R)
    group_max = grouped.amax(dim=1).float().t()  # [R, G]
    top = group_max.amax(dim=1)  # [R]
    threshold = top - 2 * _screen_eps(h, s) - 1e-30
    r, g = (group_max >= threshold.unsqueeze(1)).nonzero(as_tuple=True)  # a few groups per row
    if r.numel() > 8 * R + 64:  # not selective (e.g. all logits tied): the direct path is cheaper
        return F.linear(h, weight.float()).max(dim=-1).indices
    vals = grouped[g, :, r].float()  # [P, gs]
    p, j = (vals >= threshold[r].unsqueeze(1)).nonzero(as_tuple=True)
    rows = r[p]
    tokens = (g[p] * gs + j).clamp_(max=V - 1)
    exact = torch.linalg.vecdot(h.index_select(0, rows), weight.index_select(0, tokens).float())
    best = torch.full((R,), -math.inf, device=h.device).scatter_reduce_(0, rows, exact, "amax")
    key = torch.where(exact == best[rows], tokens, V)
    return torch.full((R,), V, dtype=torch.long, device=h.device).scatter_reduce_(0, rows, key, "amin")


def decode_chunks(
    autoencoder, z: torch.Tensor, *, screen: bool | None = None, vocab_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Latents [..., l] -> token chunks [..., K]: the autoencoder decoder's argmax, computed
    with `tied_argmax` (same result as ``autoencoder.decode(z)``, faster for many latents).

    vocab_weight: the vocabulary matrix to take the argmax through instead of the decoder's own
    (a low-precision copy of the decoder keeps the float32 argmax of the original this way);
    the decoder's hidden states are cast to its dtype.
    """
    h = autoencoder.decode_hidden(z)  # [..., K, d]
    weight = autoencoder.lm_head.weight if vocab_weight is None else vocab_weight
    flat = h.reshape(-1, h.shape[-1]).to(weight.dtype)
    return tied_argmax(flat, weight, screen=screen).view(h.shape[:-1])


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


# ---------------------------------------------------------------------------------------------
# Low-precision copies


def low_precision_copies(model, dtype: torch.dtype):
    """Copies of CALM's head and autoencoder in `dtype`, cached while the weights are
    unchanged (autocast would re-cast every weight at every step, which costs more than it
    saves when a step decodes few latents). The key holds the head's sampling settings, so a
    copy never samples with steps the model no longer has."""
    params = list(model.head.parameters()) + list(model.autoencoder.parameters())

    def build():
        return copy.deepcopy(model.head).to(dtype), copy.deepcopy(model.autoencoder).to(dtype)

    sampling = tuple(sorted(model.head.describe().items())) if hasattr(model.head, "describe") else ()
    return _cached(("low-precision", dtype, sampling), params, build)
