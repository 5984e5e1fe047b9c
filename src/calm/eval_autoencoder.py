"""Reconstruction quality of a chunk autoencoder (`calm eval AE_DIR`).

The language model never hands the decoder the exact μ of a chunk: it predicts a vector
near it. So besides z = μ we measure the decoder under the encoder's own posterior noise
(z ~ N(μ, σ²)) and under fixed Gaussian noise of scale σ ∈ {0.1, 0.2, 0.3, 0.5} added to μ.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

NOISE_LEVELS = (0.1, 0.2, 0.3, 0.5)


@torch.no_grad()
def reconstruction_report(
    ae,
    tokens: torch.Tensor,
    *,
    batch_chunks: int = 4096,
    noise_levels=NOISE_LEVELS,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Token accuracy and whole-chunk exact match of `ae` on a flat token stream.

    tokens: 1-D LongTensor; it is cut into consecutive chunks of K (a ragged tail is dropped).
    Returns {"chunks", "tokens", "mean_sigma", "settings": {name: {"token_acc", "chunk_acc"}}}
    where the settings are "mu", "posterior" and "noise_<σ>".
    """
    ae.eval()
    K = ae.config.chunk_size
    device = next(ae.parameters()).device
    n_chunks = tokens.numel() // K
    if n_chunks == 0:
        raise ValueError(f"need at least {K} tokens to evaluate an autoencoder, got {tokens.numel()}")
    chunks_all = tokens[: n_chunks * K].view(n_chunks, K)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = ["mu", "posterior"] + [f"noise_{s:g}" for s in noise_levels]
    tok_ok = dict.fromkeys(names, 0)
    chunk_ok = dict.fromkeys(names, 0)
    sigma_sum = 0.0
    bar = tqdm(total=n_chunks * K, unit="tok", desc="reconstruct", disable=not progress, leave=False)
    for start in range(0, n_chunks, batch_chunks):
        chunks = chunks_all[start : start + batch_chunks].to(device)
        mu, log_std = ae.encode(chunks)
        sigma = log_std.exp()
        sigma_sum += float(sigma.float().mean()) * chunks.shape[0]
        latents = {"mu": mu, "posterior": mu + sigma * torch.randn(mu.shape, generator=gen, device=device)}
        for s in noise_levels:
            latents[f"noise_{s:g}"] = mu + s * torch.randn(mu.shape, generator=gen, device=device)
        for name, z in latents.items():
            match = ae.decode(z) == chunks
            tok_ok[name] += int(match.sum())
            chunk_ok[name] += int(match.all(-1).sum())
        bar.update(chunks.numel())
    bar.close()
    settings = {
        name: {
            "token_acc": tok_ok[name] / (n_chunks * K),
            "chunk_acc": chunk_ok[name] / n_chunks,
            # binomial standard error of the token accuracy (tokens treated as independent)
            "token_acc_se": math.sqrt(max(tok_ok[name] * (n_chunks * K - tok_ok[name]), 0))
            / (n_chunks * K) ** 1.5,
        }
        for name in names
    }
    return {
        "chunks": n_chunks,
        "tokens": n_chunks * K,
        "mean_sigma": sigma_sum / n_chunks,
        "settings": settings,
    }


def format_reconstruction(report: dict) -> str:
    """A small markdown table of a `reconstruction_report`."""
    lines = [
        f"Autoencoder reconstruction on {report['tokens']:,} tokens ({report['chunks']:,} chunks); "
        f"mean posterior σ = {report['mean_sigma']:.3f}",
        "",
        "| latent | token accuracy | chunk exact match |",
        "|---|---:|---:|",
    ]
    labels = {"mu": "z = μ", "posterior": "z ~ N(μ, σ²) (posterior)"}
    for name, row in report["settings"].items():
        label = labels[name] if name in labels else f"z = μ + N(0, {name.removeprefix('noise_')}²)"
        lines.append(f"| {label} | {100 * row['token_acc']:.3f}% | {100 * row['chunk_acc']:.3f}% |")
    return "\n".join(lines)
