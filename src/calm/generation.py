"""Text generation for CALM and the token baseline: batching, KV cache, temperature, streaming.

`generate(model, input_ids, max_new_tokens=..., temperature=..., ...)` works for both model
kinds; `CALM.generate` and `TokenTransformer.generate` delegate here.

Batches of prompts of different lengths
    Prompts are **left-padded** to a common length, invisibly: a padded row computes exactly
    what the same prompt run alone computes (`calm.generation_inputs` says how).

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

import time
from collections.abc import Callable, Sequence

import torch

from calm.calm_sampler import SAMPLERS, ChunkSampler
from calm.decode_steps import (
    _COMPILED,  # noqa: F401 (re-exported)
    AR_CHOICE_STREAM,
    _ar_advance,
    _ar_choice,
    _calm_advance,
    _compiled,
)
from calm.decoding import tied_argmax
from calm.fast_decode import ChunkInputTable
from calm.generation_bookkeeping import GenerationStats, _Rows, _Timer
from calm.generation_inputs import (
    _DEFAULT,
    GenerationError,
    _as_prompts,
    _check_prompts,
    _fused_kernel,
    _model_kind,
    _positions,
    _row_seeds,
    _special_id,
    check_lengths,
    check_temperature,
    prepare_prompts,
)
from calm.rng import NoiseBlocks, RowRandom
from calm.sampling import sample_approx

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
# generate()


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
