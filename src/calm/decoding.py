"""CALM's latent vectors to tokens: one decoder object per model, used by every consumer.

`ChunkDecoder.for_model(model)` is built once per model (and cached while its weights are
unchanged); `calm.generation`, the BrierLM estimators (`calm.brier`) and the server all decode
through it. Its results are exactly those of the reference ``model.autoencoder.decode(z)``:
the argmax of the float32 (model-dtype) vocabulary logits, first index on ties. What differs
between devices is only how that argmax is found:

- `tied_argmax`: through the tied vocabulary matrix, either directly or — where bf16 matrix
  units exist (AMX/AVX512-BF16 CPUs, CUDA) and the matrix is large — through a bf16 screen with
  a proven error bound, rescoring in float32 only the tokens that can still win.
- `DrawClasses` (the temperature samplers' draws, on the CPU): many head samples of one step
  are told apart by decoding their token positions one at a time, and a position only for the
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


def screen_pays(weight: torch.Tensor) -> bool:
    """Whether the bf16 screen is the faster exact argmax for this float32 weight here."""
    V, d = weight.shape
    return weight.dtype == torch.float32 and V * d >= (1 << 20) and _fast_bf16(weight.device)


def tied_argmax(hidden: torch.Tensor, weight: torch.Tensor, *, screen: bool | None = None) -> torch.Tensor:
    """argmax_v hidden · weight[v]: hidden [R, d], weight [V, d] -> LongTensor [R].

    The float32 argmax (first index on exact ties), computed either directly or, with
    ``screen=True``, through a bf16 screen: one bf16 matmul gives logits l~ with
    |l~_v - l_v| <= eps = (3.05 u + 1.1 γ_d) · ||h|| · max_v ||w_v|| (u = 2^-8 the bf16 unit
    roundoff of h, w and the output, γ_d = d·2^-24 the float32 accumulation; 12 u on CUDA,
    whose bf16 GEMMs may reduce partial sums in bf16). Only tokens with l~_v >= max l~ - 2 eps
    can be the argmax; they are found via group maxima over 16-token groups and rescored in
    float32 (a handful per row). ``screen=None`` picks the screen where `screen_pays`. Other
    dtypes use the direct path.
    """
    R, d = hidden.shape
    if screen is None:
        screen = hidden.dtype == torch.float32 and screen_pays(weight)
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
        self.screen = self.weight.dtype == torch.float32 and screen_pays(self.weight)
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

    # -- token positions one at a time -----------------------------------------------------------
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
        b = None if self.expand_bias is None else self.expand_bias[position]
        x = F.linear(shared, self.expand_weight[position], b)
        for block in self.ae.decoder_post:
            x = block(x)
        return tied_argmax(self.ae.decoder_norm(x), self.weight, screen=self.screen)


# ---------------------------------------------------------------------------------------------
# Draws of one step, told apart lazily


class DrawClasses:
    """The head samples of one decoding step, as class ids: two draws of a row get the same id
    exactly when they decode to the same chunk (the id is the index of the row's first draw of
    that chunk, so ids never change as draws are added).

    ``draw(noise, rows)`` samples the head for the given rows and returns their new draws' ids
    [b, m, 1], the "chunks" the samplers of `calm.sampling` count and compare; `chunks` decodes
    the chosen ones in full. Token positions are decoded one at a time, and position k+1 only
    for the draws whose first k tokens equal those of another draw of the row, so a step costs
    about one position of the decoder per draw when draws rarely agree. Bookkeeping is in
    Python (a few dict operations per draw), one batched decoder call per position and call.
    """

    def __init__(self, decoder: ChunkDecoder, hidden: torch.Tensor):
        self.decoder, self.hidden = decoder, hidden
        B, K = hidden.shape[0], decoder.K
        self.K = K
        self.shared: list[list[torch.Tensor]] = [[] for _ in range(B)]  # per row, per draw [d]
        self.tokens: list[list[list[int]]] = [[] for _ in range(B)]  # decoded prefix per draw
        self.classes: list[list[int]] = [[] for _ in range(B)]
        # per row: decoded prefix (tuple) -> indices of the draws that have it
        self.prefixes: list[dict[tuple, list[int]]] = [{} for _ in range(B)]
        self.full: list[dict[tuple, int]] = [{} for _ in range(B)]  # full chunk -> class id
        self.positions_decoded = 0  # token positions decoded (vocabulary rows scored)

    def draw(self, noise: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Head samples for noise [b, m, noise_dim] of `rows` (None: all rows) -> ids [b, m, 1]."""
        h = self.hidden if rows is None else self.hidden.index_select(0, rows)
        row_ids = list(range(h.shape[0])) if rows is None else rows.tolist()
        b, m = noise.shape[:2]
        with torch.no_grad():
            z = self.decoder.head(h, noise)  # [b, m, l]
            shared = self.decoder.shared(z.reshape(b * m, -1)).view(b, m, -1)
        new = []  # (row, draw index) of the new draws
        for i, r in enumerate(row_ids):
            start = len(self.shared[r])
            self.shared[r].extend(shared[i].unbind(0))
            self.tokens[r].extend([] for _ in range(m))
            self.classes[r].extend([-1] * m)
            new.extend((r, start + j) for j in range(m))
        self._resolve(new)
        out = [
            [self.classes[r][j] for j in range(len(self.classes[r]) - m, len(self.classes[r]))]
            for r in row_ids
        ]
        return torch.tensor(out, dtype=torch.long, device=noise.device).view(b, m, 1)

    def _decode(self, wanted: list[tuple[int, int]], position: int) -> None:
        """Decode `position` for the draws (row, index) in `wanted` (one batched call)."""
        if not wanted:
            return
        states = torch.stack([self.shared[r][j] for r, j in wanted])
        toks = self.decoder.tokens_at(states, position).tolist()
        self.positions_decoded += len(wanted)
        for (r, j), t in zip(wanted, toks):
            self.tokens[r][j].append(t)

    def _resolve(self, new: list[tuple[int, int]]) -> None:
        """Decode positions for the new draws until each is unique or fully known; set ids.

        Invariant afterwards: a draw whose decoded prefix is shorter than K shares that prefix
        with no other draw of its row (so it differs from all of them).
        """
        self._decode(new, 0)
        level = new  # draws to file under their prefix of length p + 1
        complete = []
        for p in range(self.K):
            groups: dict[tuple[int, tuple], set] = {}
            for r, j in level:
                key = tuple(self.tokens[r][j][: p + 1])
                members = self.prefixes[r].setdefault(key, set())
                members.add(j)
                groups[(r, key)] = members
            shared = [(r, members) for (r, _), members in groups.items() if len(members) > 1]
            if p == self.K - 1:
                complete = [(r, j) for r, members in shared for j in members]
                break
            # every draw of a prefix that another draw shares needs the next position
            self._decode(
                [(r, j) for r, members in shared for j in sorted(members) if len(self.tokens[r][j]) == p + 1],
                p + 1,
            )
            level = [(r, j) for r, members in shared for j in members]
        for r, j in complete:  # older draws that just became complete keep their id
            if self.classes[r][j] >= 0:
                self.full[r].setdefault(tuple(self.tokens[r][j]), self.classes[r][j])
        for r, j in new:  # in draw order, so the first draw of a chunk names its class
            toks = self.tokens[r][j]
            self.classes[r][j] = self.full[r].setdefault(tuple(toks), j) if len(toks) == self.K else j

    def chunks(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The chunks [b, K] of class ids [b] (one per row of `rows`, None: all rows)."""
        row_ids = list(range(len(self.shared))) if rows is None else rows.tolist()
        out = []
        for r, c in zip(row_ids, ids.tolist()):
            missing = range(len(self.tokens[r][c]), self.K)
            for position in missing:
                self._decode([(r, c)], position)
            out.append(self.tokens[r][c])
        return torch.tensor(out, dtype=torch.long, device=ids.device)
