"""The decoding steps as plain functions of their inputs, shared by `calm.generation.generate`
and the server's engine (`calm.serve.engine`): a backbone step for each model kind, the AR
sampler's choice, and `_compiled`, the process-wide cache of their `torch.compile`d graphs
(also used by `calm.calm_sampler`).
"""

from __future__ import annotations

import torch

from calm.sampling import inverse_cdf_choice

AR_CHOICE_STREAM = 1  # RowRandom purpose of the AR sampler's uniforms (fixed: a seed gives the same text)


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
