"""A compiled CPU kernel for CALM's sampling step at small batch: head + decoder + argmax in one call.

At batch 1 a CALM step on CPU spends more time dispatching ~80 small PyTorch ops (energy head,
autoencoder decoder, vocabulary argmax) than computing them: each reads a 256×256 weight in a
few microseconds and pays as much again in overhead. `head_decode` does the same arithmetic in
one call of a small C++ function (``csrc/fused_decode_kernel.cpp``: vectorised loops over the
model's own float32 weights, the vocabulary argmax in float32). The result equals the PyTorch
modules' up to float32 rounding (another summation order): the same tokens except where two
logits tie to ~1e-6, and a row's result does not depend on the other rows decoded with it.
Measured against ``torch.compile`` of the same head + decoder + argmax it is ~2x faster per
call and ~1.3x end to end at batch 1 (README), so it stays native.

``csrc/fused_decode_ext.cpp`` binds it for PyTorch: it takes the weights and inputs as
tensors and checks every dtype, device, layout and shape before the kernel reads them (a model
that does not fit gets an error naming the tensor). Both are built with
`torch.utils.cpp_extension` on first use and cached by `calm.kernel_cache` (hardened: a
directory only this user can write, libraries verified by SHA-256 before loading). Without a
compiler or ninja, on another device or dtype, or for models whose head or autoencoder is not
the stock module, `kernel_for` raises KernelUnavailable (saying why) and
`calm.generation.generate` uses PyTorch. ``CALM_FUSED_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from calm import kernel_cache
from calm.fast_decode import _cached
from calm.kernel_cache import KernelUnavailable

__all__ = ["MAX_ROWS", "FusedHeadDecoder", "KernelUnavailable", "available", "head_decode", "kernel_for"]

# Rows (batch × samples) up to which the kernel is used: it is single-threaded and reads each
# weight row once for all rows, which beats PyTorch's dispatch at a few rows; from a few dozen
# rows on, PyTorch's GEMMs are faster (bench_decode: batch 16 at T = 1).
MAX_ROWS = 8

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "fused_decode_ext.cpp", _CSRC / "fused_decode_kernel.cpp")
_HEADERS = (_CSRC / "fused_decode_kernel.h",)
_INTERFACE_VERSION = 1  # kInterfaceVersion in fused_decode_ext.cpp


def _check_interface(module: ModuleType) -> str:
    """'' if `module` is the extension this file calls, else what is wrong with it."""
    if not callable(getattr(module, "head_decode", None)):
        return "has no head_decode function"
    if getattr(module, "interface_version", None) != _INTERFACE_VERSION:
        return f"has interface version {getattr(module, 'interface_version', None)}, not {_INTERFACE_VERSION}"
    return ""


def _library() -> ModuleType:
    """The compiled extension, built on first use (raises KernelUnavailable with the reason)."""
    lib, error = _load()
    if lib is None:
        raise KernelUnavailable(error)
    return lib


@cache
def _load() -> tuple[ModuleType | None, str]:
    """(extension, "") or (None, why not): tried once per process."""
    if os.environ.get("CALM_FUSED_KERNEL", "1") == "0":
        return None, "disabled by CALM_FUSED_KERNEL=0"
    try:
        module = kernel_cache.load_extension(
            "calm_fused_decode", _SOURCES, hashed=_HEADERS, check=_check_interface, what="fused decode kernel"
        )
    except KernelUnavailable as e:
        return None, str(e)
    return module, ""


def available() -> bool:
    """Whether the kernel compiled (or was already compiled) and loads on this machine."""
    return _load()[0] is not None


# ---------------------------------------------------------------------------------------------
# The model's weights as the kernel reads them


class FusedHeadDecoder:
    """The kernel bound to one CALM head + autoencoder: their weights in the kernel's order
    and their block counts. Get it from `kernel_for` (cached while the weights are unchanged);
    call it like `head_decode`. The head and the autoencoder may have different widths (the
    authors' releases pair a d = 512 autoencoder with d = 1024 backbones)."""

    def __init__(self, head, ae):
        from calm.models.energy import EnergyHead

        lns = [m for m in head.modules() if isinstance(m, nn.LayerNorm)]
        rms = [ae.decoder_norm] + [b.norm for b in [*ae.decoder_pre, *ae.decoder_post]]
        tensors: list[torch.Tensor] = []

        def add(*ts):
            tensors.extend(ts)

        wb = lambda m: (m.weight, m.bias)  # noqa: E731  (Linear and LayerNorm alike)
        add(*wb(head.hidden_embd), *wb(head.norm_hidden), *wb(head.noise_embd), *wb(head.norm_noise))
        for b in head.blocks:
            add(*wb(b.in_ln), *wb(b.linears[0]), *wb(b.linears[2]), *wb(b.linears[4]), *wb(b.down_proj))
        f = head.final_layer
        add(*wb(f.in_ln), *wb(f.linears[0]), *wb(f.linears[2]))
        add(*wb(ae.from_latent))
        for b in ae.decoder_pre:
            add(b.norm.weight, b.mlp.gate_proj.weight, b.mlp.up_proj.weight, b.mlp.down_proj.weight)
        add(*wb(ae.expand))
        for b in ae.decoder_post:
            add(b.norm.weight, b.mlp.gate_proj.weight, b.mlp.up_proj.weight, b.mlp.down_proj.weight)
        add(ae.decoder_norm.weight, ae.lm_head.weight)
        if any(t is None for t in tensors) or type(head) is not EnergyHead or head.atoms is not None:
            raise KernelUnavailable("the energy head is not the stock module")
        if any(not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise KernelUnavailable("the kernel needs contiguous float32 weights on the CPU")
        if len({m.eps for m in lns}) != 1 or len({m.eps for m in rms}) != 1:
            raise KernelUnavailable("the kernel assumes one LayerNorm eps and one RMSNorm eps")
        self.weights = tensors  # (kept: the extension reads their storages on every call)
        # head blocks, decoder blocks before and after `expand`, tokens per chunk, the two eps
        self.sizes = (len(head.blocks), len(ae.decoder_pre), len(ae.decoder_post), ae.config.chunk_size)
        self.eps = (lns[0].eps, rms[0].eps)
        self.d, self.noise_dim = head.d_model, head.noise_dim
        self._run = _library().head_decode
        try:  # every shape is checked now, once, on an empty batch (and again on every call)
            self(torch.empty(0, self.d), torch.empty(0, 1, self.noise_dim))
        except ValueError as e:
            raise KernelUnavailable(f"the fused kernel cannot run this model: {e}") from None

    def __call__(
        self, h: torch.Tensor, noise: torch.Tensor, *, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """See `head_decode`. A shape, dtype or layout the kernel cannot take is a ValueError
        naming the tensor (checked in C++ before the kernel reads anything)."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or noise.dtype != torch.float32:
            raise KernelUnavailable("the kernel runs on float32 CPU tensors")
        return self._run(self.weights, *self.sizes, *self.eps, h.contiguous(), noise.contiguous(), latents)


def kernel_for(head, autoencoder) -> FusedHeadDecoder:
    """The kernel for this CALM head + autoencoder, cached while their weights are unchanged.
    Raises KernelUnavailable (saying why) unless it compiles and can run them (the stock
    modules, float32 on the CPU, every weight of the shape the sizes imply)."""
    from calm.models.autoencoder import ChunkAutoencoder
    from calm.models.energy import EnergyHead

    if type(head) is not EnergyHead:  # before compiling anything: flow / diffusion heads
        name = getattr(head, "name", type(head).__name__)
        raise KernelUnavailable(
            f"the fused kernel runs the energy head only; this model's head is {name!r}, "
            "which takes the PyTorch path"
        )
    _library()
    if type(autoencoder) is not ChunkAutoencoder:
        raise KernelUnavailable("the autoencoder is not the stock module")
    params = list(head.parameters()) + list(autoencoder.parameters())
    return _cached(("fused-plan", id(head)), params, lambda: FusedHeadDecoder(head, autoencoder))


def head_decode(
    head, autoencoder, h: torch.Tensor, noise: torch.Tensor, *, latents: torch.Tensor | None = None
) -> torch.Tensor:
    """Token chunks [B, m, K] for hidden states h [B, d] and head noise [B, m, noise_dim]:
    ``autoencoder.decode(head(h, noise))`` in one compiled call (equal up to float32 rounding).
    latents: an optional float32 tensor [B, m, latent_dim] that receives the head's samples.
    Raises KernelUnavailable when the kernel cannot serve these inputs (see the module
    docstring)."""
    return kernel_for(head, autoencoder)(h, noise, latents=latents)
