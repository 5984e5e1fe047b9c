"""Preparing a model for the job, from outside the model code (as torchtitan's parallelize step).

In the order the training loop applies them:

1. **Activation checkpointing** per Transformer block (`TrainConfig.activation_checkpointing`):
   a block keeps only its input for the backward pass and recomputes the rest, trading about
   a third more compute in the blocks for activation memory that no longer grows with depth.
2. **torch.compile** (`TrainConfig.compile`): the whole loss as one graph (one process or DDP),
   or each Transformer block on its own under FSDP2 (`compile_blocks`), as torchtitan does:
   FSDP2 all-gathers a block's parameters before it runs and reduce-scatters its gradients
   after, from module hooks, and those collectives must stay outside the compiled graphs so
   that they overlap with the compute of the neighbouring blocks.
3. **FSDP2** (`calm.distributed.wrap_model`), with `mixed_precision` on CUDA: bf16 parameters
   and compute, float32 gradient reduction and float32 master weights in the optimizer.
4. **Materialising a model built on the meta device** (`materialize_model`): each rank
   allocates only its own shards (``to_empty``) and fills them with the model's own seeded
   ``init_weights``; `sharded_init` makes every random fill draw the full tensor, one
   parameter at a time, and keep this rank's slice, so the weights equal those of eager
   construction with the same seed, whatever the number of ranks.

The model names its Transformer blocks with ``fsdp_units()`` (CALM and the token baseline:
the backbone's layers); a model without it gets neither per-block compile nor checkpointing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from calm.models.layers import materialize


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's Transformer blocks (``model.fsdp_units()``), or [] if it names none."""
    units = getattr(model, "fsdp_units", None)
    return list(units()) if callable(units) else []


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each Transformer block's activations in the backward pass; returns the count.

    Non-reentrant `torch.utils.checkpoint` around the block's forward (names and checkpoints
    unchanged; it composes with torch.compile and FSDP2), only while gradients are recorded:
    evaluation and decoding (KV caches) run the plain forward. The blocks draw no random
    numbers, so the RNG state need not be saved for the recomputation.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = _when_training(
            functools.partial(
                torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False
            ),
            block.forward,
        )
    return len(blocks)


def compile_blocks(model: nn.Module, **compile_options) -> int:
    """torch.compile(fullgraph=True) each Transformer block's forward in place; returns the count.

    The block's module hooks (FSDP2's all-gather and reduce-scatter) stay outside the graph,
    and parameter names do not change (no ``_orig_mod`` wrapper in the checkpoint). Only the
    training calls (gradients recorded) use the compiled graph; evaluation and decoding with a
    KV cache (other shapes and Python state every step) run the block as it was.
    `compile_options` go to `torch.compile` (e.g. ``backend``).
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = _when_training(torch.compile(block.forward, fullgraph=True, **compile_options), block.forward)
    return len(blocks)


def _when_training(training_forward, plain_forward):
    """A forward that is `training_forward` while gradients are recorded, else `plain_forward`."""

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return training_forward(*args, **kwargs)
        return plain_forward(*args, **kwargs)

    return forward


def mixed_precision(device: torch.device, dtype: str):
    """FSDP2's `MixedPrecisionPolicy` for bf16 training on CUDA (`dtype` "auto" or "bf16"):
    parameters gathered and computed in bf16, gradients reduced in float32; None otherwise."""
    if device.type != "cuda" or dtype == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Initialising sharded parameters exactly as the full model would be

# In-place random initialisers: called on a sharded parameter (a DTensor), each draws the full
# tensor and keeps this rank's part. Deterministic fills (zeros_, ones_, fill_) need nothing.
_RANDOM_FILLS = frozenset(
    [getattr(nn.init, n) for n in ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                                   "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")]
    + [getattr(torch.Tensor, n) for n in ("uniform_", "normal_", "random_", "bernoulli_", "exponential_",
                                          "log_normal_", "cauchy_", "geometric_")]
)  # fmt: skip


class _FullTensorRandomFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor

        if func in _RANDOM_FILLS:
            args = list(args)
            key = 0 if args else next(k for k in ("tensor", "self") if k in kwargs)
            target = args[0] if args else kwargs[key]
            if isinstance(target, DTensor):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                local = target.to_local()
                full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
                if args:
                    args[0] = full
                else:
                    kwargs[key] = full
                func(*args, **kwargs)
                shape, offset = compute_local_shape_and_global_offset(
                    target.shape, target.device_mesh, target.placements
                )
                local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
                return target
        return func(*args, **kwargs)


def sharded_init(init) -> None:
    """Run `init()` (e.g. ``model.init_weights``) so that random fills of sharded parameters
    equal the matching slice of the same fill of the full tensor (the same RNG draws on every
    rank, one full parameter in memory at a time)."""
    with torch.no_grad(), _FullTensorRandomFills():
        init()


def materialize_model(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-device model (sharded by FSDP2 or not) on `device` and initialise it
    with its ``init_weights`` from `seed` (the same on every rank)."""
    materialize(model, device)
    torch.manual_seed(seed)
    sharded_init(model.init_weights)


def prepare_model(raw: nn.Module, cfg, info, strategy: str):
    """The training loop's preparation of `raw` for its job (the module docstring's order):
    activation checkpointing, per-block compile under FSDP2, FSDP2/DDP, and materialising a
    meta-device model. Returns (wrapped model, sharded?, FSDP2 MP policy, checkpointed blocks)."""
    from calm.distributed import wrap_model

    device = info.device
    meta = any(p.is_meta for p in raw.parameters())
    sharded = strategy == "fsdp" and info.world_size > 1
    checkpointed = apply_activation_checkpointing(raw) if cfg.activation_checkpointing else 0
    if cfg.compile and sharded:
        compile_blocks(raw)
    if meta and not sharded:
        materialize_model(raw, device, cfg.seed)
    elif not meta:
        raw.to(device)
    mp_policy = mixed_precision(device, cfg.dtype) if sharded else None
    wrapped = wrap_model(raw, strategy, device, mp_policy=mp_policy, broadcast=not meta)
    if meta and sharded:  # sharded first: each rank allocates only its own part
        materialize_model(raw, device, cfg.seed)
    return wrapped, sharded, mp_policy, checkpointed
