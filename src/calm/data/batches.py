"""Windows of a token stream: seeded training batches and consecutive evaluation windows.

Training batches (`batch_for_step`) are a pure function of ``(seed, step)``: resuming needs only
the step. The stream is the split's shards concatenated, so a data set prepared with many shards
gives the same batches as the same tokens in one file. Evaluation (`eval_windows`,
`make_windows`, used by training's validation and by `calm eval`) takes consecutive
non-overlapping windows ``[0, T), [T, 2T), ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from calm.data.errors import DataError
from calm.data.shards import TokenShards, check_token_ids

if TYPE_CHECKING:
    import torch


def windows_per_epoch(num_tokens: int, block_size: int, random_offset: bool = False) -> int:
    """Non-overlapping windows of ``block_size`` tokens in one epoch.

    With ``random_offset`` every epoch's windows are shifted by an offset in ``[0, block_size)``,
    so one window fewer fits whatever the offset: the count stays the same in every epoch.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if random_offset:
        return max(0, (num_tokens + 1) // block_size - 1)
    return num_tokens // block_size


def _epoch_order(shards: TokenShards, n: int, block_size: int, seed: int, epoch: int, random_offset: bool):
    key = (n, block_size, seed, epoch, random_offset)
    cache = shards._perm_cache
    hit = cache.get(key)
    if hit is None:
        rng = np.random.Generator(np.random.PCG64([seed, epoch]))
        perm = rng.permutation(n)
        offset = int(rng.integers(block_size)) if random_offset else 0
        hit = (perm, offset)
        if len(cache) >= 3:  # a batch may straddle two epochs; keep a couple
            cache.pop(next(iter(cache)))
        cache[key] = hit
    return hit


def window_starts(
    shards: TokenShards,
    indices: np.ndarray,
    block_size: int,
    seed: int,
    random_offset: bool = False,
) -> np.ndarray:
    """Token start of global window ``indices`` (positions in the concatenated epoch orders)."""
    n = windows_per_epoch(len(shards), block_size, random_offset)
    if n == 0:
        raise DataError(
            f"{shards.data_dir} [{shards.split}] has {len(shards)} tokens, fewer than one window of "
            f"block_size={block_size}{' (+ offset)' if random_offset else ''}; use a smaller block size or more data"
        )
    epochs, pos = np.divmod(np.asarray(indices, dtype=np.int64), n)
    starts = np.empty(len(pos), dtype=np.int64)
    for e in np.unique(epochs):
        perm, offset = _epoch_order(shards, n, block_size, seed, int(e), random_offset)
        sel = epochs == e
        starts[sel] = offset + perm[pos[sel]] * block_size
    return starts


def batch_for_step(
    shards: TokenShards,
    step: int,
    batch_size: int,
    block_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    random_offset: bool = False,
) -> torch.Tensor:
    """The training batch of global step ``step``: a LongTensor ``[batch_size // world_size, block_size]``.

    Epoch ``e`` visits the ``n`` non-overlapping windows (starts at multiples of ``block_size``,
    plus a per-epoch offset if ``random_offset``) in the order of a permutation seeded by
    ``(seed, e)``; the epochs' orders are concatenated and the global batch of step ``s`` is
    windows ``[s*B, (s+1)*B)`` of that sequence. Rank ``r`` of ``world_size`` takes rows
    ``r, r + world_size, ...`` (strided), so the ranks' rows together are exactly the global batch,
    and each rank reads only its own windows. A pure function of ``(seed, step)``: resuming needs
    only the step. Cost O(B): the current epoch's permutation is computed once and cached on
    ``shards``. An id outside the data set's vocabulary raises `DataError` naming the window.
    """
    import torch

    if batch_size < 1 or step < 0:
        raise ValueError(f"need batch_size >= 1 and step >= 0 (got {batch_size}, {step})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    idx = step * batch_size + np.arange(rank, batch_size, world_size, dtype=np.int64)
    starts = window_starts(shards, idx, block_size, seed, random_offset)
    rows = np.stack([shards.read(s, s + block_size) for s in starts.tolist()])
    vocab = shards.meta.get("vocab_size")
    if vocab is not None and rows.size and int(rows.max()) >= int(vocab):  # host-side numpy: no device sync
        r = int(np.flatnonzero((rows >= int(vocab)).any(axis=1))[0])
        s = int(starts[r])
        check_token_ids(
            rows[r], int(vocab), f"{shards.data_dir} [{shards.split}] window at token {s:,}", offset=s
        )
    return torch.from_numpy(rows.astype(np.int64))


def make_windows(tokens, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [N, block_size] of a flat token stream (a tensor, an
    array, a memory map or `TokenShards.tokens`: only the part used is read); a ragged tail is
    dropped and ``max_tokens`` caps the tokens covered."""
    import torch

    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    available = len(tokens)
    total = available if max_tokens is None else min(available, int(max_tokens))
    n = total // block_size
    if n == 0:
        what = (
            f"--max-tokens {max_tokens}"
            if max_tokens is not None and max_tokens < available
            else f"{available:,} tokens"
        )
        raise ValueError(
            f"no complete window of {block_size} tokens to evaluate ({what}); "
            "give more data or a smaller --block-size"
        )
    part = tokens[: n * block_size]
    part = part.long() if torch.is_tensor(part) else torch.from_numpy(np.asarray(part).astype(np.int64))
    return part.view(n, block_size)


def eval_windows(
    shards: TokenShards,
    block_size: int,
    max_tokens: int | None = None,
    batch_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows ``[0, T), [T, 2T), ...`` of the split, in order.

    Yields LongTensors ``[block_size]`` (or ``[b, block_size]`` batches of up to ``batch_size``
    windows). ``max_tokens`` caps the tokens covered (the first ``max_tokens // block_size``
    windows); a trailing partial window is dropped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    total = len(shards) if max_tokens is None else min(len(shards), int(max_tokens))
    n = total // block_size
    step = batch_size or 1
    for i in range(0, n, step):
        j = min(n, i + step)
        t = make_windows(shards.read(i * block_size, j * block_size), block_size)
        yield t if batch_size else t[0]
