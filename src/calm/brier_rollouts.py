"""Batched rollouts of the BrierLM estimators (`calm.brier`): the continuations of every
scored position of a batch of windows, run through the model's own forward from the window's
KV cache, and the memory budget that splits them into groups.

**Rollouts** (both estimators). One pass over the window with a KV cache gives the keys/values of
every context prefix at once; the continuations of all positions then advance together, one
forward call per continuation step (and memory-bounded group of positions), never a Python loop
over positions, and no prefix is recomputed. Two ways to let each continuation see exactly its
own context (tests check both against fresh forward passes):

* shared prefix (default for our `TokenTransformer` / `CALM`): the continuations of a window
  read the window's cache in place through a `calm.models.transformer.SharedPrefixCache`: the
  model's own forward, whose attention mask lets each continuation see its context slots and its
  own earlier keys. No copies: memory and traffic O(B·T) for the cache, O(B·P·T) for the
  attention scores.
* forked caches (any model with the interface, e.g. test doubles): each continuation gets a
  copy of its window's cache cut to its group's longest context, the slots past its own context
  marked invalid, and the model's own forward runs on it. Simple and generic, but the copies cost
  O(P·T) memory and traffic per window: 1.8x the CPU time of the shared path at the CPU preset,
  block 256 (benchmarks/bench_eval.py).

The alternative of re-running every position's prefix costs O(T) backbone work per position.
"""

from __future__ import annotations

import copy

import torch

# ---------------------------------------------------------------------------------------------
# KV-cache forking


def _fork_cache(base, rows: torch.Tensor | int, prefix_len: int, keep: torch.Tensor, extra: int):
    """A rollout cache forked from ``base``: row r copies the first ``prefix_len`` slots of a base
    row and may attend only to the first ``keep[r]`` of them; ``extra`` free slots follow.

    rows: an int g (row r copies base row r // g: every base row repeated g times, the layout the
    estimators use, copied by one broadcast per layer) or a LongTensor of base rows (gather).
    No zero-filling: slots past ``prefix_len`` hold stale values, but they are invalid until the
    backbone writes them (``KVCache.reserve`` marks them valid in the step that stores them).
    """
    total = prefix_len + extra
    if total > base.max_len:
        raise ValueError(f"cache fork needs {total} slots, the base cache has {base.max_len}")

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t[:, :, :total] if t.dim() == 4 else t[:, :total]
        if isinstance(rows, int):  # expand + clone: one strided copy (index_select on a sliced
            # cache is ~50x slower on CPU). Always a copy: a view (reshape can return one when a
            # dimension is 1) would let the rollout write into the base cache or alias its rows.
            t = t.unsqueeze(1).expand(t.shape[0], rows, *t.shape[1:])
            return t.clone(memory_format=torch.contiguous_format).view(-1, *t.shape[2:])
        return t[rows]

    fork = copy.copy(base)
    fork.keys = [take(k) for k in base.keys]
    fork.values = [take(v) for v in base.values]
    slots = torch.arange(total, device=keep.device)
    fork.valid = (slots[None, :] < keep[:, None]) & take(base.valid)
    fork.length = prefix_len
    fork.max_len = total
    fork.dense = False  # slots past a row's `keep` are invalid
    return fork


def _cache_bytes_per_slot(cache) -> int:
    """Bytes one row uses for one slot across all layers (keys and values)."""
    return sum(k[0, :, 0].numel() * k.element_size() for k in cache.keys + cache.values)


# ---------------------------------------------------------------------------------------------
# Rollouts


def _use_shared(model, shared_prefix: bool | None) -> bool:
    if shared_prefix is None:
        return _shares_prefix(model)
    if shared_prefix and not _shares_prefix(model):
        raise ValueError(
            f"shared_prefix=True needs our TokenTransformer or CALM with the standard Backbone, "
            f"not {type(model).__name__}"
        )
    return bool(shared_prefix)


def _shares_prefix(model) -> bool:
    """Whether the shared-prefix attention below can stand in for the model's own forward: our
    `Backbone` under an unmodified `TokenTransformer.logits` / `CALM.hidden`."""
    from calm.models.transformer import Backbone, Block

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone) or not all(isinstance(b, Block) for b in backbone.layers):
        return False
    kind = getattr(model.config, "kind", None)
    if kind == "ar":
        from calm.models.ar import TokenTransformer

        return isinstance(model, TokenTransformer) and type(model).logits is TokenTransformer.logits
    if kind == "calm":
        from calm.models.calm import CALM

        return isinstance(model, CALM) and type(model).hidden is CALM.hidden
    return False


class _Rollout:
    """Continuations of Q queries in every window of a batch: query q may attend to the first
    ``ctx[q]`` slots of its window's KV cache ``base`` (its context) and to its own earlier steps.

    shared=True: the queries of a window read the window's cache in place through a
    `SharedPrefixCache` (no copies) and the model's own forward, one call per step for all
    queries. shared=False: any model with the interface; each query gets a copy of its window's
    cache (`_fork_cache`).
    """

    def __init__(self, model, base, ctx: torch.Tensor, extra: int, shared: bool):
        self.model, self.base, self.shared = model, base, shared
        self.B, self.Q = base.valid.shape[0], len(ctx)
        self.prefix = int(ctx.max())
        if shared:
            from calm.models.transformer import SharedPrefixCache

            self.cache = SharedPrefixCache(base, ctx, extra)
        else:
            self.cache = _fork_cache(base, self.Q, self.prefix, ctx.repeat(self.B), extra)


def _ar_step(model, roll: _Rollout, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, Q, V] after feeding tokens [B, Q] at position ids [Q]."""
    B, Q = tokens.shape
    if roll.shared:
        return model.logits(tokens, positions=positions[None].expand(B, Q), cache=roll.cache)
    out = model.logits(tokens.reshape(B * Q, 1), positions=positions.repeat(B)[:, None], cache=roll.cache)
    return out.view(B, Q, -1)


def _calm_step(model, roll: _Rollout, chunks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, Q, d] after feeding chunks [B, Q, K] at chunk position ids [Q]."""
    B, Q, K = chunks.shape
    if roll.shared:
        return model.hidden(chunks, positions=positions[None].expand(B, Q), cache=roll.cache)
    out = model.hidden(chunks.reshape(B * Q, 1, K), positions=positions.repeat(B)[:, None], cache=roll.cache)
    return out.view(B, Q, -1)


def _query_groups(
    Q: int, shared: bool, bytes_per_query: int, budget: int, steps: int, context: int
) -> list[tuple[int, int]]:
    """Consecutive groups of queries whose working memory fits in ``budget`` bytes. Shared
    path: a query's attention also spans the other queries' continuation keys (masked out), so
    groups stay small enough that those (steps x group) keys cost at most about the context."""
    size = max(1, min(Q, budget // max(1, bytes_per_query)))
    if shared:
        size = min(size, max(16, context // max(1, steps)))
    return [(a, min(a + size, Q)) for a in range(0, Q, size)]


def _bytes_per_query(model, base, B: int, S: int, width: int, shared: bool) -> int:
    """Working memory of one query in all B windows: a cache copy (fork) or attention scores
    over the context and the group's continuation keys (shared, at most ~2S; `_query_groups`),
    plus the [width] output row (logits or hidden) a few times over."""
    if shared:
        heads = model.backbone.config.num_heads
        return B * 4 * (3 * heads * 2 * S + 4 * width)
    return B * (_cache_bytes_per_slot(base) * S + 4 * 4 * width)
