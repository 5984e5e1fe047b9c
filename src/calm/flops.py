"""Parameter and FLOP accounting for CALM, the token baseline and the chunk autoencoder.

Everything is computed analytically from the config (no model is built, so paper sizes cost
nothing); the tests check the counts against instantiated modules (`numel`) and against
`torch.utils.flop_counter.FlopCounterMode` on real forward and backward passes.

Counting rules (they reproduce the paper's Table 1, DESIGN §2.5)
----------------------------------------------------------------
1. Parameters: every stored tensor once (a tied matrix counts once). A CALM model's "total"
   excludes its frozen autoencoder, as the paper does; the autoencoder is reported separately.
2. Matmul FLOPs = 2 × the weight-matrix entries a position's forward pass multiplies by.
   Biases, norms, activations, softmax, rotary, residual adds, noise sampling and the
   element-wise parts of the energy score are not counted (well under 1%). Embedding
   lookups are free; a vocabulary projection (the baseline's LM head, the autoencoder
   decoder's tied head) counts in full, tied or not.
3. Attention scores: QKᵀ and A·V cost 2·2·T·d per layer per position, with T the context in
   backbone positions (tokens for the baseline, chunks for CALM) taken in full, i.e. no
   discount for the causal mask. Default T = the config's `max_seq_len`, 2048 for the paper
   presets (for CALM that is 2048 chunks = 8192 tokens). This is what reproduces the paper's
   numbers: with T = 512 chunks (2048 tokens) CALM-M would be 2.65e8 instead of 2.9e8
   FLOPs/token and CALM-L 4.2e8 instead of 4.6e8. `include_attention=False` drops the term.
4. Training = 3 × forward (forward, backward to activations, backward to weights) for the
   trained parts, except the energy head's noise projection, whose input (the noise) needs
   no gradient: 2 × forward. CALM's frozen autoencoder encoder, which encodes the target
   chunks, runs forward only (1 ×); its decoder is not used in training.
5. Energy head: N = `num_model_samples` forward passes per position in training and
   `inference_samples` (default 1) at inference. The terms that depend on the hidden state
   h alone are counted once per position, shared by the samples, because that is how
   `calm.models.energy.EnergyHead` computes them: the projection `hidden_embd(h)` (d·d) and,
   in every block, the h-half of the first Linear(2d→d) (d·d). Set
   `SHARED_HIDDEN_TERMS = False` to count a naive head that repeats them per sample (as the
   authors' code does by repeating h); CALM-M training then costs 8% more.
   The energy score's N×M cross distances are one batched matmul, 2·N·M·l per position
   forward and as much backward (the targets carry no gradient), plus the samples' N×N Gram
   matrix for the diversity term (2·N²·l forward, twice that backward); this "energy_loss" term is
   counted (it is ~0.01% of the total) so the count matches a measured training step exactly.
   Flow and diffusion heads (``config.head``; `calm.models.adaln_mlp.AdaLNMLP`): per network
   evaluation, the input projection, the blocks' MLPs and the output projection run per
   sample row; the time embedding (sinusoid → MLP) and the adaptive-LayerNorm modulations run
   per (position, time), and the h-projection ``cond_embed`` once per position. Training: N
   draws per position, each with its own time, so everything but ``cond_embed`` N times; the
   input projection and the time MLP's first layer take inputs without gradient (2 × forward).
   Inference: `evals_per_sample` evaluations per sample (flow: steps, × 2 for the midpoint
   rule; diffusion: steps), the per-time terms shared by a position's samples, as the code
   computes them. The time MLP is counted per position although one call computes it once for
   all the positions it samples (a few per cent of one evaluation, on a batch of one it is
   exact). Their losses (mean squared errors) are element-wise, not counted.
6. Per text token: a CALM step produces K tokens, so per-step costs are divided by K. CALM
   inference includes decoding each predicted vector with the autoencoder decoder, with its
   K vocabulary projections. Baseline inference is one forward pass of backbone + LM head.
7. Autoencoder alone: encoder + decoder forward per chunk / K; training 3 ×.

The paper's figures (Table 1) and ours, with the defaults. Training FLOPs are compared as
ratios to Transformer-S: the paper gives totals over its training budget, assumed common to
all rows (its totals divided by our per-token counts give 4.9e11-5.3e11 tokens for every row).
  model          params          inference FLOPs/token   training, rel. to Transformer-S
                 paper   ours    paper    ours           paper   ours
  Transformer-S  281M    282.0M  4.4e8    4.42e8         1       1
  Transformer-M  465M    465.1M  7.9e8    8.02e8         1.80    1.81
  Transformer-L  849M    847.0M  15.0e8   15.0e8         3.41    3.40
  CALM-M         371M    371.7M  2.9e8    2.91e8         0.56    0.53
  CALM-L         735M    735.3M  4.6e8    4.56e8         1.17    1.12
  CALM-XL        1.82B   1.83B   9.4e8    9.71e8         2.95    2.99
CALM training comes out a little cheaper than in the paper because our head shares its
h-only terms between the N samples (rule 5); with SHARED_HIDDEN_TERMS = False CALM-M is 0.57.
"""

from __future__ import annotations

import math
from typing import Any

from calm.config import PRESETS, ARConfig, AutoencoderConfig, CALMConfig, ConfigError
from calm.flops_counts import (  # re-exported: the counts are imported from calm.flops
    ADALN_FREQ_DIM,  # noqa: F401 (re-exported only)
    adaln_head_counts,
    attention_flops,
    autoencoder_counts,
    backbone_counts,
    compression_counts,
    count_parameters,  # noqa: F401 (re-exported only)
    energy_head_counts,
    head_evals_per_sample,
)

# Rule 5: the energy head's h-only terms (hidden_embd and the h-half of each block's first linear
# layer) are computed once per position and broadcast over the samples, as EnergyHead does.
SHARED_HIDDEN_TERMS = True


# ---------------------------------------------------------------------------------------------
# Reports


def _pick_autoencoder(cfg: CALMConfig, autoencoder_config) -> tuple[AutoencoderConfig, str]:
    if autoencoder_config is not None:
        ae, source = autoencoder_config, "given"
    elif cfg.autoencoder:
        ae, source = AutoencoderConfig.from_dict(cfg.autoencoder), "the CALM config"
    else:
        # What CALM(config) builds when its config names no autoencoder: default sizes with the
        # CALM vocabulary, K and l. For the paper presets that is exactly the "ae-paper" preset.
        ae = AutoencoderConfig(
            vocab_size=cfg.vocab_size, chunk_size=cfg.chunk_size, latent_dim=cfg.latent_dim
        )
        same = [n for n, p in PRESETS.items() if isinstance(p, AutoencoderConfig) and p == ae]
        source = (
            "assumed, the CALM config names none: default AutoencoderConfig sizes, as CALM(config) builds"
        )
        if same:
            source += f" (= preset {same[0]!r})"
    for name in ("vocab_size", "chunk_size", "latent_dim"):
        if getattr(ae, name) != getattr(cfg, name):
            raise ConfigError(
                f"autoencoder {name}={getattr(ae, name)} does not match the CALM model's {getattr(cfg, name)}"
            )
    return ae, source


def flops_report(
    config,
    *,
    autoencoder_config: AutoencoderConfig | None = None,
    context: int | None = None,
    include_attention: bool = True,
    inference_samples: int = 1,
    train_tokens: float | None = None,
) -> dict[str, Any]:
    """Parameters and FLOPs per text token for a CALM, AR or autoencoder config.

    context: attention context in backbone positions (default `config.max_seq_len`).
    inference_samples: head samples (each decoded) per CALM step at inference, e.g. the
        N candidates of the batch temperature sampler; 1 for plain sampling.
    train_tokens: if given, also report the total training FLOPs for that many tokens.
    Returns a JSON-serialisable dict; the counting rules are in the module docstring.
    """
    kind = config.kind
    if kind not in ("calm", "ar", "autoencoder"):
        raise ConfigError(f"no FLOP accounting for config kind {kind!r}")
    if inference_samples < 1:
        raise ConfigError("inference_samples must be >= 1")
    notes: list[str] = []
    params: dict[str, int] = {}
    train: dict[str, float] = {}  # per text token
    infer: dict[str, float] = {}
    report: dict[str, Any] = {"kind": kind}

    if kind == "autoencoder":
        K = config.chunk_size
        counts = autoencoder_counts(config)
        params.update(embeddings=counts["embeddings"], encoder=counts["encoder"], decoder=counts["decoder"])
        params["total"] = counts["total"]
        enc, dec = 2 * counts["encoder_matmul"] / K, 2 * counts["decoder_matmul"] / K
        train.update(encoder=3 * enc, decoder=3 * dec)
        infer.update(encoder=enc, decoder=dec)
        report.update(tokens_per_step=K, context=None, context_tokens=None, attention_included=False)
        notes.append(
            "no attention: every chunk is coded on its own; the decoder's tied vocabulary projection counts"
        )
    else:
        T = config.max_seq_len if context is None else int(context)
        if T < 1:
            raise ConfigError("context must be >= 1")
        bb_params, bb_matmul = backbone_counts(config)
        attn = attention_flops(config, T) if include_attention else 0
        d, V = config.d_model, config.vocab_size
        if kind == "ar":
            K = 1
            lm_params = 0 if config.tie_embeddings else V * d
            params.update(embeddings=V * d, backbone=bb_params, lm_head=lm_params)
            params["total"] = V * d + bb_params + lm_params
            fwd = {"backbone": 2 * bb_matmul, "attention": attn, "lm_head": 2 * V * d}
            train.update({k: 3 * v for k, v in fwd.items()})
            infer.update(fwd)
            if config.tie_embeddings:
                notes.append("LM head tied to the embedding: stored once, but its matmul counts")
        else:
            K = config.chunk_size
            ae, ae_source = _pick_autoencoder(config, autoencoder_config)
            ae_counts = autoencoder_counts(ae)
            comp_params, comp_matmul = compression_counts(config)
            N = config.num_model_samples
            head_key = f"{config.head}_head"
            if config.head == "energy":
                head_params, head_matmul, h_only = energy_head_counts(config)
                shared = h_only if SHARED_HIDDEN_TERMS else 0
                noise_proj = 2 * N * config.noise_dim * d  # forward FLOPs; backward: weight gradient only
                head_train = 3 * (2 * (N * (head_matmul - shared) + shared) - noise_proj) + 2 * noise_proj
                head_infer = 2 * (inference_samples * (head_matmul - shared) + shared)
                # N×M cross distances (fwd + bwd to the samples) and the N×N Gram matrix of the
                # samples for the diversity term (fwd + bwd through both operands)
                head_loss = {
                    "energy_loss": 2 * 2 * N * config.num_target_samples * config.latent_dim
                    + 3 * 2 * N * N * config.latent_dim
                }
            else:
                c = adaln_head_counts(config)
                head_params, evals = c["params"], head_evals_per_sample(config)
                fwd = 2 * (N * (c["per_row"] + c["per_time"]) + c["per_position"])
                head_train = 3 * fwd - 2 * N * c["no_input_grad"]
                head_infer = 2 * (
                    evals * (inference_samples * c["per_row"] + c["per_time"]) + c["per_position"]
                )
                head_loss = {}
            params.update(
                embeddings=V * d, input_compression=comp_params, backbone=bb_params, **{head_key: head_params}
            )
            params["total"] = V * d + comp_params + bb_params + head_params
            params["autoencoder"] = ae_counts["total"]
            params["total_with_autoencoder"] = params["total"] + ae_counts["total"]
            step_train = {
                "input_compression": 3 * 2 * comp_matmul,
                "backbone": 3 * 2 * bb_matmul,
                "attention": 3 * attn,
                head_key: head_train,
                **head_loss,
                "ae_encoder": 2 * ae_counts["encoder_matmul"],  # frozen, forward only
            }
            if config.aux_token_weight > 0:  # training only: h -> K·d, then K tied vocab projections
                step_train["aux_token_head"] = 3 * 2 * (K * d * d + K * d * V)
                params["aux_token_head"] = K * d * d + K * d + d
                params["total"] += params["aux_token_head"]
                params["total_with_autoencoder"] += params["aux_token_head"]
                notes.append("auxiliary token head (training only): its matmuls count in training FLOPs")
            if config.decoder_ce_weight > 0:  # one more head sample, through the frozen decoder
                per_sample = head_train / max(1, N) if config.head == "energy" else 0
                step_train["decoder_ce"] = per_sample + 3 * 2 * ae_counts["decoder_matmul"]
                notes.append(
                    "decoder cross-entropy (training only): one head sample + the decoder, fwd + bwd"
                )
            step_infer = {
                "input_compression": 2 * comp_matmul,
                "backbone": 2 * bb_matmul,
                "attention": attn,
                head_key: head_infer,
                "ae_decoder": inference_samples * 2 * ae_counts["decoder_matmul"],
            }
            train.update({k: v / K for k, v in step_train.items()})
            infer.update({k: v / K for k, v in step_infer.items()})
            report["autoencoder"] = {"source": ae_source, "config": ae.to_dict()}
            notes.append(
                f"autoencoder config: {ae_source}; its {ae_counts['total'] / 1e6:.1f}M parameters "
                "are excluded from the total, as in the paper"
            )
            if config.head == "energy":
                notes.append(
                    f"energy head run N={N} times per position in training, {inference_samples} at inference; "
                    + (
                        "its h-only terms (hidden_embd, h-half of each block's first linear) once per position"
                        if SHARED_HIDDEN_TERMS
                        else "all of it once per sample"
                    )
                )
            else:
                how = (
                    f"{config.flow_steps} {config.flow_solver} step(s)"
                    if config.head == "flow"
                    else f"{config.diffusion_steps} {config.diffusion_solver} step(s)"
                )
                notes.append(
                    f"{config.head} head: N={N} (target, time, noise) draws per position in training; "
                    f"{head_evals_per_sample(config)} network evaluation(s) per sample at inference ({how}), "
                    f"{inference_samples} sample(s) per step; time embedding and modulations once per "
                    "position and evaluation, shared by its samples"
                )
            report["head"] = {"name": config.head, "evals_per_sample": head_evals_per_sample(config)}
            notes.append(
                "training: frozen AE encoder forward only (targets); inference: AE decoder incl. its "
                "vocabulary projection, per step; all per-step costs divided by K per text token"
            )
        report.update(
            tokens_per_step=K, context=T, context_tokens=T * K, attention_included=include_attention
        )
        if include_attention:
            unit = "chunks" if kind == "calm" else "tokens"
            notes.append(f"attention scores counted over the full context of {T} {unit} (no causal discount)")

    report["params"] = params
    report["flops_per_token"] = {"train": train, "inference": infer}
    report["train_flops_per_token"] = float(sum(train.values()))
    report["inference_flops_per_token"] = float(sum(infer.values()))
    if train_tokens is not None:
        report["train_tokens"] = float(train_tokens)
        report["train_flops_total"] = report["train_flops_per_token"] * float(train_tokens)
    report["notes"] = notes
    return report


# Peak dense bf16 tensor-core FLOP/s per device (vendor data sheets, without sparsity).
PEAK_BF16_FLOPS = {"A100": 312e12, "H100 SXM": 989e12, "H200": 989e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a CUDA device name (``torch.cuda.get_device_name()``), or None.

    Known: A100 (any form), H100 SXM (reported as "H100 80GB HBM3" or "H100 SXM..."), H200.
    The H100 PCIe and NVL variants are slower and not guessed: pass ``--peak-tflops``.
    """
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        return PEAK_BF16_FLOPS["H100 SXM"] if ("SXM" in name or "HBM3" in name) else None
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None


def peak_flops(device, peak_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one training device for MFU: ``peak_tflops`` × 1e12 if given, else
    `peak_bf16_flops` of the CUDA device's name; None off CUDA (no MFU on CPUs)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    if peak_tflops > 0:
        return peak_tflops * 1e12
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def predicted_speed_ratio(
    calm_cfg: CALMConfig,
    ar_cfg: ARConfig,
    mode: str = "train",
    *,
    autoencoder_config: AutoencoderConfig | None = None,
    context_tokens: int | None = None,
    include_attention: bool = True,
) -> float:
    """AR FLOPs per token / CALM FLOPs per token ("train" or "inference"); > 1 means CALM is cheaper.

    context_tokens: the same text window for both (AR attends over that many tokens, CALM over
    ceil(context_tokens / K) chunks); by default each config's own `max_seq_len` is used.
    """
    if mode not in ("train", "inference"):
        raise ValueError(f"mode must be 'train' or 'inference', not {mode!r}")
    ar_ctx = calm_ctx = None
    if context_tokens is not None:
        ar_ctx, calm_ctx = context_tokens, math.ceil(context_tokens / calm_cfg.chunk_size)
    key = f"{mode}_flops_per_token"
    ar = flops_report(ar_cfg, context=ar_ctx, include_attention=include_attention)[key]
    calm = flops_report(
        calm_cfg, autoencoder_config=autoencoder_config, context=calm_ctx, include_attention=include_attention
    )[key]
    return ar / calm


# The `calm flops` command (its options, the target loader and the report's text table) lives in
# `calm.flops_cli`, which imports this module; its names stay importable from here, looked up on
# first use so that neither module imports the other at load time in both directions.
_CLI_NAMES = frozenset(
    {
        "load_target",
        "add_flops_arguments",
        "run_flops",
        "format_report",
        "_fmt_params",
        "_LABELS",
        "_list_presets",
    }
)


def __getattr__(name: str):
    if name in _CLI_NAMES:
        from calm import flops_cli

        return getattr(flops_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
