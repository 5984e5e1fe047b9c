"""Token-level Transformer baseline (the paper's "Transformer-S/M/L").

The same Llama-style `Backbone` as CALM, run over tokens instead of chunks: a token embedding
in, a vocabulary projection (`lm_head`) out, trained with next-token cross-entropy. Its
parameters and FLOPs are accounted by the same rules as CALM's in `calm.flops`, so that the
two can be compared at equal compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import ARConfig
from calm.models.layers import init_weights
from calm.models.transformer import Backbone, KVCache


class TokenTransformer(nn.Module):
    """Decoder-only language model over tokens: embed -> Backbone -> lm_head.

    scaled_init: GPT-2 style, the residual output projections (attention `o_proj`, MLP
    `down_proj`) start at std 0.02 / sqrt(2 · num_layers) instead of 0.02. Off by default,
    so the baseline is initialised exactly like the CALM backbone.
    """

    def __init__(self, config: ARConfig, *, scaled_init: bool = False):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.backbone = Backbone(c)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, std=0.02)
        if scaled_init:
            std = 0.02 / math.sqrt(2 * c.num_layers)
            for block in self.backbone.layers:
                nn.init.normal_(block.attn.o_proj.weight, std=std)
                nn.init.normal_(block.mlp.down_proj.weight, std=std)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one Parameter, so checkpoints re-tie on load

    def logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, T, V] for `tokens` [B, T].

        positions / valid / cache are passed to the backbone (left padding and incremental
        decoding, see `calm.models.transformer`). Logits at position t predict token t + 1.
        """
        h = self.backbone(self.embed(tokens), positions=positions, valid=valid, cache=cache)
        return self.lm_head(h)

    def generate(self, input_ids, **kwargs):
        """Continue prompts (KV cache, batches of any lengths, temperature, seed, streaming).

        ``model.generate(input_ids, max_new_tokens=..., temperature=..., ...)``; the arguments and
        the returned new tokens per row are those of `calm.generation.generate`.
        """
        from calm.generation import generate

        return generate(self, input_ids, **kwargs)

    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean next-token cross-entropy over windows `tokens` [B, T] (T - 1 predictions per row)."""
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"expected token windows [B, T] with T >= 2, got shape {tuple(tokens.shape)}")
        logits = self.logits(tokens[:, :-1])
        targets = tokens[:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).float().mean()
            ce_d = ce.detach()
        return ce, {"ce": ce_d, "ppl": ce_d.exp(), "token_acc": acc}

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # The trainer calls model(tokens) rather than model.loss(...) so that DDP/FSDP hooks fire.
        return self.loss(tokens)

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules to shard as separate FSDP units (the Transformer blocks)."""
        return list(self.backbone.layers)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype=None, *, static=False
    ):
        """A KV cache for `batch_size` rows of at most `max_len` tokens (`Backbone.new_cache`)."""
        return self.backbone.new_cache(batch_size, max_len, device, dtype, static=static)
