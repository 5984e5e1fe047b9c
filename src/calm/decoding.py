"""CALM's latent vectors to tokens: one decoder object per model, used by every consumer.

`ChunkDecoder.for_model(model)` is built once per model (and cached while its weights are
unchanged); `calm.generation`, the BrierLM estimators (`calm.brier`) and the server all decode
through it. Its results are exactly those of the reference ``model.autoencoder.decode(z)``:
the argmax of the float32 (model-dtype) vocabulary logits, first index on ties. What differs
between devices is only how that argmax is found:

- `tied_argmax`: through the tied vocabulary matrix, either directly or — where bf16 matrix
  units exist (AMX/AVX512-BF16 CPUs, CUDA) and the call is large — through a bf16 screen with
  a proven error bound, rescoring in float32 only the tokens that can still win.
- `DrawClasses` (the temperature samplers' draws, on the CPU): many head samples of one step
  are told apart by decoding every draw's first token, and a further position only for the
  draws whose earlier tokens equal another draw's. The samplers only ever compare chunks for
  equality, so a draw whose first token is unique among the step's draws needs no more than
  that token; the chosen chunk is decoded in full at the end. Same results, a fraction of the
  decoder's work when the model is unsure (benchmarks/bench_decode.py).

The decoder splits the autoencoder's decoder into the part every token position shares
(latent -> the hidden state before the position split) and the per-position rest (the
position's slice of the ``expand`` projection, the position-wise blocks, the final norm and the
vocabulary argmax), which is what lets positions be decoded on demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from calm.fast_decode import _cached

__all__ = ["ChunkDecoder", "DrawClasses", "tied_argmax"]


# ---------------------------------------------------------------------------------------------
# Exact, fast argmax through a tied vocabulary projection

_SCREEN_GROUP = 16  # tokens per group in the bf16 screen


@cache
def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls many times faster than float32 on this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_fast_bf16()


@dataclass
class _Screen:
    weight_bf16: torch.Tensor  # [Vp, d], V padded to a multiple of the group size
    max_norm: float  # largest row norm of the float32 weight
    groups: int


def _screen_for(weight: torch.Tensor) -> _Screen:
    def build() -> _Screen:
        V, _ = weight.shape
        G = -(-V // _SCREEN_GROUP)
        w = weight.detach()
        if G * _SCREEN_GROUP > V:  # pad by repeating the last row: same logit as a real token
            w = torch.cat([w, w[-1:].expand(G * _SCREEN_GROUP - V, -1)])
        return _Screen(w.to(torch.bfloat16).contiguous(), float(weight.detach().float().norm(dim=1).max()), G)

    return _cached("screen", [weight], build)


def screen_pays(weight: torch.Tensor, rows: int = 1) -> bool:
    """Whether the bf16 screen is the faster exact argmax for `rows` hidden states and this
    float32 weight here. It has a fixed cost (~0.2-0.5 ms on one CPU thread) that the bf16
    matmul repays from about 2^25 multiply-adds (`python benchmarks/bench_tied_argmax.py`, one
    thread, AMX CPU: 64 rows of a 4096 x 128 matrix 0.43 against 0.66 ms direct, 16 rows of
    8192 x 256 0.69 against 1.03, 4 rows of 32000 x 512 2.1 against 5.2; 3200 rows of
    4096 x 128 15.9 against 54.6, while one row of it is 3.6x slower screened)."""
    V, d = weight.shape
    return (
        weight.dtype == torch.float32
        and V * d >= (1 << 18)
        and rows * V * d >= (1 << 25)
        and _fast_bf16(weight.device)
    )


def tied_argmax(hidden: torch.Tensor, weight: torch.Tensor, *, screen: bool | None = None) -> torch.Tensor:
    """argmax_v hidden · weight[v]: hidden [R, d], weight [V, d] -> LongTensor [R].

    The float32 argmax (first index on exact ties), computed either directly or, with
    ``screen=True``, through a bf16 screen: one bf16 matmul gives logits l~ with
    |l~_v - l_v| <= eps = (3.05 u + 1.1 γ_d) · ||h|| · max_v ||w_v|| (u = 2^-8 the bf16 unit
    roundoff of h, w and the output, γ_d = d·2^-24 the float32 accumulation; 12 u on CUDA,
    whose bf16 GEMMs may reduce partial sums in bf16). Only tokens with l~_v >= max l~ - 2 eps
    can be the argmax; they are found via group maxima over 16-token groups and rescored in
    float32 (a handful per row). ``screen=None`` picks the screen where `screen_pays` (for
    these rows). Other dtypes use the direct path.
    """
    R, d = hidden.shape
    if screen is None:
        screen = hidden.dtype == torch.float32 and screen_pays(weight, R)
    if not screen or R == 0:
        return F.linear(hidden, weight).max(dim=-1).indices
    s = _screen_for(weight)
    h = hidden.float()
    # Row blocks keep each block's bf16 logits ([Vp, rows], ~2-4 MB) in cache while they are
    # reduced and gathered; one [Vp, R] matmul at R in the thousands is several times slower.
    block = max(64, (1 << 21) // (s.groups * _SCREEN_GROUP))
    if R <= block:
        return _screened_argmax(h, weight, s)
    return torch.cat([_screened_argmax(h[i : i + block], weight, s) for i in range(0, R, block)])


def _screen_eps(h: torch.Tensor, s: _Screen) -> torch.Tensor:
    """Per-row bound on |bf16 screen logit - float32 logit| (see `tied_argmax`)."""
    u = 2.0**-8
    coef = (12 * u if h.device.type == "cuda" else 3.05 * u) + 1.1 * h.shape[1] * 2.0**-24
    return h.norm(dim=1).mul_(coef * s.max_norm * (1 + 1e-4))


def _screened_argmax(h: torch.Tensor, weight: torch.Tensor, s: _Screen) -> torch.Tensor:
    R, d = h.shape
    V = weight.shape[0]
    gs = _SCREEN_GROUP
    hb = h.to(torch.bfloat16)
    # [Vp, R]: the weight streams through once and the group reduction runs along R (contiguous)
    grouped = F.linear(s.weight_bf16, hb).view(s.groups, gs, R)
    group_max = grouped.amax(dim=1).float().t()  # [R, G]
    top = group_max.amax(dim=1)  # [R]
    threshold = top - 2 * _screen_eps(h, s) - 1e-30
    r, g = (group_max >= threshold.unsqueeze(1)).nonzero(as_tuple=True)  # a few groups per row
    if r.numel() > 8 * R + 64:  # not selective (e.g. all logits tied): the direct path is cheaper
        return F.linear(h, weight.float()).max(dim=-1).indices
    vals = grouped[g, :, r].float()  # [P, gs]
    p, j = (vals >= threshold[r].unsqueeze(1)).nonzero(as_tuple=True)
    rows = r[p]
    tokens = (g[p] * gs + j).clamp_(max=V - 1)
    exact = torch.linalg.vecdot(h.index_select(0, rows), weight.index_select(0, tokens).float())
    best = torch.full((R,), -math.inf, device=h.device).scatter_reduce_(0, rows, exact, "amax")
    key = torch.where(exact == best[rows], tokens, V)
    return torch.full((R,), V, dtype=torch.long, device=h.device).scatter_reduce_(0, rows, key, "amin")


# ---------------------------------------------------------------------------------------------
# The decoder object


class ChunkDecoder:
    """Latents -> token chunks for one CALM model (its energy head and frozen autoencoder).

    Get it with `for_model` once per generate / evaluation call. Every method
    runs under ``torch.no_grad`` in the model's dtype, and its tokens are exactly those of
    ``model.autoencoder.decode`` (the reference; see the module docstring).
    """

    def __init__(self, model):
        self.head = model.head
        self.ae = ae = model.autoencoder
        c = ae.config
        self.K, self.d, self.V = c.chunk_size, c.d_model, c.vocab_size
        self.weight = ae.lm_head.weight  # tied vocabulary matrix [V, d]
        self.screen: bool | None = None  # the bf16 screen: None = where it pays for a call's rows
        # the decoder's last shared layer, cut by token position: W [K·d, d] -> K slices [d, d]
        self.expand_weight = ae.expand.weight.view(self.K, self.d, -1)
        self.expand_bias = None if ae.expand.bias is None else ae.expand.bias.view(self.K, self.d)

    @classmethod
    def for_model(cls, model) -> ChunkDecoder:
        """The decoder of CALM `model`. Cheap: it reads the live modules (so it always sees their
        current weights); what is costly to build (the bf16 screen) is cached per weight."""
        return cls(model)

    # -- whole chunks ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> token chunks [..., K] (== ``autoencoder.decode(z)``)."""
        h = self.ae.decode_hidden(z)  # [..., K, d]
        flat = h.reshape(-1, self.d)
        return tied_argmax(flat, self.weight, screen=self.screen).view(h.shape[:-1])

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Head samples for hidden states [B, d] and head noise [B, m, noise_dim], decoded:
        token chunks [B, m, K]."""
        return self.decode(self.head(hidden, noise))

    # -- token positions on demand ----------------------------------------------------------------
    @torch.no_grad()
    def shared(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [R, l] -> the decoder's state before it splits into token positions [R, d]."""
        h = self.ae.from_latent(z)
        for block in self.ae.decoder_pre:
            h = block(h)
        return h

    @torch.no_grad()
    def tokens_at(self, shared: torch.Tensor, position: int) -> torch.Tensor:
        """Tokens at one position [R] from `shared` states [R, d]: that position's slice of the
        ``expand`` projection, the position-wise blocks, the final norm and the argmax."""
        return self.tokens_from(shared, position, position + 1)[:, 0]

    @torch.no_grad()
    def tokens_from(self, shared: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Tokens at positions start..stop-1 (default: to the end of the chunk) [R, stop - start]
        from `shared` states [R, d], in one pass of the position-wise layers."""
        stop = self.K if stop is None else stop
        n = stop - start
        w = self.expand_weight[start:stop].reshape(n * self.d, -1)
        b = None if self.expand_bias is None else self.expand_bias[start:stop].reshape(-1)
        x = F.linear(shared, w, b).view(-1, self.d)  # [R·n, d], row-major by (draw, position)
        for block in self.ae.decoder_post:
            x = block(x)
        return tied_argmax(self.ae.decoder_norm(x), self.weight, screen=self.screen).view(-1, n)


# ---------------------------------------------------------------------------------------------
# Draws of one step, told apart lazily


_REST_AT_ONCE = 64  # DrawClasses: decode the rest of the chunks at once up to this many positions


class DrawClasses:
    """The head samples of one decoding step, as class ids: two draws of a row get the same id
    exactly when they decode to the same chunk (the id is the index of the row's first draw of
    that chunk, so ids never change as draws are added).

    ``draw(noise, rows)`` samples the head for the given rows and returns their new draws' ids
    [b, m, 1], the "chunks" the samplers of `calm.sampling` count and compare; `chunks` decodes
    the chosen ones in full. Each draw's first token is decoded, and position k+1 only for the
    draws whose first k tokens equal those of another draw of the row, so a step costs about
    one position of the decoder per draw when draws rarely agree.

    Everything is batched over all rows and draws: the step's draws live in flat tensors (row,
    index in the row, decoder state, tokens decoded so far), prefixes are grouped with
    ``torch.unique`` level by level, and each level decodes all the draws that need it in one
    call. (A per-draw Python version, before, made CALM at T = 0.5 and 16 rows 0.13x the
    Transformer against 0.23x now: README, decoding throughput on trained models.)
    """

    def __init__(self, decoder: ChunkDecoder, hidden: torch.Tensor):
        self.decoder, self.hidden = decoder, hidden
        B, K = hidden.shape[0], decoder.K
        self.K, self.V = K, decoder.V
        dev = hidden.device
        long = dict(dtype=torch.long, device=dev)
        self.count = [0] * B  # draws per row so far
        self.row = torch.empty(0, **long)  # per draw (flat): its row
        self.index = torch.empty(0, **long)  # its index among the row's draws
        self.states: torch.Tensor | None = None  # its decoder state before the position split [n, d]
        self.tokens = torch.empty(0, K, **long)  # its decoded tokens (-1: not decoded yet)
        self.known = torch.empty(0, **long)  # how many of its positions are decoded
        self.flat = torch.empty(B, 0, **long)  # [B, draws]: flat index of (row, index)
        self.positions_decoded = 0  # token positions decoded (vocabulary rows scored)

    def draw(self, noise: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Head samples for noise [b, m, noise_dim] of `rows` (None: all rows) -> ids [b, m, 1]."""
        h = self.hidden if rows is None else self.hidden.index_select(0, rows)
        row_ids = list(range(h.shape[0])) if rows is None else rows.tolist()
        b, m = noise.shape[:2]
        dev = self.row.device
        with torch.no_grad():
            z = self.decoder.head(h, noise)  # [b, m, l]
            states = self.decoder.shared(z.reshape(b * m, -1))
        first = self.row.numel()
        row_t = torch.tensor(row_ids, dtype=torch.long, device=dev)
        starts = torch.tensor([self.count[r] for r in row_ids], dtype=torch.long, device=dev)
        index = (starts.unsqueeze(1) + torch.arange(m, device=dev)).reshape(-1)
        for r in row_ids:
            self.count[r] += m
        width = max(self.count)
        if width > self.flat.shape[1]:
            pad = self.flat.new_full((self.flat.shape[0], width - self.flat.shape[1]), -1)
            self.flat = torch.cat([self.flat, pad], 1)
        row_of_draw = row_t.repeat_interleave(m)
        self.flat[row_of_draw, index] = torch.arange(first, first + b * m, device=dev)
        self.row = torch.cat([self.row, row_of_draw])
        self.index = torch.cat([self.index, index])
        self.states = states if self.states is None else torch.cat([self.states, states])
        self.tokens = torch.cat([self.tokens, self.tokens.new_full((b * m, self.K), -1)])
        self.known = torch.cat([self.known, self.known.new_zeros(b * m)])
        self._decode(torch.arange(first, first + b * m, device=dev), 0, 1)  # first tokens
        self._resolve()
        return self._class_ids()[first:].view(b, m, 1)

    def _decode(self, draws: torch.Tensor, start: int, stop: int | None = None) -> None:
        """Decode positions start..stop-1 (default: the rest of the chunk) for the flat draws
        `draws`, which know `start` tokens (one batched call)."""
        if draws.numel() == 0:
            return
        stop = self.K if stop is None else stop
        toks = self.decoder.tokens_from(self.states.index_select(0, draws), start, stop)
        self.tokens[draws, start:stop] = toks
        self.known[draws] = stop
        self.positions_decoded += toks.numel()

    def _resolve(self) -> None:
        """Decode positions until every draw is unique in its row or fully known.

        Invariant afterwards: a draw that knows fewer than K tokens shares that prefix with no
        other draw of its row (so it differs from all of them). Level p groups the draws that
        know p + 1 tokens by (row, first p + 1 tokens) with ``torch.unique`` (the group id of
        level p - 1 times V plus token p, so keys stay small for any vocabulary); the draws of
        groups of two or more then get token p + 1, or the rest of the chunk at once when they
        are few (a call has a fixed cost of a few tenths of a ms on a CPU thread, and for many
        draws the next position alone is the cheaper call: with the trained K = 4 model of the
        README, 75 of a row's 200 draws share a first token, and the rest of their chunks cost
        1.78 ms in one call against 0.93 ms for the next position alone, after which few groups
        are left; `benchmarks/bench_tied_argmax.py --calm ... --data ...`).
        """
        group = self.row.clone()  # level -1: the row
        for p in range(self.K):
            have = (self.known > p).nonzero().squeeze(1)
            key = group.index_select(0, have) * self.V + self.tokens.index_select(0, have)[:, p]
            _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
            group = torch.full_like(self.row, -1).index_copy_(0, have, inverse)
            if p == self.K - 1:
                break
            shared = counts.index_select(0, inverse) > 1
            need = have[shared & (self.known.index_select(0, have) == p + 1)]
            rest = self.K - p - 1
            self._decode(need, p + 1, None if need.numel() * rest <= _REST_AT_ONCE else p + 2)
        self._group = group  # level K - 1: draws with the same full chunk (-1: not fully known)

    def _class_ids(self) -> torch.Tensor:
        """Class id of every flat draw: the first index in its row of its chunk."""
        ids = self.index.clone()
        full = (self._group >= 0).nonzero().squeeze(1)
        if full.numel():
            g = self._group.index_select(0, full)
            first = torch.full((int(g.max()) + 1,), torch.iinfo(torch.long).max, device=g.device)
            first.scatter_reduce_(0, g, self.index.index_select(0, full), "amin")
            ids[full] = first.index_select(0, g)
        return ids

    def chunks(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The chunks [b, K] of class ids [b] (one per row of `rows`, None: all rows)."""
        row_t = torch.arange(self.flat.shape[0], device=ids.device) if rows is None else rows
        chosen = self.flat[row_t, ids]
        known = self.known.index_select(0, chosen)
        for start in range(1, self.K):
            self._decode(chosen[known == start], start)
        return self.tokens.index_select(0, chosen)
