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
    doubling blocks (8, 16, 32, 64, ...) only until it accepts, at most N = ``num_samples``
    draws per row and step; a row that reaches N gets the batch approximation over its N
    draws. Its cost follows how peaked the model's P is: a confident model needs ~20 draws per
    step at T = 0.5 instead of 200 (benchmarks/bench_decode.py: 3x faster than "approx" at
    batch 1, 9x at batch 16), a flat one costs the N draws of "approx" in a few calls.
    ``sampler="approx"``: the paper's batch approximation, N head samples decoded and
    reweighted in one batched pass.
    T = 1 is one head sample. T > 1 is impossible without logits (see `check_temperature`).

Decoding: one decoder per model (`calm.decoding.ChunkDecoder`, the autoencoder decoder's exact
    float32 argmax), driven by `calm.calm_sampler.ChunkSampler`, which owns the temperature rule.
    The temperature samplers only compare draws for equality, so on the CPU a draw's token
    positions are decoded only as far as another draw of the row shares its prefix
    (`calm.decoding.DrawClasses`): when the model is unsure, about one position per draw
    instead of K. Each step's CALM input (the chunk just produced) is K rows of a precomputed
    table (`calm.fast_decode.ChunkInputTable`), not a matmul over the K·d flattened
    embeddings. With a few rows at T = 1 on the CPU, head + decoder + argmax run as one
    compiled call (`calm.fused_decode`) instead of ~80 small PyTorch ops; that kernel runs the
    energy head only, a flow or diffusion head (``config.head``) takes the PyTorch path, with
    its noise from the same per-row streams (the head's ``noise_from_uniform``) and its
    sampling steps (``model.set_head_sampling``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from calm import fused_decode
from calm.calm_sampler import SAMPLERS, ChunkSampler
from calm.decoding import tied_argmax
from calm.fast_decode import ChunkInputTable
from calm.rng import NoiseBlocks, RowRandom
from calm.sampling import inverse_cdf_choice, sample_approx, split_inverse_temperature

__all__ = [
    "GenerationError",
    "GenerationStats",
    "RowRandom",
    "check_lengths",
    "check_temperature",
    "choose_approx",
    "generate",
    "prepare_prompts",
    "tied_argmax",
]

_DEFAULT = object()  # "take it from the model / tokenizer"
AR_CHOICE_STREAM = 1  # RowRandom purpose of the AR sampler's uniforms (fixed: a seed gives the same text)


class GenerationError(ValueError):
    """Bad arguments to `generate` (the message says which and why)."""


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


def check_lengths(prompt_lengths: Sequence[int], max_new_tokens: int, chunk_size: int, context: int) -> None:
    """GenerationError unless every prompt and its continuation fit the backbone's `context`
    (positions: chunks of `chunk_size` tokens for CALM, tokens for AR). The error's ``param``
    says what to change: "prompt" (longer than the context) or "max_new_tokens"."""
    K = chunk_size
    steps = -(-max_new_tokens // K)
    unit = f"chunks of {K} tokens" if K > 1 else "tokens"
    for i, length in enumerate(prompt_lengths):
        n = -(-length // K)
        if n > context:
            err = GenerationError(
                f"prompt {i} has {length} tokens ({n} {unit}), longer than the model's context of "
                f"{context} {unit} ({context * K} tokens)"
            )
            err.param = "prompt"
            raise err
        if n + steps - 1 > context:
            room = (context - n + 1) * K
            err = GenerationError(
                f"prompt {i} ({length} tokens) + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"of {context * K} tokens ({context} {unit}); use max_new_tokens <= {room} or a shorter prompt"
            )
            err.param = "max_new_tokens"
            raise err


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


# ---------------------------------------------------------------------------------------------
# generate()


def _fused_kernel(choice, model) -> fused_decode.FusedHeadDecoder | None:
    """The `calm.fused_decode` kernel for CALM's small decoding steps, or None (see `generate`)."""
    if choice is False or _model_kind(model) != "calm":
        return None
    if choice not in (None, True):
        raise GenerationError(f"fused_kernel must be None, True or False, got {choice!r}")
    kernel, reason = None, None
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
    num_samples: int = 200,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = _DEFAULT,
    pad_id: int | None = _DEFAULT,
    stream: Callable[[int, list[int]], None] | None = None,
    max_draws: int | None = None,
    draws_per_call: int = 8,
    drop_finished: bool = True,
    fused_kernel: bool | None = None,
    compile: bool = False,
    lazy_draws: bool | None = None,
    profile: bool = False,
    return_stats: bool = False,
    num_candidates: int | None = None,
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
        num_samples: N, head samples drawn per row and step by the approx sampler (200 is the
            paper's choice near T = 0.5), and the exact sampler's default bound on draws (the CLI's
            ``--num-samples``; ``num_candidates=`` is accepted as an older name),
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
            (default: num_samples) and its first block of draws (doubling per call, up to
            64); see `calm.sampling.sample_exact`.
        drop_finished: remove finished rows from the batch (and KV cache) to save compute.
        fused_kernel: CALM on CPU: decode steps of at most `calm.fused_decode.MAX_ROWS`
            latents with the compiled head + decoder + argmax kernel (the same tokens up to
            float32 rounding; compiled on first use). None (default): where it applies and
            compiles; True: require it (GenerationError saying why if it cannot be used, e.g.
            for a flow or diffusion head, which the kernel does not run); False: always the
            PyTorch modules.
        compile: decode through `torch.compile`d steps (``fullgraph=True``) over a fixed-shape
            `calm.models.transformer.StaticKVCache`: the backbone step, the AR sampler and
            CALM's T = 1 head + decoder + argmax (on CUDA, mode "reduce-overhead": CUDA graphs).
            The first call with new shapes compiles (tens of seconds on a CPU); later calls with
            the same shapes reuse the graphs. Finished rows stay in the batch (static shapes).
        lazy_draws: CALM at T < 1: tell draws apart by their first tokens (`calm.decoding.DrawClasses`;
            the same chunks, less decoding). None (default): on the CPU; False: decode every draw
            in full (e.g. to measure what the lazy decoding saves).
        profile: time the phases of a step (in stats.phases; synchronises CUDA).
        return_stats: also return a `GenerationStats`.
    """
    kind = _model_kind(model)
    if num_candidates is not None:  # the older name of num_samples
        num_samples = num_candidates
    prompts = _as_prompts(input_ids)
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    temperature = check_temperature(temperature, kind)
    if kind == "calm":
        if sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise GenerationError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if max_draws is None:
            max_draws = num_samples
        if isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < 1:
            raise GenerationError(f"max_draws must be an integer >= 1, got {max_draws!r}")
        if isinstance(draws_per_call, bool) or not isinstance(draws_per_call, int) or draws_per_call < 1:
            raise GenerationError(f"draws_per_call must be an integer >= 1, got {draws_per_call!r}")
    elif sampler not in SAMPLERS:
        raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    K = cfg.chunk_size if kind == "calm" else 1
    steps = -(-max_new_tokens // K)
    check_lengths([len(p) for p in prompts], max_new_tokens, K, cfg.max_seq_len)
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
        num_candidates=num_samples if kind == "calm" and sampler == "approx" and temperature < 1 else None,
    )
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        if kind == "ar":
            rows = _generate_ar(
                model,
                prompts,
                steps,
                temperature,
                rng,
                eos,
                pad,
                stream,
                drop_finished,
                stats,
                profile,
                compile,
            )
        else:
            rows = _generate_calm(
                model,
                prompts,
                steps,
                max_new_tokens,
                rng,
                stats,
                eos=eos,
                pad=pad,
                stream=stream,
                drop_finished=drop_finished,
                profile=profile,
                temperature=temperature,
                sampler=sampler,
                num_samples=num_samples,
                max_draws=max_draws,
                draws_per_call=draws_per_call,
                fused_kernel=_fused_kernel(fused_kernel, model),
                compile=compile,
                lazy_draws=lazy_draws,
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


# ---------------------------------------------------------------------------------------------
# Decoding steps, as plain functions of their inputs (so that one torch.compile serves every
# call with the same shapes: `_compiled`)


def _ar_advance(model, cache, tokens, pos):
    return model.backbone(model.embed(tokens), positions=pos, cache=cache)[:, -1]


def _ar_choice(model, h, uniforms, inv_t: float):
    from calm.sampling import temper_logits

    logits = model.lm_head(h).float()
    if inv_t != 1.0:
        logits = temper_logits(logits, inv_t)  # T -> 0 is greedy, never NaN
    return inverse_cdf_choice(logits, uniforms).unsqueeze(1)  # [B, 1]


def _calm_advance(model, table, cache, chunk, pos):
    chunk = chunk.unsqueeze(1)  # [b, 1, K]
    x = model.chunk_inputs(chunk) if table is None else table(chunk)
    return model.backbone(x, positions=pos, cache=cache)[:, -1]


_COMPILED: dict = {}


def _compiled(fn, device: torch.device | None = None):
    """``torch.compile(fn, fullgraph=True, dynamic=False)``, one per function for the process:
    its graphs are reused by every call with the same shapes (they are guarded, not rebuilt).
    On CUDA with mode "reduce-overhead" (CUDA graphs: one launch per step at small batch)."""
    cuda = device is not None and device.type == "cuda"
    key = (fn, cuda)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(
            fn, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None
        )
    return _COMPILED[key]


def _generate_ar(
    model, prompts, steps, T, rng, eos, pad, stream, drop_finished, stats, profile, compile=False
):
    device = next(model.parameters()).device
    B = len(prompts)
    tokens, valid = prepare_prompts(prompts, pad, 1, device)
    positions = _positions(valid)
    padded = not bool(valid.all())
    cache = model.backbone.new_cache(B, tokens.shape[1] + steps - 1, static=compile)
    advance_fn = _compiled(_ar_advance, device) if compile else _ar_advance
    choice_fn = _compiled(_ar_choice, device) if compile else _ar_choice
    timer = _Timer(profile, device)
    rows = _Rows(B, steps, steps, eos, stream, device, pad)
    uniforms = NoiseBlocks(rng, AR_CHOICE_STREAM, (), torch.float64)
    inv_t = 1.0 / T

    def sample(h: torch.Tensor, step: int) -> torch.Tensor:
        out = choice_fn(model, h, uniforms.get(step), inv_t)
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
        lambda nxt, pos: advance_fn(model, cache, nxt, pos),
        rows,
        [cache, rng, uniforms],
        drop_finished and not compile,  # compiled steps keep their shapes
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
    eos,
    pad,
    stream,
    drop_finished,
    profile,
    compile=False,
    **sampling,
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
    cache = model.new_cache(B, chunks.shape[1] + steps - 1, static=compile)
    timer = _Timer(profile, device)
    rows = _Rows(B, steps * K, max_new, eos, stream, device, pad)
    sample = ChunkSampler(
        model, rng, stats=stats, timer=timer if profile else None, compile=compile, **sampling
    )
    table = ChunkInputTable.for_model(model)  # built outside the timed run, cached
    advance_fn = _compiled(_calm_advance, device) if compile else _calm_advance

    def advance(chunk: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return advance_fn(model, table, cache, chunk, pos)

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
        [cache, sample, rng],
        drop_finished and not compile,
        stats,
        timer,
    )
    stats.phases = timer.phases
    return rows
