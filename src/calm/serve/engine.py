"""The continuous-batching decode engine behind `calm serve`: one model, one decoding thread.

Requests become `Sequence`s (one per prompt). The engine keeps the running ones in one batch
and, each step, (1) drops sequences whose client went away, (2) admits waiting ones up to
``max_rows`` — each prompt is prefilled alone, exactly as ``generate([prompt])`` prefills it,
and its keys and values join the batch's `StaticKVCache` as a new row —, (3) samples the next
element of every row (a token for the baseline, a chunk of K tokens for CALM), (4) hands each
row's new text to its request, drops the rows that finished, and (5) advances the backbone by
one position for the rest. A request therefore joins at the next step and leaves at once.

Same output whatever else is in the batch: every row draws its noise from its own seed's
counter-based streams (`calm.rng.RowRandom`) at its *own* step number (per-row steps), and each
row's computation does not depend on the other rows (per-row positions and cache fill,
`StaticKVCache`), so a request's tokens equal ``model.generate([prompt], seed=s)`` (float
rounding aside: a batched matmul may round differently from a single-row one). Rows with
different sampling settings (temperature, sampler, num_samples) are sampled group by group.

Cache layout: the batch holds only running rows (no idle slots computed each step); the slot
count is the largest need of a running row (prompt + continuation, rounded up to 16), grown
when a longer one joins and cut when the longest leaves.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from calm import generation as gen
from calm.calm_sampler import ChunkSampler
from calm.fast_decode import ChunkInputTable
from calm.models.transformer import StaticKVCache
from calm.rng import NoiseBlocks, RowRandom

__all__ = ["Engine", "EngineStopped", "Event", "Sampling", "Sequence"]

SLOT_ROUNDING = 16  # slot counts are multiples of this (fewer reallocations as rows come and go)


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class Sampling(NamedTuple):
    """How a row chooses its next element (rows with equal settings are sampled together)."""

    temperature: float = 1.0
    sampler: str = "exact"  # CALM at T < 1
    num_samples: int = 200  # CALM: N of the approx sampler, the exact sampler's bound on draws


@dataclass
class Event:
    """What a sequence sends its request after a step: new text, and at the end the reason."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of text or a stop sequence) or "length"
    completion_tokens: int = 0
    error: str | None = None  # the engine failed; the sequence is over


@dataclass(eq=False)
class Sequence:
    """One prompt's generation. ``emit(event)`` is called from the engine thread."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    text: object  # a `calm.serve.text.CompletionText`
    emit: Callable[[Event], None]
    need: int = 0  # backbone slots (set by `Engine.submit`)
    step: int = 0  # decoding steps done: the row's random streams are keyed by it
    tokens: int = 0  # completion tokens so far
    ignore_eos: bool = False  # go on past the end-of-text token (benchmarks: fixed lengths)
    first_block: int = 0  # CALM's exact sampler: draws its last step needed (0: none yet)
    cancelled: bool = False
    done: bool = False


@dataclass
class EngineStats:
    """Counters since start (ChunkSampler adds its draws; see `calm.generation.GenerationStats`)."""

    requests: int = 0  # sequences finished (any reason)
    steps: int = 0
    row_steps: int = 0  # sum over steps of the rows in the batch
    tokens: int = 0  # completion tokens sent
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draws: int = 0
    decoded_positions: int = 0
    exact_hit_limit: int = 0
    fused_draws: int = 0
    errors: int = 0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["mean_batch_rows"] = self.row_steps / self.steps if self.steps else 0.0
        return d


@dataclass
class _Batch:
    rows: list[Sequence] = field(default_factory=list)
    cache: StaticKVCache | None = None
    h: torch.Tensor | None = None  # [B, d]: each row's last hidden state


class Engine:
    """Continuous batching over one CALM or baseline model (see the module docstring).

    max_rows: rows decoded together; max_queue: sequences waiting for a row beyond those.
    `submit` refuses (returns False) when running + waiting would exceed their sum.
    fused_kernel: as `calm.generation.generate`'s (CALM on the CPU, steps of <= 8 latents).
    """

    def __init__(self, model, *, max_rows: int = 32, max_queue: int = 256, fused_kernel: bool | None = None):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows}, {max_queue}")
        self.kind = gen._model_kind(model)
        self.model = model.eval()
        cfg = model.config
        self.K = cfg.chunk_size if self.kind == "calm" else 1
        self.context = cfg.max_seq_len  # backbone positions (chunks for CALM)
        self.vocab_size = cfg.vocab_size
        self.eos = gen._special_id(model, "eot_id", gen._DEFAULT)
        pad = gen._special_id(model, "pad_id", gen._DEFAULT)
        self.pad = 0 if pad is None else pad
        self.device = next(model.parameters()).device
        self.max_rows, self.max_queue = max_rows, max_queue
        self.table = self.fused = None
        if self.kind == "calm":  # built (and compiled) now, not on the first request
            self.table = ChunkInputTable.for_model(model)
            self.fused = gen._fused_kernel(fused_kernel, model)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._load = 0  # sequences running or waiting
        self._batch = _Batch()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the request side (any thread) ----------------------------------------------------------
    def slots_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """Backbone positions a sequence occupies: its prompt and its continuation but the last."""
        return -(-prompt_tokens // self.K) + -(-max_tokens // self.K) - 1

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queue sequences (all or none). False when the engine is full; EngineStopped when
        it is shutting down."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if self._load + len(seqs) > self.max_rows + self.max_queue:
                return False
            for s in seqs:
                s.need = self.slots_needed(len(s.prompt), s.max_tokens)
            self._waiting.extend(seqs)
            self._load += len(seqs)
            self._cond.notify()
        return True

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves the batch at the next step."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            waiting = len(self._waiting)
            load = self._load
        return {
            "running": load - waiting,
            "waiting": waiting,
            "max_rows": self.max_rows,
            "max_queue": self.max_queue,
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="calm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; sequences still running or waiting get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._batch.rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                self.step()
        with self._cond:
            left = self._batch.rows + list(self._waiting)
            self._waiting.clear()
        self._batch = _Batch()
        for s in left:
            if not s.done:
                self._finish(s, Event(error="the server shut down before this completion finished"))

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration of the engine thread: drop cancelled rows, admit waiting sequences
        into free rows (prefill), decode one step of the batch. (Tests call it directly on an
        engine that was not started.)"""
        new = []
        try:
            self._drop([i for i, s in enumerate(self._batch.rows) if s.cancelled])
            with self._cond:
                while self._waiting and len(new) < self.max_rows - len(self._batch.rows):
                    new.append(self._waiting.popleft())
            new = [s for s in new if not self._retire_if_cancelled(s)]
            self._admit(new)
            if self._batch.rows:
                self._step()
        except Exception as err:  # a bug or out of memory: fail these, keep serving
            traceback.print_exc()
            self.stats.errors += 1
            failed = [s for s in self._batch.rows + new if not s.done]
            self._batch = _Batch()
            for s in failed:
                self._finish(s, Event(error=f"generation failed: {type(err).__name__}: {err}"))

    @property
    def rows(self) -> list[Sequence]:
        """The sequences in the batch now, in row order."""
        return list(self._batch.rows)

    @property
    def slots(self) -> int:
        """The batch cache's slot count (0 when the batch is empty)."""
        return 0 if self._batch.cache is None else self._batch.cache.max_len

    def _finish(self, seq: Sequence, event: Event | None) -> None:
        seq.done = True
        with self._cond:
            self._load -= 1
        self.stats.requests += 1
        if event is not None:
            seq.emit(event)

    def _retire_if_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled and not seq.done:
            self._finish(seq, None)
        return seq.cancelled

    def _drop(self, leaving: list[int]) -> None:
        """Remove rows (finished or cancelled) from the batch, its cache and hidden states."""
        if not leaving:
            return
        b = self._batch
        gone = set(leaving)
        for i in leaving:
            if not b.rows[i].done:
                self._finish(b.rows[i], None)
        keep = [i for i in range(len(b.rows)) if i not in gone]
        b.rows = [b.rows[i] for i in keep]
        if not keep:
            self._batch = _Batch()
            return
        idx = torch.tensor(keep, device=self.device)
        b.cache.select(idx)
        b.h = b.h.index_select(0, idx)
        self._fit(max(s.need for s in b.rows))

    def _fit(self, need: int) -> None:
        """Slots for the longest row: grow to fit it, shrink when it needs half or less."""
        cache = self._batch.cache
        target = -(-need // SLOT_ROUNDING) * SLOT_ROUNDING
        if need > cache.max_len or target <= cache.max_len // 2:
            cache.resize(target)

    def _prefill(self, seq: Sequence):
        """The prompt alone through the backbone into its own KVCache (as `generate` does)."""
        m, K = self.model, self.K
        tokens, token_valid = gen.prepare_prompts([seq.prompt], self.pad, K, self.device)
        if self.kind == "ar":
            cache = m.new_cache(1, tokens.shape[1])
            h = m.backbone(m.embed(tokens), positions=gen._positions(token_valid), cache=cache)[:, -1]
            return cache, h
        chunks, token_valid = tokens.view(1, -1, K), token_valid.view(1, -1, K)
        chunk_valid = token_valid.any(-1)
        padded = not bool(token_valid.all())
        cache = m.new_cache(1, chunks.shape[1])
        h = m.hidden(
            chunks,
            token_valid=token_valid if padded else None,
            positions=gen._positions(chunk_valid),
            valid=chunk_valid if padded else None,
            cache=cache,
        )[:, -1]
        return cache, h

    def _admit(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        t0 = time.perf_counter()
        prefilled = [self._prefill(s) for s in seqs]
        b = self._batch
        need = max(s.need for s in b.rows + seqs)
        if b.cache is None:
            slots = -(-need // SLOT_ROUNDING) * SLOT_ROUNDING
            b.cache = StaticKVCache.from_cache(prefilled[0][0], slots)
            b.h = prefilled[0][1]
            b.rows = [seqs[0]]
            prefilled, seqs = prefilled[1:], seqs[1:]
        self._fit(need)
        if seqs:
            slots = b.cache.max_len
            b.cache.extend(*[StaticKVCache.from_cache(c, slots) for c, _ in prefilled])
            b.h = torch.cat([b.h, *[h for _, h in prefilled]])
            b.rows.extend(seqs)
        self.stats.prefill_s += time.perf_counter() - t0

    def _step(self) -> None:
        t0 = time.perf_counter()
        b = self._batch
        steps = torch.tensor([s.step for s in b.rows], device=self.device)
        out = self._sample(b.rows, b.h, steps)  # [B, K]
        pieces = out.tolist()
        self.stats.steps += 1
        self.stats.row_steps += len(b.rows)
        finished = []
        for i, (seq, piece) in enumerate(zip(b.rows, pieces)):
            seq.step += 1
            if not self._push(seq, piece):
                finished.append(i)
        if finished:
            keep = [i for i in range(len(b.rows)) if i not in set(finished)]
            self._drop(finished)
            if not keep:
                self.stats.decode_s += time.perf_counter() - t0
                return
            out = out[keep]
        pos = b.cache.pos[:, None].clone()  # per-row positions: a row's slots are 0, 1, ...
        if self.kind == "ar":
            b.h = gen._ar_advance(self.model, b.cache, out, pos)
        else:
            b.h = gen._calm_advance(self.model, self.table, b.cache, out, pos)
        self.stats.decode_s += time.perf_counter() - t0

    def _sample(self, rows: list[Sequence], h: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(rows):
            groups.setdefault(s.sampling, []).append(i)
        if len(groups) == 1:
            return self._sample_group(rows[0].sampling, rows, h, steps)
        out = torch.empty((len(rows), self.K), dtype=torch.long, device=self.device)
        for sampling, idx in groups.items():
            it = torch.tensor(idx, device=self.device)
            out[it] = self._sample_group(sampling, [rows[i] for i in idx], h[it], steps[it])
        return out

    def _sample_group(self, sampling: Sampling, rows, h, steps) -> torch.Tensor:
        rng = RowRandom([s.seed for s in rows], self.device)
        if self.kind == "ar":
            u = NoiseBlocks(rng, gen.AR_CHOICE_STREAM, (), torch.float64).get(steps)
            return gen._ar_choice(self.model, h, u, 1.0 / sampling.temperature)
        sampler = ChunkSampler(
            self.model,
            rng,
            temperature=sampling.temperature,
            sampler=sampling.sampler,
            num_samples=sampling.num_samples,
            stats=self.stats,
            fused_kernel=self.fused,
        )
        # The exact sampler sizes a step's first block of draws by what the previous step
        # needed (as in `generate`); the group's sampler is rebuilt each step (its rows change),
        # so the rows carry that size. It changes the cost only, never the draws.
        sampler.first_block = max(s.first_block or sampler.first_block for s in rows)
        out = sampler(h, steps)
        for s in rows:
            s.first_block = sampler.first_block
        return out

    def _push(self, seq: Sequence, piece: list[int]) -> bool:
        """Record a row's new tokens and send its text; False when the sequence has ended."""
        piece = piece[: seq.max_tokens - seq.tokens]
        finish = None
        eos = None if seq.ignore_eos else self.eos
        if eos is not None and eos in piece:
            piece = piece[: piece.index(eos) + 1]
            finish = "stop"
        seq.tokens += len(piece)
        text = seq.text.push(piece)
        if seq.text.stopped:
            finish, seq.tokens = "stop", seq.text.stop_tokens
        elif finish is None and seq.tokens >= seq.max_tokens:
            finish = "length"
        if finish is not None:
            text += seq.text.finish()
        self.stats.tokens += len(piece)
        if seq.cancelled:
            return False
        if finish is not None:
            self._finish(seq, Event(text, finish, seq.tokens))
            return False
        if text:
            seq.emit(Event(text, None, seq.tokens))
        return True
