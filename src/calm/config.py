"""Configuration dataclasses, and the public entry point for presets and overrides.

One dataclass per model kind (`AutoencoderConfig`, `CALMConfig`, `ARConfig`) plus
`TrainConfig` for optimisation. The named presets (`PRESETS`, `preset`) live in `calm.presets`
and ``key=value`` overrides (`apply_overrides`, `split_overrides`) in `calm.config_overrides`;
both are importable from here as before.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

LLAMA3_VOCAB = 128_257  # Llama-3 tokenizer plus the authors' [PAD] token

# CALM's generative heads (`calm.models.head.HEADS` maps each name to its module) and the
# choices of their sampling settings; kept here, free of torch, so configs validate cheaply.
HEAD_NAMES = ("energy", "flow", "diffusion")
FLOW_SOLVERS = ("euler", "midpoint")
DIFFUSION_SOLVERS = ("ddpm", "ddim")
DIFFUSION_SCHEDULES = ("cosine", "linear")
DIFFUSION_TARGETS = ("v", "eps")


class ConfigError(ValueError):
    """A configuration that cannot work, or an override that names no field."""


@dataclass
class _Config:
    kind: typing.ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        _check_types(cls, data)
        return cls(**data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _check_types(cls, data: dict[str, Any]) -> None:
    """Refuse values of the wrong JSON type (e.g. ``"num_layers": "2"``) with the field's name.

    An int is accepted for a float field; a bool is never taken for a number.
    """
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        want = hints.get(name)
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want in (bool, str, dict, list):
            ok = isinstance(value, want)
        else:
            continue
        if not ok:
            raise ConfigError(
                f"{cls.__name__}: field {name} must be {want.__name__}, got {value!r} ({type(value).__name__})"
            )


@dataclass
class AutoencoderConfig(_Config):
    """Chunk autoencoder (DESIGN §2.1): K tokens <-> one latent vector of size l."""

    kind: typing.ClassVar[str] = "autoencoder"
    vocab_size: int = 8192
    chunk_size: int = 4  # K
    latent_dim: int = 128  # l
    d_model: int = 512  # d
    ffn_dim: int = 1280  # SwiGLU inner width
    num_layers: int = 2  # residual blocks per stack: first half before squeeze, rest after
    kl_weight: float = 1e-3  # beta
    kl_clamp: float = 0.5  # free bits: per-dimension KL clipped from below
    token_mask_prob: float = 0.15  # input tokens replaced by the mask token (training)
    latent_dropout: float = 0.15  # dropout on the sampled latent (training)
    norm_eps: float = 1e-6
    pad_id: int = 1
    mask_id: int = 2
    eot_id: int = 0

    def __post_init__(self):
        if self.chunk_size < 1 or self.latent_dim < 1 or self.d_model < 1:
            raise ConfigError("chunk_size, latent_dim and d_model must be positive")
        if self.num_layers < 2 or self.num_layers % 2:
            raise ConfigError("num_layers must be even and >= 2 (half before, half after the squeeze)")
        if not 0 <= self.token_mask_prob < 1 or not 0 <= self.latent_dropout < 1:
            raise ConfigError("token_mask_prob and latent_dropout must be in [0, 1)")


@dataclass
class BackboneConfig(_Config):
    """Llama-style decoder shared by CALM and the token baseline."""

    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means = num_heads (no grouped-query attention)
    ffn_dim: int = 688
    max_seq_len: int = 512  # positions of the backbone (chunks for CALM, tokens for AR)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def _check_backbone(self):
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")
        if (self.d_model // self.num_heads) % 2:
            raise ConfigError("head dimension must be even for rotary embeddings")

    def __post_init__(self):
        self._check_backbone()


@dataclass
class CALMConfig(BackboneConfig):
    """CALM language model (DESIGN §2.2). The autoencoder config travels with it."""

    kind: typing.ClassVar[str] = "calm"
    vocab_size: int = 8192
    chunk_size: int = 4
    latent_dim: int = 128
    head_layers: int = 0  # residual blocks of the head (any kind); 0 means num_layers // 4 (at least 1)
    noise_dim: int = 64  # energy head: size of its uniform noise vector
    num_model_samples: int = 8  # N: head samples (energy) or (target, time, noise) draws per position
    num_target_samples: int = 100  # M
    energy_alpha: float = 1.0  # exponent of the distance in the energy score
    # Initialisation of the energy head's last layer: "zero" (the authors': every initial sample
    # is 0, and nothing before that layer gets a gradient until it has moved) or "xavier".
    head_init: str = "zero"
    # Discrete part of the head's noise: its first coordinate also picks one of this many learned
    # vectors (`EnergyHead`), so samples can fall into separate modes from the start. 0 = off
    # (the paper's purely continuous noise).
    head_noise_atoms: int = 0
    # Weight of an auxiliary, training-only cross-entropy: a light head predicts the next chunk's
    # K tokens from the backbone state h (through the tied input embedding). 0 = off (the paper).
    aux_token_weight: float = 0.0
    # Weight of a training-only cross-entropy of the frozen decoder's logits at one extra head
    # sample against the true next chunk: tells the head which latent regions decode to which
    # tokens. Not a proper score (it pulls samples to the observed chunk); 0 = off (the paper).
    decoder_ce_weight: float = 0.0
    head: str = "energy"  # generative head: "energy" (one pass per sample), "flow" or "diffusion"
    flow_steps: int = 10  # flow head: ODE steps from noise (t = 0) to a latent (t = 1) per sample
    flow_solver: str = "midpoint"  # flow head: "midpoint" (2 evaluations per step) or "euler" (1)
    diffusion_steps: int = 100  # diffusion head: respaced denoising steps per sample
    diffusion_solver: str = "ddpm"  # diffusion head: "ddpm" (ancestral) or "ddim" (deterministic)
    diffusion_train_steps: int = 1000  # diffusion head: steps of the training noise schedule
    diffusion_schedule: str = "cosine"  # diffusion head: "cosine" or "linear" betas
    diffusion_target: str = "v"  # diffusion head: the network predicts "v" (√ᾱ·ε − √(1−ᾱ)·z) or "eps"
    autoencoder: dict = field(default_factory=dict)  # AutoencoderConfig.to_dict() of the frozen AE

    @property
    def num_head_layers(self) -> int:
        return self.head_layers or max(1, self.num_layers // 4)

    def __post_init__(self):
        self._check_backbone()
        if self.head not in HEAD_NAMES:
            raise ConfigError(f"head must be one of {', '.join(HEAD_NAMES)}, not {self.head!r}")
        if self.head == "energy" and self.num_model_samples < 2:
            raise ConfigError("num_model_samples must be >= 2 (the energy score needs pairs)")
        if self.num_model_samples < 1:
            raise ConfigError("num_model_samples must be >= 1")
        if not 0 < self.energy_alpha < 2:
            raise ConfigError(
                "energy_alpha must be in (0, 2) to be strictly proper; the default 1 is advised"
            )
        if self.head_init not in ("zero", "xavier"):
            raise ConfigError(f"head_init must be 'zero' or 'xavier', not {self.head_init!r}")
        if self.head_noise_atoms < 0:
            raise ConfigError(f"head_noise_atoms must be >= 0, got {self.head_noise_atoms}")
        if not self.decoder_ce_weight >= 0:
            raise ConfigError(f"decoder_ce_weight must be >= 0, got {self.decoder_ce_weight}")
        if not self.aux_token_weight >= 0:
            raise ConfigError(f"aux_token_weight must be >= 0, got {self.aux_token_weight}")
        self._check_head_sampling()

    def _check_head_sampling(self) -> None:
        """Every head's settings are checked, whichever head is in use (a bad value is a typo)."""
        for name, choices in (
            ("flow_solver", FLOW_SOLVERS),
            ("diffusion_solver", DIFFUSION_SOLVERS),
            ("diffusion_schedule", DIFFUSION_SCHEDULES),
            ("diffusion_target", DIFFUSION_TARGETS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        for name in ("flow_steps", "diffusion_steps", "diffusion_train_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.diffusion_steps > self.diffusion_train_steps:
            raise ConfigError(
                f"diffusion_steps={self.diffusion_steps} exceeds diffusion_train_steps="
                f"{self.diffusion_train_steps}: the sampler respaces the training schedule, it cannot refine it"
            )


@dataclass
class ARConfig(BackboneConfig):
    """Token-level Transformer baseline: same backbone, token embedding and LM head."""

    kind: typing.ClassVar[str] = "ar"
    vocab_size: int = 8192
    tie_embeddings: bool = False  # the paper's Transformer baselines are untied


@dataclass
class TrainConfig(_Config):
    """Optimisation and bookkeeping for the one training loop."""

    kind: typing.ClassVar[str] = "train"
    steps: int = 1000
    batch_size: int = 16  # global batch, in windows of block_size tokens
    block_size: int = 256  # tokens per window
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    schedule: str = "constant"  # "constant" or "cosine" after warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    seed: int = 1234
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False
    max_bad_steps: int = 10  # consecutive non-finite losses before aborting
    # Per-module learning-rate factors, "prefix=factor,...": parameters whose name starts with
    # prefix + "." get lr x factor (e.g. "head=3" for CALM's energy head). Empty: one lr.
    lr_scale: str = ""
    # Recompute each Transformer block's activations in the backward pass instead of keeping
    # them (less memory, about a third more block compute; `calm.parallelize`).
    activation_checkpointing: bool = False
    # Peak dense bf16 FLOP/s of one device in TFLOP/s, for the MFU shown on CUDA; 0 = known
    # from the device's name (A100, H100 SXM, H200).
    peak_tflops: float = 0.0

    @property
    def lr_scales(self) -> dict[str, float]:
        """`lr_scale` parsed: {module prefix: factor}."""
        out = {}
        for item in filter(None, (part.strip() for part in self.lr_scale.split(","))):
            prefix, sep, value = item.partition("=")
            try:
                factor = float(value)
            except ValueError:
                factor = -1.0
            if not sep or not prefix.strip() or not factor > 0:
                raise ConfigError(f"lr_scale entry {item!r} is not of the form prefix=positive_factor")
            out[prefix.strip()] = factor
        return out

    def __post_init__(self):
        self.lr_scales  # noqa: B018  (validates lr_scale)
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', not {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype must be auto, fp32 or bf16, not {self.dtype!r}")
        for name in ("steps", "batch_size", "block_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not self.peak_tflops >= 0:
            raise ConfigError(f"peak_tflops must be >= 0 (0: from the device's name), got {self.peak_tflops}")


CONFIG_CLASSES = {c.kind: c for c in (AutoencoderConfig, CALMConfig, ARConfig)}


def config_from_dict(kind: str, data: dict[str, Any]):
    """Build the model config of `kind` ("autoencoder", "calm", "ar") from a dict."""
    if kind not in CONFIG_CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_dict(data)


# Names defined in `calm.presets` and `calm.config_overrides`, which import the classes above.
# They are re-exported on first use (PEP 562 module __getattr__) rather than imported at the end
# of this module: an eager import would be circular and fail when either module is imported first.
_REEXPORTS = {
    "PRESETS": "calm.presets",
    "preset": "calm.presets",
    "_paper_calm": "calm.presets",
    "_paper_ar": "calm.presets",
    "apply_overrides": "calm.config_overrides",
    "split_overrides": "calm.config_overrides",
    "_cast": "calm.config_overrides",
}

if typing.TYPE_CHECKING:  # for type checkers and editors; never run
    from calm.config_overrides import _cast, apply_overrides, split_overrides  # noqa: F401
    from calm.presets import PRESETS, _paper_ar, _paper_calm, preset  # noqa: F401


def __getattr__(name: str):
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REEXPORTS))
