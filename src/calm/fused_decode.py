"""A compiled CPU kernel for CALM's sampling step at small batch: head + decoder + argmax in one call.

At batch 1 a CALM step on CPU spends more time dispatching ~80 small PyTorch ops (energy head,
autoencoder decoder, vocabulary argmax) than computing them: each reads a 256×256 weight in a
few microseconds and pays as much again in overhead. `head_decode` does the same arithmetic in
one call of a small C function (``csrc/fused_decode.c``: vectorised loops over the model's own
float32 weights, the vocabulary argmax in float32). The result equals the PyTorch modules' up
to float32 rounding (another summation order): the same tokens except where two logits tie to
~1e-6, and a row's result does not depend on the other rows decoded with it.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) and
cached under ``$CALM_CACHE_DIR`` (default ``~/.cache/calm``), keyed by the source, the compiler
and the CPU. Without a compiler, on another device or dtype, or for models whose head or
autoencoder is not the stock module, `kernel_for` raises KernelUnavailable (saying why) and
`calm.generation.generate` uses PyTorch. ``CALM_FUSED_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import nn

from calm.fast_decode import _cached

__all__ = ["MAX_ROWS", "FusedHeadDecoder", "KernelUnavailable", "available", "head_decode", "kernel_for"]

# Rows (batch × samples) up to which the kernel is used: it is single-threaded and reads each
# weight row once for all rows, which beats PyTorch's dispatch at a few rows; from a few dozen
# rows on, PyTorch's GEMMs are faster (bench_decode: batch 16 at T = 1).
MAX_ROWS = 8

_SOURCE = Path(__file__).with_name("csrc") / "fused_decode.c"


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or does not apply to this model."""


def _cache_dir() -> Path:
    root = os.environ.get("CALM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "calm"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What the compiled code may depend on: -march=native targets this CPU's instruction set."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _library() -> ctypes.CDLL:
    """The compiled kernel, built on first use (raises KernelUnavailable with the reason)."""
    lib, error = _load()
    if lib is None:
        raise KernelUnavailable(error)
    return lib


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not): tried once per process."""
    try:
        return _build(), ""
    except (KernelUnavailable, OSError) as e:
        return None, str(e)


def _build() -> ctypes.CDLL:
    if os.environ.get("CALM_FUSED_KERNEL", "1") == "0":
        raise KernelUnavailable("disabled by CALM_FUSED_KERNEL=0")
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"fused_decode-{key}.so"
    if not path.exists():
        _compile(cc, path)
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.calm_fused_head_decode
    except (OSError, AttributeError):  # a damaged or foreign file in the cache: build it afresh
        _compile(cc, path)
        lib = ctypes.CDLL(str(path))
        fn = lib.calm_fused_head_decode
    fn.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr]  # see calm_fused_head_decode
    return lib


def _compile(cc: str, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelUnavailable(f"cannot create the kernel cache {path.parent}: {e}") from e
    errors = []
    # -march=native for this CPU's vector width; plain -O3 where the compiler does not know it
    for arch in (["-march=native"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        # -ffp-contract=fast: fused multiply-adds (ISO C mode would forbid them)
        cmd = [
            cc,
            "-O3",
            "-std=c11",
            "-ffp-contract=fast",
            "-shared",
            "-fPIC",
            *arch,
            str(_SOURCE),
            "-o",
            tmp,
            "-lm",
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            res = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if res is not None and res.returncode == 0:
            os.replace(tmp, path)  # atomic: a concurrent process sees the old file or the new one
            return
        if res is not None:
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-500:]}")
        os.unlink(tmp)
    raise KernelUnavailable("could not compile the fused decode kernel:\n" + "\n".join(errors))


def available() -> bool:
    """Whether the kernel compiled (or was already compiled) and loads on this machine."""
    return _load()[0] is not None


# ---------------------------------------------------------------------------------------------
# The model's weights as the kernel reads them


class FusedHeadDecoder:
    """The kernel bound to one CALM head + autoencoder: pointers to their weights in the
    kernel's order, and their sizes. Get it from `kernel_for` (cached while the weights are
    unchanged); call it like `head_decode`."""

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
        c = ae.config
        d = head.d_model
        if c.d_model != d or c.latent_dim != head.latent_dim:  # one width for head and decoder in C
            raise KernelUnavailable(
                f"the kernel needs the autoencoder's width ({c.d_model}) and latent size ({c.latent_dim}) to "
                f"equal the head's ({d}, {head.latent_dim}); the authors' releases differ"
            )
        ptrs = [t.data_ptr() for t in tensors]
        self.ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.tensors = tensors  # keeps the storages alive while the pointers are in use
        self.dims = (ctypes.c_int64 * 9)(  # the order of the C enum
            d,
            head.noise_dim,
            head.latent_dim,
            len(head.blocks),
            c.ffn_dim,
            len(ae.decoder_pre),
            len(ae.decoder_post),
            c.chunk_size,
            ae.lm_head.weight.shape[0],
        )
        self.eps = (ctypes.c_float * 2)(lns[0].eps, rms[0].eps)
        self.K, self.latent_dim, self.noise_dim, self.d = c.chunk_size, head.latent_dim, head.noise_dim, d

    def __call__(
        self, h: torch.Tensor, noise: torch.Tensor, *, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """See `head_decode`."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or noise.dtype != torch.float32:
            raise KernelUnavailable("the kernel runs on float32 CPU tensors")
        B, m = noise.shape[0], noise.shape[1]
        if h.shape != (B, self.d) or noise.shape[2] != self.noise_dim:
            raise ValueError(f"h {tuple(h.shape)} and noise {tuple(noise.shape)} do not fit the head")
        if latents is not None and (
            latents.shape != (B, m, self.latent_dim)
            or latents.dtype != torch.float32
            or not latents.is_contiguous()
        ):
            raise ValueError(
                f"latents must be a contiguous float32 tensor of shape {(B, m, self.latent_dim)}"
            )
        h, noise = h.contiguous(), noise.contiguous()
        out = torch.empty((B, m, self.K), dtype=torch.long)
        rc = _library().calm_fused_head_decode(
            self.ptrs,
            self.dims,
            self.eps,
            h.data_ptr(),
            B,
            noise.data_ptr(),
            m,
            out.data_ptr(),
            None if latents is None else latents.data_ptr(),
        )
        if rc != 0:
            raise MemoryError("the fused decode kernel could not allocate its scratch memory")
        return out


def kernel_for(head, autoencoder) -> FusedHeadDecoder:
    """The kernel for this CALM head + autoencoder, cached while their weights are unchanged.
    Raises KernelUnavailable (saying why) unless it compiles and can run them (the stock
    modules, float32 on the CPU)."""
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
