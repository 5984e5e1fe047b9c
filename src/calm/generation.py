"""Text generation for CALM and the token baseline: batching, KV cache, temperature, streaming.

`generate(model, input_ids, max_new_tokens=..., temperature=..., ...)` works for both model
kinds; `CALM.generate` and `TokenTransformer.generate` delegate here.

Batches of prompts of different lengths
    Prompts are **left-padded** to a common length so that every row's next element is
    produced at the same slot. Pad slots are invisible: they are marked invalid (``valid``),
    never attended to by real positions, and each row gets its own position ids, so its first
    real element sits at position 0 whatever the padding (`calm.models.transformer`). No pad is
    ever inside a row's context.

    CALM consumes chunks of K tokens. A prompt of L tokens becomes ceil(L/K) chunks; if L is not
    a multiple of K, the *first* chunk is partial: it is left-padded with pad tokens whose
    embeddings `CALM.chunk_inputs` zeroes (``token_valid``), so it carries its real tokens only,
    and the prompt's last chunk is complete, so generation continues right after the prompt's
    last token. Shorter prompts are further left-padded with whole pad chunks, which are invalid
    backbone slots like the AR pads. A padded row thus computes exactly what the same prompt run
    alone computes (tests/test_generation.py checks the hidden states and the continuations).

Randomness: batched generation == one-by-one generation
    Every row draws its noise (the CALM head's noise, the AR sampler's uniforms, the CALM
    samplers' selection uniforms) from its own counter-based stream (`RowRandom`): a value is a
    pure function of (the row's seed, the step, the index), so a row's output does not depend
    on which other rows share the batch, and blocks of future noise can be drawn at once. Row
    b of ``generate(prompts, seed=s)`` uses seed ``s + b``, so
    ``generate([p0, p1], seed=s)[1] == generate([p1], seed=s + 1)[0]``; a list of seeds, one per
    prompt, is accepted as well. This holds for both samplers at every temperature: the exact
    sampler's draws, its Bernoulli-factory coins and its fallback choice come from the row's
    stream too, and it draws only for the rows still sampling.

Temperature
    AR: softmax(logits / T), any T > 0. CALM has no logits: T in (0, 1] through
    `calm.sampling`. ``sampler="exact"`` (the default): rejection sampling that draws in
    doubling blocks (8, 16, 32, 64, ...) only until it accepts, at most N = ``num_candidates``
    draws per row and step; a row that reaches N gets the batch approximation over its N
    draws. Its cost follows how peaked the model's P is: a confident model needs ~20 draws per
    step at T = 0.5 instead of 200 (benchmarks/bench_decode.py: 3x faster than "approx" at
    batch 1, 9x at batch 16), a flat one costs the N draws of "approx" in a few calls.
    ``sampler="approx"``: the paper's batch approximation, N head samples decoded and
    reweighted in one batched pass.
    T = 1 is one head sample. T > 1 is impossible without logits (see `check_temperature`).

Decoding the candidates is the cost of low temperature
    At N = 200 every step decodes 200 latents per row through the autoencoder decoder, and the
    vocabulary projection (K · V · d per candidate) dominates. `tied_argmax` takes that argmax
    exactly but cheaply where bf16 matrix units exist (AMX CPUs, CUDA): a bf16 matmul gives
    every logit within a proven error bound, only the groups of 16 tokens that can still hold
    the maximum are rescored in float32, and the result is the float32 argmax. The decoder
    trunk before that projection stays in the model's dtype; ``decode_dtype=torch.bfloat16``
    runs head and decoder on bf16 copies instead (faster for many candidates, not exact).
    Each step's CALM input (the chunk just produced) is K rows of a precomputed table
    (`calm.fast_decode.ChunkInputTable`), not a matmul over the K·d flattened embeddings.
    With a few rows per step (batch 1 at T = 1, the first blocks of the exact sampler) on CPU,
    head + decoder + argmax run as one compiled call (`calm.fused_decode`) instead of ~80
    small PyTorch ops whose dispatch costs more than their arithmetic. That kernel runs the
    energy head only: a flow or diffusion head (``config.head``) always takes the PyTorch path,
    where its noise (Gaussian, from the same per-row streams through the head's
    ``noise_from_uniform``) and its sampling steps (``model.set_head_sampling``) apply.
    Identical chunks are counted with tensor ops (`calm.sampling.chunk_counts`) and one chunk
    is chosen per row (`choose_approx`), without a loop over rows; this bookkeeping is well
    under 1% of a step at N = 200 (benchmarks/bench_decode.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from calm import fused_decode
from calm.fast_decode import ChunkInputTable, decode_chunks, low_precision_copies, tied_argmax
from calm.sampling import inverse_cdf_choice, sample_approx, sample_exact, split_inverse_temperature

__all__ = [
    "GenerationError",
    "GenerationStats",
    "RowRandom",
    "check_temperature",
    "choose_approx",
    "decode_chunks",
    "generate",
    "prepare_prompts",
    "tied_argmax",
]

SAMPLERS = ("approx", "exact")
_EXACT_MAX_BLOCK = 64  # the exact sampler's draws per call double up to this
_DEFAULT = object()  # "take it from the model / tokenizer"


class GenerationError(ValueError):
    """Bad arguments to `generate` (the message says which and why)."""


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

    def bits(self, stream: Sequence[int], n: int, offset: int = 0) -> torch.Tensor:
        """[B, n] int64 random bits: elements offset .. offset + n - 1 of the counter ``stream``
        (a tuple of non-negative ints), so consecutive calls can continue one sequence."""
        salt = 0x5851F42D4C957F2D
        for s in stream:
            salt = _mix64_int(salt ^ _mix64_int(int(s) + 0x2545F4914F6CDD1D))
        key = _mix64(self.keys ^ _signed64(salt)).view(-1, 1)
        return _mix64(key + self._index(n, offset))

    def uniform(
        self, stream: Sequence[int], shape: Sequence[int] = (), dtype=torch.float32, *, offset: int = 0
    ) -> torch.Tensor:
        """[B, *shape] uniforms in (0, 1): 24 random bits for float32/bf16/fp16, 53 for float64;
        elements `offset` onwards of the stream (row-major over `shape`)."""
        shape = tuple(int(s) for s in shape)
        x = self.bits(stream, math.prod(shape), offset)
        if dtype == torch.float64:
            u = ((x >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(2.0**-53).add_(2.0**-54)
        else:
            u = ((x >> 40) & ((1 << 24) - 1)).to(torch.float32).mul_(2.0**-24).add_(2.0**-25)
            u = u.to(dtype)
        return u.view(len(self), *shape)


class _NoiseBlocks:
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

    def get(self, step: int) -> torch.Tensor:
        index, offset = divmod(step, self.block)
        if index != self._index:
            u = self.rng.uniform((self.purpose, index), (self.block, *self.shape), self.dtype)
            self._values = self.transform(u) if self.transform is not None else u
            self._index = index
        return self._values[:, offset]


# ---------------------------------------------------------------------------------------------
# Choosing among candidates


def choose_approx(candidates: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One chunk per row from candidates [B, N, K] with `calm.sampling`'s batch estimator of
    P^(1/T): identical chunks counted with tensor ops, weighted, and one picked by inverse CDF
    with the given per-row uniforms [B] (so the choice of a row depends on its own noise only).
    The same distribution as `calm.sampling.sample_approx`, whose Gumbel noise is drawn for the
    whole batch at once. This is the sampler's whole bookkeeping."""
    return sample_approx(candidates, temperature, uniforms=uniforms)


# ---------------------------------------------------------------------------------------------
# Argument checks


def check_temperature(temperature: float, kind: str) -> float:
    """Validate a temperature for a model kind ("calm" or "ar"); returns it as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        try:
            temperature = float(temperature)
        except (TypeError, ValueError) as err:
            raise GenerationError(f"temperature must be a number, got {temperature!r}") from err
    t = float(temperature)
    if math.isnan(t):
        raise GenerationError("temperature is NaN")
    if t <= 0:
        raise GenerationError(
            f"temperature must be > 0, got {t:g} (for near-greedy decoding use a small positive value"
            + (", e.g. 0.1 with the approx sampler)" if kind == "calm" else ", e.g. 1e-3)")
        )
    if kind == "calm" and t > 1:
        raise GenerationError(
            f"temperature {t:g} > 1 is impossible for CALM: it has no logits, only a sampler of P. "
            "Sampling P(x)^(1/T)/Z with T > 1 flattens P, and that needs the probabilities P(x) "
            "themselves; draws from P can only sharpen it, by rewarding agreement between draws "
            "(T = 1/n: n identical draws). Use 0 < T <= 1."
        )
    if kind == "calm":
        try:
            split_inverse_temperature(t)
        except (ValueError, TypeError) as err:
            raise GenerationError(str(err)) from err
    return t


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise GenerationError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        return input_ids.tolist()
    if isinstance(input_ids, (str, bytes)):
        raise GenerationError("input_ids must be token ids, not text: encode it with model.tokenizer.encode")
    try:
        prompts = list(input_ids)
    except TypeError as err:
        raise GenerationError(
            f"input_ids must be a list of token lists or a LongTensor, got {input_ids!r}"
        ) from err
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # a single prompt
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise GenerationError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        p = list(p)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise GenerationError(f"prompt {i} must contain integer token ids")
        out.append(p)
    return out


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(
                f"prompt {i} is empty: give at least one token (e.g. the end-of-text id to start a fresh document)"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise GenerationError(f"prompt {i} has token id {bad} outside the vocabulary [0, {vocab_size})")


def prepare_prompts(
    prompts: list[list[int]], pad_id: int, chunk_size: int = 1, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to a common length that is a multiple of `chunk_size`.

    Returns tokens [B, T] (pad_id in the padding) and token_valid [B, T] (False on pads).
    T = chunk_size · max_b ceil(L_b / chunk_size).
    """
    K = chunk_size
    width = K * max(-(-len(p) // K) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    token_valid = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    return tokens.to(device), token_valid.to(device)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """Per-row position ids for a left-padded validity mask: first real element at 0."""
    return (valid.long().cumsum(1) - 1).clamp_(min=0)


def _row_seeds(seed, generator: torch.Generator | None, B: int) -> list[int]:
    if seed is not None and generator is not None:
        raise GenerationError("give either seed or generator, not both")
    if generator is not None:
        return torch.randint(0, 2**62, (B,), generator=generator, device=generator.device).tolist()
    if seed is None:
        return torch.randint(0, 2**62, (B,)).tolist()  # from torch's global RNG (torch.manual_seed)
    if isinstance(seed, bool):
        raise GenerationError(f"seed must be an integer or a list of integers, got {seed!r}")
    if isinstance(seed, int):
        return [seed + b for b in range(B)]
    seeds = list(seed)
    if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GenerationError(
            f"seed must be an integer or a list of {B} integers (one per prompt), got {seed!r}"
        )
    return seeds


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


# ---------------------------------------------------------------------------------------------
# generate()


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_DTYPES.update({"float32": torch.float32, "fp32": torch.float32})


def _decode_dtype(value, model) -> torch.dtype | None:
    """None, or the dtype for CALM's head and decoder (None if it is the model's)."""
    if value is None or value == "model":
        return None
    dtype = _DTYPES.get(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GenerationError(f"decode_dtype must be None, 'bfloat16', 'float16' or 'float32', got {value!r}")
    return None if dtype == next(model.parameters()).dtype else dtype


def _fused_kernel(choice, model, decode_dtype) -> fused_decode.FusedHeadDecoder | None:
    """The `calm.fused_decode` kernel for CALM's small decoding steps, or None (see `generate`)."""
    if choice is False or _model_kind(model) != "calm":
        return None
    if choice not in (None, True):
        raise GenerationError(f"fused_kernel must be None, True or False, got {choice!r}")
    kernel, reason = None, None
    if decode_dtype is not None:
        reason = "decode_dtype asks for low-precision copies, which the kernel does not run"
    else:
        try:
            kernel = fused_decode.kernel_for(model.head, model.autoencoder)
        except fused_decode.KernelUnavailable as e:
            reason = str(e)
    if reason is not None and choice:
        raise GenerationError(f"fused_kernel=True but the fused decode kernel cannot be used: {reason}")
    return kernel


def _model_kind(model) -> str:
    kind = getattr(getattr(model, "config", None), "kind", None)
    if kind not in ("calm", "ar"):
        raise GenerationError(
            f"generate needs a CALM or token-level (ar) model, got {type(model).__name__}"
            + (f" of kind {kind!r}" if kind else "")
            + (" (an autoencoder reconstructs chunks; it does not generate)" if kind == "autoencoder" else "")
        )
    return kind


def _special_id(model, name: str, value):
    if value is not _DEFAULT:
        return None if value is None else int(value)
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, name, None) is not None:
        return int(getattr(tok, name))
    ae = getattr(model.config, "autoencoder", None) or {}
    if name in ae:
        return int(ae[name])
    return None


@torch.inference_mode()
def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    sampler: str = "exact",
    num_candidates: int = 200,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = _DEFAULT,
    pad_id: int | None = _DEFAULT,
    stream: Callable[[int, list[int]], None] | None = None,
    max_draws: int | None = None,
    draws_per_call: int = 8,
    drop_finished: bool = True,
    screen: bool | None = None,
    decode_dtype: torch.dtype | str | None = None,
    fused_kernel: bool | None = None,
    profile: bool = False,
    return_stats: bool = False,
):
    """Continue each prompt by up to `max_new_tokens` tokens. Returns the new tokens per row.

    Args:
        model: a CALM model (`calm.models.calm.CALM`) or the token baseline
            (`calm.models.ar.TokenTransformer`), e.g. from `calm.load(path)`.
        input_ids: a list of prompts (lists of token ids, any lengths), a single prompt (a
            list of ids), or a LongTensor [B, T] / [T].
        max_new_tokens: tokens to generate per row (>= 1). CALM produces K per step; the
            output is cut to exactly this many.
        temperature: AR: any T > 0 (softmax(logits / T)). CALM: 0 < T <= 1 (no logits).
        sampler: CALM at T < 1: "exact" (default; `calm.sampling.sample_exact`: exact
            P^(1/T) for the rows that accept within the bound of draws, cost adapts to how
            peaked P is; rows that reach the bound get the approx choice over their draws) or
            "approx" (N candidates per step, `calm.sampling`'s batch estimator).
        num_candidates: N for the approx sampler (200 is the paper's choice near T = 0.5), and
            the exact sampler's default bound on draws per row and step.
        seed: int (row b uses seed + b) or one int per prompt: reproducible, and a row's output
            does not depend on the other rows in the batch. None: seeds from torch's global RNG.
        generator: alternatively a torch.Generator from which the row seeds are drawn.
        eos_id: end-of-text id: a row stops after producing it, and its output ends with it.
            Default: the tokenizer's (or the autoencoder config's) eot id; None: never stop.
        pad_id: id written into padding (invisible either way). Default: the tokenizer's.
        stream: ``stream(row, tokens)`` is called as tokens are produced (in order; per row the
            pieces concatenate to that row's returned tokens).
        max_draws, draws_per_call: the exact sampler's bound on draws per row and step
            (default: num_candidates) and its first block of draws (doubling per call, up to
            64); see `calm.sampling.sample_exact`.
        drop_finished: remove finished rows from the batch (and KV cache) to save compute.
        screen: force (True) or forbid (False) the bf16-screened exact argmax of `tied_argmax`
            for decoding CALM's candidates through PyTorch; None: automatic. (The fused kernel
            takes the float32 argmax directly.)
        decode_dtype: run CALM's head and autoencoder decoder in this dtype (cached
            copies of their weights), e.g. torch.bfloat16: faster where bf16 matmuls are fast
            (AMX CPUs, CUDA), most at T < 1 where every step decodes N candidates (at T = 1 and
            batch 1 on CPU it can be slower: one-row bf16 matmuls cost more than float32 ones
            there), but a latent whose top two token logits are within bf16 rounding may decode
            differently. Default None: the model's own dtype (exact decoding; the vocabulary
            argmax is still bf16-screened where that is exact, see `tied_argmax`).
        fused_kernel: CALM on CPU: decode steps of at most `calm.fused_decode.MAX_ROWS`
            latents with the compiled head + decoder + argmax kernel (the same tokens up to
            float32 rounding; compiled on first use). None (default): where it applies and
            compiles; True: require it (GenerationError saying why if it cannot be used, e.g.
            for a flow or diffusion head, which the kernel does not run); False: always the
            PyTorch modules.
        profile: time the phases of a step (in stats.phases; synchronises CUDA).
        return_stats: also return a `GenerationStats`.
    """
    kind = _model_kind(model)
    prompts = _as_prompts(input_ids)
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    temperature = check_temperature(temperature, kind)
    if kind == "calm":
        if sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise GenerationError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")
        if max_draws is None:
            max_draws = num_candidates
        if isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < 1:
            raise GenerationError(f"max_draws must be an integer >= 1, got {max_draws!r}")
        if isinstance(draws_per_call, bool) or not isinstance(draws_per_call, int) or draws_per_call < 1:
            raise GenerationError(f"draws_per_call must be an integer >= 1, got {draws_per_call!r}")
    elif sampler not in SAMPLERS:
        raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    K = cfg.chunk_size if kind == "calm" else 1
    context = cfg.max_seq_len  # backbone positions: chunks for CALM, tokens for AR
    steps = -(-max_new_tokens // K)
    unit = f"chunks of {K} tokens" if K > 1 else "tokens"
    for i, p in enumerate(prompts):
        n = -(-len(p) // K)
        if n > context:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens ({n} {unit}), longer than the model's context of "
                f"{context} {unit} ({context * K} tokens)"
            )
        if n + steps - 1 > context:
            room = (context - n + 1) * K
            raise GenerationError(
                f"prompt {i} ({len(p)} tokens) + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"of {context * K} tokens ({context} {unit}); use max_new_tokens <= {room} or a shorter prompt"
            )
    eos = _special_id(model, "eot_id", eos_id)
    pad = _special_id(model, "pad_id", pad_id)
    if pad is None:
        pad = 0
    if not 0 <= pad < cfg.vocab_size:
        raise GenerationError(f"pad_id {pad} is outside the vocabulary [0, {cfg.vocab_size})")
    if eos is not None and not 0 <= eos < cfg.vocab_size:
        raise GenerationError(f"eos_id {eos} is outside the vocabulary [0, {cfg.vocab_size})")

    B = len(prompts)
    device = next(model.parameters()).device
    rng = RowRandom(_row_seeds(seed, generator, B), device)
    stats = GenerationStats(
        kind=kind,
        batch_size=B,
        prompt_tokens=[len(p) for p in prompts],
        sampler=sampler if kind == "calm" else None,
        temperature=temperature,
        num_candidates=num_candidates if kind == "calm" and sampler == "approx" and temperature < 1 else None,
    )
    low_dtype = _decode_dtype(decode_dtype, model) if kind == "calm" else None
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        if kind == "ar":
            rows = _generate_ar(
                model, prompts, steps, temperature, rng, eos, pad, stream, drop_finished, stats, profile
            )
        else:
            rows = _generate_calm(
                model,
                prompts,
                steps,
                max_new_tokens,
                rng,
                stats,
                T=temperature,
                sampler=sampler,
                N=num_candidates,
                eos=eos,
                pad=pad,
                stream=stream,
                drop_finished=drop_finished,
                max_draws=max_draws,
                draws_per_call=draws_per_call,
                screen=screen,
                decode_dtype=low_dtype,
                fused_kernel=_fused_kernel(fused_kernel, model, low_dtype),
                profile=profile,
            )
    finally:
        model.train(was_training)
    out, by_eos = rows.results()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats.time_s = time.perf_counter() - t0
    stats.new_tokens = [len(r) for r in out]
    stats.finished_by_eos = by_eos
    return (out, stats) if return_stats else out


def _decode_loop(h, pos, steps, sample, advance, rows, row_state, drop_finished, stats, timer) -> None:
    """The decoding loop shared by both model kinds: sample the next element(s) of every row
    from its hidden state, record them, drop rows that ended (from the KV cache and every
    per-row random stream in `row_state` too), and advance the backbone by one position."""
    for step in range(steps):
        out = sample(h, step)
        keep = rows.push(out)
        stats.steps += 1
        if keep is not None:
            if keep.numel() == 0:
                break
            if drop_finished:
                for state in row_state:
                    state.select(keep)
                rows.select(keep)
                out, pos = out[keep], pos[keep]
        if step == steps - 1:
            break
        timer.lap("bookkeeping")
        h = advance(out, pos)
        pos += 1
        timer.lap("backbone")


def _generate_ar(model, prompts, steps, T, rng, eos, pad, stream, drop_finished, stats, profile):
    device = next(model.parameters()).device
    B = len(prompts)
    tokens, valid = prepare_prompts(prompts, pad, 1, device)
    positions = _positions(valid)
    padded = not bool(valid.all())
    cache = model.backbone.new_cache(B, tokens.shape[1] + steps - 1)
    timer = _Timer(profile, device)
    rows = _Rows(B, steps, steps, eos, stream, device, pad)
    uniforms = _NoiseBlocks(rng, 1, (), torch.float64)
    inv_t = 1.0 / T

    def sample(h: torch.Tensor, step: int) -> torch.Tensor:
        logits = model.lm_head(h).float()
        if inv_t != 1.0:
            logits = (logits - logits.amax(-1, keepdim=True)).mul_(inv_t)
        out = inverse_cdf_choice(logits, uniforms.get(step)).unsqueeze(1)  # [B, 1]
        timer.lap("sample")
        return out

    timer.start()
    t_prefill = time.perf_counter()
    h = model.backbone(
        model.embed(tokens), positions=positions, valid=valid if padded else None, cache=cache
    )[:, -1]
    pos = positions[:, -1:] + 1
    stats.prefill_s = time.perf_counter() - t_prefill
    timer.lap("prefill")
    _decode_loop(
        h,
        pos,
        steps,
        sample,
        lambda nxt, pos: model.backbone(model.embed(nxt), positions=pos, cache=cache)[:, -1],
        rows,
        [cache, rng, uniforms],
        drop_finished,
        stats,
        timer,
    )
    stats.phases = timer.phases
    return rows


def _generate_calm(
    model,
    prompts,
    steps,
    max_new,
    rng,
    stats,
    *,
    T,
    sampler,
    N,
    eos,
    pad,
    stream,
    drop_finished,
    max_draws,
    draws_per_call,
    screen,
    decode_dtype,
    fused_kernel,
    profile,
):
    cfg = model.config
    K = cfg.chunk_size
    device = next(model.parameters()).device
    B = len(prompts)
    tokens, token_valid = prepare_prompts(prompts, pad, K, device)
    chunks = tokens.view(B, -1, K)
    token_valid = token_valid.view(B, -1, K)
    chunk_valid = token_valid.any(-1)
    positions = _positions(chunk_valid)
    padded = not bool(token_valid.all())
    cache = model.new_cache(B, chunks.shape[1] + steps - 1)
    timer = _Timer(profile, device)
    rows = _Rows(B, steps * K, max_new, eos, stream, device, pad)
    n, alpha = split_inverse_temperature(T)
    head = model.head  # any `calm.models.head.GenerativeHead`: its noise comes from the row streams
    ae = model.autoencoder
    noise_dim = head.noise_dim
    noise_dtype = head.noise_dtype
    if n == 1 and alpha == 0.0:
        mode, per_step = "single", 1
    elif sampler == "approx":
        mode, per_step = "approx", N
    else:
        mode, per_step = "exact", 0
    head_noise = _NoiseBlocks(
        rng, 2, (max(per_step, 1), noise_dim), noise_dtype, transform=head.noise_from_uniform
    )
    select_u = _NoiseBlocks(rng, 3, (), torch.float64)

    def head_decode(h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if fused_kernel is not None and h.shape[0] * noise.shape[1] <= fused_decode.MAX_ROWS:
            c = fused_kernel(h, noise)  # resolved once per call, as the chunk-input table
            stats.fused_draws += c.shape[0] * c.shape[1]
            timer.lap("head+decode")
            return c
        if decode_dtype is None:
            z = head(h, noise)  # [b, m, l]
            timer.lap("head")
            c = decode_chunks(ae, z, screen=screen)  # [b, m, K]
        else:  # the vocabulary argmax stays on the model's own (float32) weight
            low_head, low_ae = low_precision_copies(model, decode_dtype)
            z = low_head(h.to(decode_dtype), noise.to(decode_dtype))
            timer.lap("head")
            c = decode_chunks(low_ae, z, screen=screen, vocab_weight=ae.lm_head.weight)
        timer.lap("decode")
        return c

    def sample(h: torch.Tensor, step: int) -> torch.Tensor:
        if mode == "single":
            stats.draws += h.shape[0]
            return head_decode(h, head_noise.get(step))[:, 0]
        if mode == "approx":
            cands = head_decode(h, head_noise.get(step))
            stats.draws += cands.shape[0] * cands.shape[1]
            out = choose_approx(cands, T, select_u.get(step))
            timer.lap("select")
            return out
        drawn = [0]  # draws read so far by every row still sampling

        def draw(m: int, rows: torch.Tensor | None) -> torch.Tensor:
            # a row's j-th draw of the step depends on (its seed, step, j) only: neither on the
            # batch nor on how the sampler splits its draws into calls
            u = rng.uniform((4, step), (m, noise_dim), noise_dtype, offset=drawn[0] * noise_dim)
            noise = head.noise_from_uniform(u)
            drawn[0] += m
            timer.lap("select")
            if rows is None:
                stats.draws += m * h.shape[0]
                return head_decode(h, noise)
            stats.draws += m * rows.numel()
            return head_decode(h.index_select(0, rows), noise.index_select(0, rows))

        def uniform(key: int, m: int) -> torch.Tensor:
            if key < 0:  # the choice at the bound
                return rng.uniform((6, step), (m,), torch.float64)
            return rng.uniform((5, step), (m,), torch.float64, offset=key)  # coins of draws key..

        out, st = sample_exact(
            draw,
            T,
            max_draws=max_draws,
            draws_per_call=min(draws_per_call, max_draws),
            max_draws_per_call=max(draws_per_call, _EXACT_MAX_BLOCK),
            uniform=uniform,
            active_rows=True,
            return_stats=True,
        )
        stats.exact_hit_limit += st.num_hit_limit
        timer.lap("select")
        return out

    table = ChunkInputTable.for_model(model)  # built outside the timed run, cached

    def advance(chunk: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        chunk = chunk.unsqueeze(1)  # [b, 1, K]
        x = model.chunk_inputs(chunk) if table is None else table(chunk)
        return model.backbone(x, positions=pos, cache=cache)[:, -1]

    timer.start()
    t_prefill = time.perf_counter()
    h = model.hidden(
        chunks,
        token_valid=token_valid if padded else None,
        positions=positions,
        valid=chunk_valid if padded else None,
        cache=cache,
    )[:, -1]
    pos = positions[:, -1:] + 1
    stats.prefill_s = time.perf_counter() - t_prefill
    timer.lap("prefill")
    _decode_loop(
        h,
        pos,
        steps,
        sample,
        advance,
        rows,
        [cache, head_noise, select_u, rng],
        drop_finished,
        stats,
        timer,
    )
    stats.phases = timer.phases
    return rows
