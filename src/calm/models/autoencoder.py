"""Chunk autoencoder (stage 1): K tokens <-> one continuous vector (DESIGN §2.1).

Encoder: embed the K tokens, residual SwiGLU block(s) per position, flatten K·d, squeeze to
d, residual block(s), RMSNorm, linear to (μ, log σ). Decoder mirrors it and reads logits
through the tied input embedding. No attention: every chunk is coded on its own.

Training objective: K × mean token cross-entropy + β · Σ_dims max(KL_dim, kl_clamp) with
15% of input tokens replaced by a dedicated mask token and dropout on the sampled latent,
which makes the decoder robust to the imprecise vectors the language model will predict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import AutoencoderConfig
from calm.models.layers import ResidualMLP, RMSNorm, init_weights


class ChunkAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        K, d, half = c.chunk_size, c.d_model, c.num_layers // 2
        self.embed = nn.Embedding(c.vocab_size, d)
        self.encoder_pre = nn.ModuleList(ResidualMLP(d, c.ffn_dim, c.norm_eps) for _ in range(half))
        self.squeeze = nn.Linear(K * d, d)
        self.encoder_post = nn.ModuleList(ResidualMLP(d, c.ffn_dim, c.norm_eps) for _ in range(half))
        self.encoder_norm = RMSNorm(d, c.norm_eps)
        self.to_latent = nn.Linear(d, 2 * c.latent_dim)

        self.from_latent = nn.Linear(c.latent_dim, d)
        self.decoder_pre = nn.ModuleList(ResidualMLP(d, c.ffn_dim, c.norm_eps) for _ in range(half))
        self.expand = nn.Linear(d, K * d)
        self.decoder_post = nn.ModuleList(ResidualMLP(d, c.ffn_dim, c.norm_eps) for _ in range(half))
        self.decoder_norm = RMSNorm(d, c.norm_eps)
        self.lm_head = nn.Linear(d, c.vocab_size, bias=False)
        init_weights(self)
        self.lm_head.weight = self.embed.weight  # tied (after init, so both are the one tensor)

    # -- coding ---------------------------------------------------------------------------
    def encode(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of token chunks [..., K] -> (μ, log σ), each [..., l]."""
        K = self.config.chunk_size
        if chunks.shape[-1] != K:
            raise ValueError(
                f"expected chunks of {K} tokens in the last dimension, got shape {tuple(chunks.shape)}"
            )
        h = self.embed(chunks)  # [..., K, d]
        for block in self.encoder_pre:
            h = block(h)
        h = self.squeeze(h.flatten(-2))
        for block in self.encoder_post:
            h = block(h)
        mu, log_std = self.to_latent(self.encoder_norm(h)).chunk(2, dim=-1)
        return mu, log_std

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> final hidden states [..., K, d] (before the vocabulary projection)."""
        h = self.from_latent(z)
        for block in self.decoder_pre:
            h = block(h)
        h = self.expand(h).unflatten(-1, (self.config.chunk_size, self.config.d_model))
        for block in self.decoder_post:
            h = block(h)
        return self.decoder_norm(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> token logits [..., K, V]."""
        return self.lm_head(self.decode_hidden(z))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> most likely tokens [..., K]."""
        return self.decode_logits(z).argmax(-1)

    def to_chunks(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T/K, K] (T must be a multiple of K)."""
        K = self.config.chunk_size
        if tokens.shape[-1] % K:
            raise ValueError(f"sequence length {tokens.shape[-1]} is not a multiple of the chunk size {K}")
        return tokens.unflatten(-1, (tokens.shape[-1] // K, K))

    # -- training objective -----------------------------------------------------------------
    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """K × token cross-entropy + β × clipped KL on windows `tokens` [B, T]."""
        c = self.config
        chunks = self.to_chunks(tokens)
        inputs = chunks
        if self.training and c.token_mask_prob > 0:
            drop = torch.rand(chunks.shape, device=chunks.device) < c.token_mask_prob
            inputs = chunks.masked_fill(drop, c.mask_id)
        mu, log_std = self.encode(inputs)
        if self.training:
            z = mu + log_std.exp() * torch.randn_like(mu)
            z = F.dropout(z, c.latent_dropout, training=True)
        else:
            z = mu
        logits = self.decode_logits(z)
        ce = F.cross_entropy(logits.flatten(0, -2).float(), chunks.flatten())
        # KL(N(μ, σ²) || N(0, 1)) per latent dimension, clipped from below ("free bits").
        kl_dim = 0.5 * (mu.float().square() + (2 * log_std.float()).exp() - 1) - log_std.float()
        kl = kl_dim.clamp(min=c.kl_clamp).sum(-1).mean()
        loss = c.chunk_size * ce + c.kl_weight * kl
        with torch.no_grad():
            acc = (logits.argmax(-1) == chunks).float().mean()
            active = (kl_dim.mean(dim=tuple(range(kl_dim.dim() - 1))) > c.kl_clamp).float().mean()
        return loss, {"ce": ce.detach(), "kl": kl.detach(), "token_acc": acc, "active_fraction": active}

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.loss(tokens)
