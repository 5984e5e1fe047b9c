"""What `calm.generation.generate` is given, checked and resolved: `GenerationError`; the
temperature and length checks (also used by the server and the CLI); prompts read from lists or
tensors, validated against the vocabulary and left-padded (`prepare_prompts`); per-row position
ids and seeds; the model's kind, its special token ids, and the ``fused_kernel`` choice.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from calm import fused_decode
from calm.sampling import split_inverse_temperature

_DEFAULT = object()  # "take it from the model / tokenizer"


class GenerationError(ValueError):
    """Bad arguments to `generate` (the message says which and why)."""


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
