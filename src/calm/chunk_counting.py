"""Counting identical chunks: how many of a row's N candidates equal each one (`calm.sampling`).

:func:`chunk_counts` is what both samplers need from the candidates: the batch approximation
weighs a chunk by its count, the exact sampler's ``"fallback"`` takes the most frequent draw.
"""

from __future__ import annotations

import torch

__all__ = ["chunk_counts"]


def _check_chunks(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [B, N, K], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape [B, N, K] (batch rows, chunks per row, tokens per chunk); "
            f"got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
        )
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (a LongTensor), got dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have at least one chunk of at least one token, got {tuple(x.shape)}")


def _sort_chunks(candidates: torch.Tensor) -> torch.Tensor:
    """Permutation [B, N] that sorts each row's chunks lexicographically.

    LSD radix sort with stable sorts. Token ids are packed into 62-bit keys, as many per key as
    fit (all four tokens of a chunk for vocabularies up to 2^15, two for Llama-3's 128k), so
    this needs ceil(K / tokens-per-key) sorts.
    """
    B, N, K = candidates.shape
    x = candidates.long()
    lo, hi = torch.aminmax(x)  # one host sync
    lo, hi = int(lo), int(hi)
    bits = max(1, (hi - lo).bit_length())
    per_key = max(1, 62 // bits)
    perm = torch.arange(N, device=candidates.device).expand(B, N)
    for stop in range(K, 0, -per_key):
        start = max(0, stop - per_key)
        key = torch.zeros(B, N, dtype=torch.long, device=candidates.device)
        for k in range(start, stop):
            key = (key << bits) | (x[:, :, k] - lo) if per_key > 1 else x[:, :, k]
        order = torch.sort(key.gather(1, perm), dim=1, stable=True).indices
        perm = perm.gather(1, order)
    return perm


def chunk_counts(candidates: torch.Tensor) -> torch.Tensor:
    """How many candidates in the same row equal each candidate (all K tokens equal).

    Args:
        candidates: integer tensor [B, N, K].

    Returns:
        LongTensor [B, N]: ``counts[b, i] = #{j : candidates[b, j] == candidates[b, i]}`` (>= 1).

    Vectorised over rows with K stable sorts (O(B·N·log N) time, O(B·N·K) memory), so it works for
    any vocabulary size (no packing of the K ids into one integer) on CPU and CUDA.
    """
    _check_chunks(candidates, "candidates")
    B, N, K = candidates.shape
    perm = _sort_chunks(candidates)
    ordered = candidates.gather(1, perm.unsqueeze(-1).expand(B, N, K))
    new_group = torch.ones(B, N, dtype=torch.bool, device=candidates.device)
    new_group[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    group = new_group.long().cumsum(1) - 1  # group id of each sorted position, 0..N-1
    sizes = torch.zeros(B, N, dtype=torch.long, device=candidates.device)
    sizes.scatter_add_(1, group, torch.ones_like(group))
    counts_sorted = sizes.gather(1, group)
    return torch.empty_like(counts_sorted).scatter_(1, perm, counts_sorted)
