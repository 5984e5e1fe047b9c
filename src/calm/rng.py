"""Per-row counter-based random numbers for generation (and anything that must not depend on
which other rows share a batch).

`RowRandom` gives every batch row its own uniform streams, addressed by counters: a value is a
pure function of (the row's seed, the stream key, the element index), so a row's draws do not
depend on the other rows, rows can be dropped, and blocks of future values can be drawn at
once. `NoiseBlocks` draws many steps' worth of one stream per call.

Per-row counters: a stream key component (e.g. the step) and the element offset may also be a
LongTensor with one value per row, so rows at different steps (a server's batch, where each
request joined at its own time) draw in one call exactly the values each would draw alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["NoiseBlocks", "RowRandom"]

# ---------------------------------------------------------------------------------------------
# Per-row counter-based random numbers

_MASK64 = (1 << 64) - 1


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (unsigned 64-bit result)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors: multiplications wrap around (two's complement),
    right shifts are made logical by masking, so the bits equal the unsigned 64-bit reference."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


class RowRandom:
    """Independent uniform streams, one per batch row, addressed by counters (no state).

    ``uniform(stream, shape)`` returns [B, *shape] values in the open interval (0, 1); row b's
    values are a pure function of (its seed, ``stream``, the element index): splitmix64 of a
    per-(row, stream) key plus the index times the golden ratio, i.e. splitmix64's own output
    sequence from that key. Rows can be dropped (`select`) without changing the others' values.
    Vectorised int64 tensor ops, on CPU and CUDA.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        keys = [_signed64(_mix64_int(_mix64_int(s & _MASK64) + 0x632BE59BD9B4E019)) for s in self.seeds]
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)
        self._index_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.keys.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the rows `rows` (indices into the current rows)."""
        self.keys = self.keys[rows]

    def _index(self, n: int, offset: int = 0) -> torch.Tensor:
        if offset:  # (i + offset)·G = i·G + offset·G modulo 2^64, as int64 arithmetic wraps
            return self._index(n) + _signed64(offset * 0x9E3779B97F4A7C15)
        idx = self._index_cache.get(n)
        if idx is None:
            idx = (torch.arange(1, n + 1, dtype=torch.int64, device=self.keys.device) * _GOLDEN).view(1, n)
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            self._index_cache[n] = idx
        return idx

    def bits(self, stream: Sequence, n: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """[B, n] int64 random bits: elements offset .. offset + n - 1 of the counter ``stream``
        (a tuple of non-negative ints), so consecutive calls can continue one sequence.

        A component of ``stream`` and ``offset`` may be a LongTensor [B] of per-row values: row b
        then gets exactly the bits of a call with that row's values as ints."""
        salt: int | torch.Tensor = 0x5851F42D4C957F2D
        for s in stream:
            if isinstance(s, torch.Tensor):  # the same arithmetic on int64 tensors (wrapping)
                if isinstance(salt, int):
                    salt = torch.full_like(self.keys, _signed64(salt))
                salt = _mix64(salt ^ _mix64(s.to(torch.int64) + 0x2545F4914F6CDD1D))
            elif isinstance(salt, int):
                salt = _mix64_int(salt ^ _mix64_int(int(s) + 0x2545F4914F6CDD1D))
            else:
                salt = _mix64(salt ^ _signed64(_mix64_int(int(s) + 0x2545F4914F6CDD1D)))
        salt = _signed64(salt) if isinstance(salt, int) else salt
        key = _mix64(self.keys ^ salt).view(-1, 1)
        if isinstance(offset, torch.Tensor):  # (i + offset_b)·G modulo 2^64, per row
            return _mix64(key + self._index(n) + (offset.to(torch.int64) * _GOLDEN).view(-1, 1))
        return _mix64(key + self._index(n, offset))

    def uniform(
        self,
        stream: Sequence,
        shape: Sequence[int] = (),
        dtype=torch.float32,
        *,
        offset: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """[B, *shape] uniforms in (0, 1): 24 random bits for float32/bf16/fp16, 53 for float64;
        elements `offset` onwards of the stream (row-major over `shape`). Per-row stream
        components and offsets (LongTensors [B]) as in `bits`."""
        shape = tuple(int(s) for s in shape)
        x = self.bits(stream, math.prod(shape), offset)
        if dtype == torch.float64:
            u = ((x >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(2.0**-53).add_(2.0**-54)
        else:
            u = ((x >> 40) & ((1 << 24) - 1)).to(torch.float32).mul_(2.0**-24).add_(2.0**-25)
            u = u.to(dtype)
        return u.view(len(self), *shape)


class NoiseBlocks:
    """Noise for many future steps drawn in one call (per-step overhead matters at batch 1).

    Block size depends only on the per-row shape, never on the batch size, so the values a row
    gets for a step are independent of the batch composition.
    """

    def __init__(
        self,
        rng: RowRandom,
        purpose: int,
        shape: Sequence[int],
        dtype,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.rng, self.purpose, self.shape, self.dtype = rng, purpose, tuple(shape), dtype
        self.transform = transform  # uniforms -> the values wanted (e.g. a head's `noise_from_uniform`)
        per_step = max(1, math.prod(self.shape))
        self.block = max(1, min(64, (1 << 16) // per_step))
        self._index = -1
        self._values: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        if self._values is not None:
            self._values = self._values[rows]

    def get(self, step: int | torch.Tensor) -> torch.Tensor:
        """The values of `step` [B, *shape]. ``step`` may be a LongTensor [B] of per-row steps
        (rows at different steps): each row gets the values of its own step, drawn directly
        (the same values as from its block)."""
        if isinstance(step, torch.Tensor):
            per_step = max(1, math.prod(self.shape))
            index, offset = step // self.block, step % self.block
            u = self.rng.uniform(
                (self.purpose, index), (1, *self.shape), self.dtype, offset=offset * per_step
            )
            return (self.transform(u) if self.transform is not None else u)[:, 0]
        index, offset = divmod(step, self.block)
        if index != self._index:
            u = self.rng.uniform((self.purpose, index), (self.block, *self.shape), self.dtype)
            self._values = self.transform(u) if self.transform is not None else u
            self._index = index
        return self._values[:, offset]
