"""What a `calm.generation.generate` call records as it decodes: the output rows with their
end-of-text and streaming bookkeeping (`_Rows`), the per-phase timer used with ``profile=True``
(`_Timer`), and the returned `GenerationStats`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class GenerationStats:
    """What a `generate` call did. Times are seconds (wall clock)."""

    kind: str
    batch_size: int
    steps: int = 0  # decoding steps (tokens for AR, chunks for CALM) after the prompt
    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finished_by_eos: list[bool] = field(default_factory=list)
    time_s: float = 0.0
    prefill_s: float = 0.0
    sampler: str | None = None
    temperature: float = 1.0
    num_candidates: int | None = None
    draws: int = 0  # CALM: head samples decoded (all rows, all steps)
    exact_hit_limit: int = 0  # CALM exact sampler: rows x steps that hit max_draws (fallback used)
    decoded_positions: int = 0  # CALM: token positions decoded = vocabulary rows scored (all rows, steps)
    fused_draws: int = 0  # CALM: of `draws`, those decoded by the compiled kernel (calm.fused_decode)
    phases: dict[str, float] = field(default_factory=dict)  # with profile=True: time per phase

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.total_new_tokens / self.time_s if self.time_s > 0 else float("nan")

    @property
    def draws_per_row_step(self) -> float:
        """CALM: mean head samples decoded per row and step."""
        return self.draws / max(1, self.steps * self.batch_size)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["total_new_tokens"] = self.total_new_tokens
        d["tokens_per_s"] = self.tokens_per_s
        d["draws_per_row_step"] = self.draws_per_row_step
        return d


class _Timer:
    """Accumulates wall time per phase when profiling (synchronising CUDA), else does nothing."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.phases: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            self.phases[name] = self.phases.get(name, 0.0) + t - self._t
            self._t = t


class _Rows:
    """Output buffer, end-of-text bookkeeping, streaming, and dropping finished rows."""

    def __init__(self, B: int, width: int, max_new: int, eos_id: int | None, stream, device, pad_id: int):
        self.out = torch.full((B, width), pad_id, dtype=torch.long, device=device)
        self.max_new = max_new
        self.eos_id = eos_id
        self.stream = stream
        self.active = torch.arange(B, device=device)  # original index of each batch row
        self.active_list = list(range(B))
        self.all_rows = True  # no row dropped yet: write with a plain slice
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # over the current rows
        self.filled = 0
        self.streamed_done = [False] * B  # per original row: its end has been streamed

    def push(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Record new tokens [b, k] of the current rows. Returns the rows to keep when some rows
        have just finished (or None); all finished -> an empty tensor."""
        k = tokens.shape[1]
        start = self.filled
        if self.all_rows:
            self.out[:, start : start + k] = tokens
        else:
            self.out[self.active, start : start + k] = tokens
        self.filled += k
        if self.stream is not None:
            self._stream(tokens, start)
        if self.eos_id is None:
            return None
        self.done |= (tokens == self.eos_id).any(1)
        if not bool(self.done.any()):
            return None
        return (~self.done).nonzero().squeeze(1)

    def _stream(self, tokens: torch.Tensor, start: int) -> None:
        room = self.max_new - start
        if room <= 0:
            return
        for row, piece in zip(self.active_list, tokens[:, :room].tolist()):
            if self.streamed_done[row]:
                continue
            if self.eos_id is not None and self.eos_id in piece:
                piece = piece[: piece.index(self.eos_id) + 1]
                self.streamed_done[row] = True
            self.stream(row, piece)

    def select(self, keep: torch.Tensor) -> None:
        self.active = self.active[keep]
        self.all_rows = False
        self.done = self.done[keep]
        self.active_list = self.active.tolist()

    def results(self) -> tuple[list[list[int]], list[bool]]:
        rows = self.out[:, : self.filled].tolist()
        out, by_eos = [], []
        for r in rows:
            r = r[: self.max_new]
            stop = r.index(self.eos_id) + 1 if self.eos_id is not None and self.eos_id in r else None
            out.append(r[:stop] if stop else r)
            by_eos.append(stop is not None)
        return out, by_eos
