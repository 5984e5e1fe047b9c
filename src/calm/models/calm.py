"""CALM language model (stage 2, DESIGN §2.2): next-vector prediction over chunks of K tokens.

    tokens [B, T] ─ chunks [B, C, K] ─ embed + compress ─ backbone ─ h [B, C, d] ─ head ─ z̃
                                                                        ↑ h at chunk i predicts chunk i+1

The input at step i is chunk i's K *tokens* (embedded, flattened and compressed to d), not
its latent vector. The training target of step i is the frozen autoencoder's posterior of
chunk i+1. The generative head (`config.head`, `calm.models.head`) turns that posterior into
its loss: the default energy head draws M vectors from it and N of its own, and the energy
loss compares the two sets; the flow and diffusion heads regress a velocity / the noise on
posterior draws. The autoencoder is frozen (no gradients, always in eval mode) and
part of the module, so a CALM checkpoint carries it and one directory is enough to generate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import AutoencoderConfig, CALMConfig, ConfigError
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.energy import energy_loss
from calm.models.head import build_head
from calm.models.layers import RMSNorm, init_weights
from calm.models.transformer import Backbone, KVCache


def _autoencoder_config(config: CALMConfig) -> AutoencoderConfig:
    """The frozen AE's config: `config.autoencoder`, or one matching the CALM sizes if empty."""
    if config.autoencoder:
        ae = AutoencoderConfig.from_dict(dict(config.autoencoder))
    else:
        ae = AutoencoderConfig(
            vocab_size=config.vocab_size, chunk_size=config.chunk_size, latent_dim=config.latent_dim
        )
    _check_compatible(config, ae)
    return ae


def _check_compatible(config: CALMConfig, ae: AutoencoderConfig) -> None:
    for name in ("vocab_size", "chunk_size", "latent_dim"):
        if getattr(config, name) != getattr(ae, name):
            raise ConfigError(
                f"CALM config has {name}={getattr(config, name)} but its autoencoder has "
                f"{name}={getattr(ae, name)}; they must agree (set {name}={getattr(ae, name)})"
            )


class NextChunkTokenHead(nn.Module):
    """Light auxiliary head: h [..., d] -> logits [..., K, V] for the next chunk's K tokens.

    Linear(d -> K·d), RMSNorm per token position, logits through the CALM input embedding
    (tied, so the head adds only K·d² parameters). Trained with cross-entropy beside the energy
    loss to give the backbone a dense, token-level learning signal; sampling never uses it.
    """

    def __init__(self, d_model: int, chunk_size: int, eps: float = 1e-6):
        super().__init__()
        self.chunk_size = chunk_size
        self.proj = nn.Linear(d_model, chunk_size * d_model)
        self.norm = RMSNorm(d_model, eps)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.proj(h).unflatten(-1, (self.chunk_size, h.shape[-1]))
        return F.linear(self.norm(x), embedding)


class CALM(nn.Module):
    """Continuous autoregressive LM: compressed chunk inputs, Transformer backbone, generative head."""

    def __init__(self, config: CALMConfig):
        super().__init__()
        ae_config = _autoencoder_config(config)
        if not config.autoencoder:
            config = config.replace(autoencoder=ae_config.to_dict())
        self.config = config
        d, K = config.d_model, config.chunk_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.compress = nn.Sequential(
            nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=config.norm_eps)
        )
        self.backbone = Backbone(config)
        init_weights(self)  # embed, compress, backbone: N(0, 0.02)
        self.head = build_head(config)  # the energy head unless config.head says otherwise
        # Training-only auxiliary head (aux_token_weight > 0): h -> the next chunk's K tokens.
        self.token_head = NextChunkTokenHead(d, K, config.norm_eps) if config.aux_token_weight > 0 else None
        self.autoencoder = ChunkAutoencoder(ae_config)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    @classmethod
    def from_autoencoder(cls, config: CALMConfig, autoencoder: ChunkAutoencoder) -> CALM:
        """A fresh CALM whose frozen autoencoder is a copy of the trained `autoencoder`."""
        _check_compatible(config, autoencoder.config)
        model = cls(config.replace(autoencoder=autoencoder.config.to_dict()))
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model

    def train(self, mode: bool = True) -> CALM:
        """As `nn.Module.train`, except that the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules to shard one by one under FSDP2 (the backbone's Transformer blocks)."""
        return list(self.backbone.layers)

    # -- inputs and hidden states ---------------------------------------------------------------
    def to_chunks(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T/K, K] (T must be a multiple of K)."""
        return self.autoencoder.to_chunks(tokens)

    def chunk_inputs(self, chunks: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone inputs for token chunks [B, C, K] -> [B, C, d].

        token_valid: [B, C, K] bool, False for pad tokens; their embeddings are zeroed, so a
        left-padded partial chunk carries only its real tokens.
        """
        e = self.embed(chunks)  # [B, C, K, d]
        if token_valid is not None:
            e = e * token_valid.unsqueeze(-1).to(e.dtype)
        return self.compress(e.flatten(-2))

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        token_valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, C, d]; the state at chunk i predicts chunk i+1.

        tokens: [B, T] (T a multiple of K) or chunks [B, C, K]; token_valid has the same shape.
        positions, valid, cache: passed to the backbone (chunk-level position ids, chunk-level
        validity for left padding, and a `KVCache` for incremental decoding).
        """
        if tokens.dim() == 2:
            tokens = self.to_chunks(tokens)
            if token_valid is not None:
                token_valid = self.to_chunks(token_valid)
        x = self.chunk_inputs(tokens, token_valid)
        return self.backbone(x, positions=positions, valid=valid, cache=cache)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype=None, *, static=False
    ):
        """A KV cache for `batch_size` rows of at most `max_len` chunks (`Backbone.new_cache`)."""
        return self.backbone.new_cache(batch_size, max_len, device, dtype, static=static)

    # -- sampling -------------------------------------------------------------------------------
    def set_head_sampling(self, steps: int | None = None, solver: str | None = None) -> CALM:
        """Change the head's sampling steps / solver at use time (config and head; the weights
        do not depend on them). ConfigError naming the setting if it is bad or the head has none
        (the energy head samples in one pass). Returns self."""
        changes = self.head.sampling_changes(steps, solver)
        if changes:
            self.config = self.config.replace(**changes)  # validated by CALMConfig
            self.head.configure(self.config)
        return self

    def sample_latents(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Head samples: hidden [..., d] -> latent vectors [..., num_samples, l]."""
        return self.head.sample(hidden, num_samples, generator=generator)

    @torch.no_grad()
    def sample_chunks(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sampled next chunks: hidden [..., d] -> tokens [..., num_samples, K] (AE decoder argmax)."""
        return self.autoencoder.decode(self.sample_latents(hidden, num_samples, generator))

    def generate(self, input_ids, **kwargs):
        """Continue prompts (KV cache, batches of any lengths, temperature, seed, streaming).

        ``model.generate(input_ids, max_new_tokens=..., temperature=..., ...)``; the arguments and
        the returned new tokens per row are those of `calm.generation.generate`.
        """
        from calm.generation import generate

        return generate(self, input_ids, **kwargs)

    # -- training objective ---------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean head loss (energy loss by default) over chunk positions 1..C-1 of windows `tokens` [B, T].

        With ``aux_token_weight`` > 0, plus that weight times the auxiliary head's mean token
        cross-entropy (metric ``aux_ce``). In eval mode, for the energy head, the metrics also hold two
        reference values of the same energy loss, from the frozen autoencoder alone:
        ``oracle_energy`` (samples from the true next chunk's posterior: the floor) and
        ``context_free_energy`` (posterior samples of random other chunks of the batch: what a
        predictor that ignores the context scores). `derived_metrics` turns them into the
        fraction of that gap the model has closed.
        """
        c = self.config
        chunks = self.to_chunks(tokens)
        B, C, _ = chunks.shape
        if C < 2:
            raise ValueError(
                f"a training window needs at least 2 chunks of {c.chunk_size} tokens, got {tokens.shape[-1]} tokens"
            )
        # The last chunk is only ever a target: its hidden state would predict nothing.
        h = self.hidden(chunks[:, :-1])  # [B, C-1, d]
        with torch.no_grad():
            mu, log_std = self.autoencoder.encode(chunks[:, 1:])
            mu, std = mu.float(), log_std.float().exp()
        per_pos, metrics = self.head.loss(h, mu, std)  # [B, C-1]; the head draws its own targets
        loss = per_pos.mean()
        if self.token_head is not None or c.decoder_ce_weight > 0 or not self.training:
            metrics["energy" if c.head == "energy" else "head_loss"] = loss.detach()  # without the aux term
        if self.token_head is not None:
            logits = self.token_head(h, self.embed.weight)  # [B, C-1, K, V]
            aux = F.cross_entropy(logits.flatten(0, -2).float(), chunks[:, 1:].flatten())
            loss = loss + c.aux_token_weight * aux
            metrics["aux_ce"] = aux.detach()
        if c.decoder_ce_weight > 0:
            z = self.head.sample(h, 1)[..., 0, :]  # [B, C-1, l], with gradient to the head
            logits = self.autoencoder.decode_logits(z)  # frozen decoder, gradient flows through
            dce = F.cross_entropy(logits.flatten(0, -2).float(), chunks[:, 1:].flatten())
            loss = loss + c.decoder_ce_weight * dce
            metrics["decoder_ce"] = dce.detach()
        if not self.training and c.head == "energy":
            with torch.no_grad():
                metrics.update(self._reference_energies(mu, std))
        return loss, metrics

    def _reference_energies(self, mu: torch.Tensor, std: torch.Tensor) -> dict:
        """Energy loss of two samplers that need no model (see `loss`), all relative to mu."""
        c = self.config
        N, l = c.num_model_samples, c.latent_dim
        lead = mu.shape[:-1]
        targets = torch.randn((*lead, c.num_target_samples, l), device=mu.device).mul_(std.unsqueeze(-2))
        oracle = torch.randn((*lead, N, l), device=mu.device).mul_(std.unsqueeze(-2))
        flat_mu, flat_std = mu.reshape(-1, l), std.reshape(-1, l)
        pick = torch.randint(0, flat_mu.shape[0], (*lead, N), device=mu.device)
        other = flat_mu[pick] + torch.randn((*lead, N, l), device=mu.device) * flat_std[pick]
        context_free = other - mu.unsqueeze(-2)
        return {
            "oracle_energy": energy_loss(oracle, targets, c.energy_alpha, center=False).mean(),
            "context_free_energy": energy_loss(context_free, targets, c.energy_alpha, center=False).mean(),
        }

    @staticmethod
    def derived_metrics(means: dict) -> dict:
        """``gap_closed`` = (context-free − loss) / (context-free − oracle) of averaged eval metrics:
        0 for a predictor that ignores the context, 1 for the true posterior (see `loss`)."""
        try:
            energy, cf, oracle = means["energy"], means["context_free_energy"], means["oracle_energy"]
        except KeyError:
            return {}
        return {"gap_closed": (cf - energy) / (cf - oracle)} if cf > oracle else {}

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.loss(tokens)
