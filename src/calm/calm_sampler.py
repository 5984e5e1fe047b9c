"""One CALM decoding step's choice of the next chunk, for every row of a batch.

`ChunkSampler(model, rng, temperature=..., sampler=...)` is called with the backbone's hidden
states of the rows still decoding and the step number, and returns their next chunks. It owns
the temperature rule (DESIGN §2.4, `calm.sampling`) and the decoder (`calm.decoding`):

* T = 1: one head sample per row, decoded.
* ``sampler="exact"`` at T < 1: `calm.sampling.sample_exact`, drawing in doubling blocks only
  until a row accepts (at most ``max_draws`` per row and step; a row that reaches the bound gets
  the batch approximation over its draws). The first block of a step is as large as the
  previous step needed, so a flat model draws its bound in one call.
* ``sampler="approx"``: ``num_samples`` head samples, `calm.sampling.sample_approx`.

There is no cheap "noise temperature": scaling the energy head's input noise (which acts through
the noise projection's bias, before ``norm_noise``) traces the exact sampler's accuracy-diversity
curve only down to a scale of about 0.3 and collapses diversity below it
(benchmarks/bench_sampler_curves.py, docs/sampler_curves.png), so it is not offered.

Both temperature samplers only compare chunks for equality. On the CPU their draws are
therefore told apart by `calm.decoding.DrawClasses`, which decodes a draw's first token, and
the rest of its chunk only if another draw of the row shares that token; the chosen chunk is
decoded in full. On other devices every draw is decoded in full in one batched call (no host round trip
per position). Either way the result is the same chunk.

Randomness comes from the rows' counter-based streams (`calm.rng.RowRandom`): a row's head
noise, coins and choices depend on its seed, the step and the draw position only, so a row's
output does not depend on the other rows of the batch.
"""

from __future__ import annotations

import torch

from calm.decoding import ChunkDecoder, DrawClasses
from calm.rng import NoiseBlocks, RowRandom
from calm.sampling import sample_approx, sample_exact, split_inverse_temperature

__all__ = ["SAMPLERS", "ChunkSampler"]

SAMPLERS = ("exact", "approx")
EXACT_MAX_BLOCK = 64  # the exact sampler's draws per call double up to this

# RowRandom stream keys (purpose, step, ...): fixed, so a seed gives the same text across versions
_HEAD_NOISE, _CHOICE, _EXACT_NOISE, _EXACT_COINS, _EXACT_LIMIT = 2, 3, 4, 5, 6


def _head_decode(head, ae, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Head samples decoded by the plain float32 argmax (the reference path, for compiling)."""
    return ae.decode_logits(head(h, noise)).argmax(-1)


class ChunkSampler:
    """Next chunks [b, K] from hidden states [b, d] (see the module docstring).

    stats: an object whose ``draws``, ``decoded_positions``, ``exact_hit_limit`` and
    ``fused_draws`` counters are increased (e.g. `calm.generation.GenerationStats`).
    timer: an object with ``lap(phase)`` (profiling), or None.
    fused_kernel: a `calm.fused_decode.FusedHeadDecoder` for steps of at most
    `calm.fused_decode.MAX_ROWS` latents at T = 1 on the CPU, or None.
    """

    def __init__(
        self,
        model,
        rng: RowRandom,
        *,
        temperature: float,
        sampler: str = "exact",
        num_samples: int = 200,
        max_draws: int | None = None,
        draws_per_call: int = 8,
        stats=None,
        timer=None,
        fused_kernel=None,
        compile: bool = False,
        lazy_draws: bool | None = None,
    ):
        self.model, self.rng, self.T = model, rng, temperature
        self.decoder = ChunkDecoder.for_model(model)
        self.n, self.alpha = split_inverse_temperature(temperature)
        self.head = head = model.head  # any `calm.models.head.GenerativeHead`
        self.noise_dim, self.noise_dtype = head.noise_dim, head.noise_dtype
        if self.n == 1 and self.alpha == 0.0:
            self.mode = "single"
        else:
            self.mode = sampler
        self.N = num_samples
        self.max_draws = num_samples if max_draws is None else max_draws
        self.draws_per_call = draws_per_call
        self.first_block = draws_per_call  # the exact sampler's first block; adapts step to step
        self.stats, self.timer, self.fused_kernel = stats, timer, fused_kernel
        self.compiled_sample = None
        # T = 1: head + decoder + plain float32 argmax as one compiled graph (steps with more
        # rows than the fused kernel takes, or where it is not available)
        if compile:
            from calm.generation import _compiled

            self.compiled_sample = _compiled(_head_decode, model.autoencoder.lm_head.weight.device)
        per_step = num_samples if self.mode == "approx" else 1
        self.head_noise = NoiseBlocks(
            rng, _HEAD_NOISE, (per_step, self.noise_dim), self.noise_dtype, transform=head.noise_from_uniform
        )
        self.choice_u = NoiseBlocks(rng, _CHOICE, (), torch.float64)
        device = model.autoencoder.lm_head.weight.device
        # position-by-position draw classes (see the module docstring): on the CPU by default
        self.lazy = device.type == "cpu" if lazy_draws is None else bool(lazy_draws)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the rows `rows` (their random streams; the caller selects `rng`)."""
        self.head_noise.select(rows)
        self.choice_u.select(rows)

    def _lap(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.lap(phase)

    def _count(self, draws: int, positions: int, fused: int = 0) -> None:
        if self.stats is not None:
            self.stats.draws += draws
            self.stats.decoded_positions += positions
            self.stats.fused_draws += fused

    def _decode_full(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Head samples for noise [b, m, nd], decoded in full: chunks [b, m, K]."""
        b, m = noise.shape[:2]
        K = self.decoder.K
        if self.fused_kernel is not None and b * m <= self.fused_kernel_rows:
            out = self.fused_kernel(h, noise)
            self._count(b * m, b * m * K, b * m)
        elif self.compiled_sample is not None:
            out = self.compiled_sample(self.head, self.decoder.ae, h, noise)
            self._count(b * m, b * m * K)
        else:
            out = self.decoder.sample(h, noise)
            self._count(b * m, b * m * K)
        self._lap("head+decode")
        return out

    @property
    def fused_kernel_rows(self) -> int:
        from calm.fused_decode import MAX_ROWS

        return MAX_ROWS

    def __call__(self, h: torch.Tensor, step: int) -> torch.Tensor:
        if self.mode == "single":
            return self._decode_full(h, self.head_noise.get(step))[:, 0]
        if self.mode == "approx":
            return self._approx(h, step)
        return self._exact(h, step)

    def _approx(self, h: torch.Tensor, step: int) -> torch.Tensor:
        noise = self.head_noise.get(step)
        u = self.choice_u.get(step)
        if not self.lazy:
            out = sample_approx(self._decode_full(h, noise), self.T, uniforms=u)
            self._lap("select")
            return out
        classes = DrawClasses(self.decoder, h)
        ids = classes.draw(noise)
        chosen = sample_approx(ids, self.T, uniforms=u)[:, 0]
        out = classes.chunks(chosen)
        b, m = noise.shape[:2]
        self._count(b * m, classes.positions_decoded)
        self._lap("decode+select")
        return out

    def _exact(self, h: torch.Tensor, step: int) -> torch.Tensor:
        rng, nd = self.rng, self.noise_dim
        classes = DrawClasses(self.decoder, h) if self.lazy else None
        drawn = [0]  # draws read so far by every row still sampling

        def draw(m: int, rows: torch.Tensor | None) -> torch.Tensor:
            # a row's j-th draw of the step depends on (its seed, step, j) only: neither on the
            # batch nor on how the sampler splits its draws into calls
            u = rng.uniform((_EXACT_NOISE, step), (m, nd), self.noise_dtype, offset=drawn[0] * nd)
            noise = self.head.noise_from_uniform(u)
            drawn[0] += m
            hh = h
            if rows is not None:
                noise, hh = noise.index_select(0, rows), h.index_select(0, rows)
            if classes is not None:
                self._count(noise.shape[0] * m, 0)
                return classes.draw(noise, rows)
            return self._decode_full(hh, noise)

        def uniform(key: int, m: int) -> torch.Tensor:
            if key < 0:  # the choice at the bound
                return rng.uniform((_EXACT_LIMIT, step), (m,), torch.float64)
            return rng.uniform((_EXACT_COINS, step), (m,), torch.float64, offset=key)  # coins of draws key..

        out, st = sample_exact(
            draw,
            self.T,
            max_draws=self.max_draws,
            draws_per_call=min(self.first_block, self.max_draws),
            max_draws_per_call=max(self.first_block, EXACT_MAX_BLOCK),
            uniform=uniform,
            active_rows=True,
            return_stats=True,
        )
        if self.stats is not None:
            self.stats.exact_hit_limit += st.num_hit_limit
        # Next step's first block: what this step needed (a power of two, at least draws_per_call).
        # When P is flat every row reads its max_draws and one call beats six doubling ones; when
        # it is peaked the block shrinks again. Results do not depend on the split into calls (a
        # row's draws are indexed by position), so this only changes the cost.
        needed = int(st.draws.max()) if st.draws.numel() else self.draws_per_call
        self.first_block = max(self.draws_per_call, 1 << max(0, needed - 1).bit_length())
        if classes is not None:
            out = classes.chunks(out[:, 0])
            self._count(0, classes.positions_decoded)
        self._lap("decode+select")
        return out
