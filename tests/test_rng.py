"""calm.rng with per-row counters: rows at different steps draw what each would draw alone.

This is what lets a server batch requests that joined at different times (`calm.serve`): a
request's noise depends on its seed and its own step only.
"""

from __future__ import annotations

import pytest
import torch

from calm.config import AutoencoderConfig, CALMConfig
from calm.models.calm import CALM
from calm.rng import NoiseBlocks, RowRandom

SEEDS = [3, 4, 5, 11]
STEPS = [0, 5, 63, 130]  # across NoiseBlocks' block boundary (64 per block for small shapes)


def test_per_row_stream_components_and_offsets_equal_the_scalar_calls():
    rng = RowRandom(SEEDS)
    steps = torch.tensor(STEPS)
    offsets = torch.tensor([0, 7, 1 << 40, 3])
    for stream in [(2, steps), (steps,), (steps, 9), (1, steps, 4)]:
        got = rng.uniform(stream, (6, 2), torch.float64, offset=offsets)
        for b, (seed, step, off) in enumerate(zip(SEEDS, STEPS, offsets.tolist())):
            scalar = tuple(step if isinstance(s, torch.Tensor) else s for s in stream)
            want = RowRandom([seed]).uniform(scalar, (6, 2), torch.float64, offset=off)[0]
            assert torch.equal(got[b], want), (stream, b)
    # a tensor offset with int components, and bits directly
    bits = rng.bits((7,), 5, offsets)
    for b, off in enumerate(offsets.tolist()):
        assert torch.equal(bits[b], rng.bits((7,), 5, off)[b])
    # different steps really give different values
    same = rng.uniform((2, torch.zeros(4, dtype=torch.long)), (3,))
    assert not torch.equal(same[1:], rng.uniform((2, steps), (3,))[1:])


@pytest.mark.parametrize("shape,dtype", [((), torch.float64), ((3, 5), torch.float32)])
def test_noise_blocks_per_row_steps_equal_their_blocks(shape, dtype):
    rng = RowRandom(SEEDS)
    blocks = NoiseBlocks(rng, 2, shape, dtype, transform=lambda u: u - 0.5)
    got = blocks.get(torch.tensor(STEPS))
    for b, step in enumerate(STEPS):
        assert torch.equal(got[b], blocks.get(step)[b])


def _calm(seed=3) -> CALM:
    torch.manual_seed(seed)
    ae = AutoencoderConfig(vocab_size=40, chunk_size=4, latent_dim=8, d_model=32, ffn_dim=48)
    cfg = CALMConfig(
        d_model=32, num_layers=2, num_heads=2, ffn_dim=48, max_seq_len=32, vocab_size=40,
        chunk_size=4, latent_dim=8, noise_dim=6, autoencoder=ae.to_dict(), head_init="xavier",
    )  # fmt: skip
    model = CALM(cfg).eval()
    with torch.no_grad():
        model.head.final_layer.linears[-1].weight.normal_(std=0.3)
    return model


@pytest.mark.parametrize(
    "temperature,sampler,lazy",
    [
        (1.0, "exact", True),
        (0.5, "exact", True),
        (0.5, "exact", False),
        (0.5, "approx", True),
        (0.4, "approx", False),
    ],
)
def test_chunk_sampler_with_per_row_steps_equals_each_row_alone(temperature, sampler, lazy):
    """`ChunkSampler(h, steps)` with a LongTensor of per-row steps: each row's chunk is the one
    a sampler over that row alone (its own seed) chooses at its own step."""
    from calm.calm_sampler import ChunkSampler

    model = _calm()
    h = torch.randn(len(SEEDS), 32)
    kw = dict(temperature=temperature, sampler=sampler, num_samples=24)

    def sampler_for(seeds):
        s = ChunkSampler(model, RowRandom(seeds), **kw)
        s.lazy = lazy
        return s

    with torch.inference_mode():
        got = sampler_for(SEEDS)(h, torch.tensor(STEPS))
        for b, (seed, step) in enumerate(zip(SEEDS, STEPS)):
            assert torch.equal(got[b], sampler_for([seed])(h[b : b + 1], step)[0]), b
