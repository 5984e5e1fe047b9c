import pytest
import torch

from calm.config import BackboneConfig
from calm.models.transformer import Backbone, StaticKVCache


def _backbone(**kw):
    torch.manual_seed(0)
    cfg = BackboneConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=48, max_seq_len=64, **kw)
    return Backbone(cfg).eval()


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_incremental_decoding_with_cache_matches_full_forward(kv_heads):
    model = _backbone(num_kv_heads=kv_heads)
    x = torch.randn(3, 10, 32)
    full = model(x)
    cache = model.new_cache(3, 16)
    # a first block (causal, no mask), single steps (no mask), a later block (mask)
    parts = [model(x[:, :4], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(4, 7)]
    parts.append(model(x[:, 7:10], cache=cache))
    assert cache.dense
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_is_invisible():
    model = _backbone()
    x = torch.randn(1, 6, 32)
    ref = model(x)
    pad = 3
    xp = torch.cat([torch.randn(1, pad, 32) * 100, x], 1)  # garbage in the pad slots
    valid = torch.tensor([[False] * pad + [True] * 6])
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    out = model(xp, positions=positions, valid=valid)
    torch.testing.assert_close(out[:, pad:], ref, rtol=1e-5, atol=1e-5)
    # the same through a cache, followed by one more step
    cache = model.new_cache(1, 16)
    model(xp, positions=positions, valid=valid, cache=cache)
    assert not cache.dense  # pad slots in the cache: every later step needs the mask
    nxt = torch.randn(1, 1, 32)
    step = model(nxt, positions=torch.tensor([[6]]), cache=cache)
    torch.testing.assert_close(step, model(torch.cat([x, nxt], 1))[:, -1:], rtol=1e-5, atol=1e-5)


def test_causality():
    model = _backbone()
    x = torch.randn(2, 8, 32)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, 32)
    torch.testing.assert_close(model(x)[:, :5], model(y)[:, :5])


def test_position_beyond_context_is_a_clear_error():
    model = _backbone()
    with pytest.raises(ValueError, match="context"):
        model(torch.randn(1, 65, 32))


def test_static_cache_rows_join_from_their_own_prefill_and_resize():
    """Continuous batching's cache moves: each prompt prefilled alone into a KVCache, moved
    into a StaticKVCache (`from_cache`), rows appended (`extend`), slots grown and cut
    (`resize`), a row dropped (`select`): every row's decoding equals that row decoded alone."""
    torch.manual_seed(0)
    m = _backbone().eval()
    d = m.config.d_model
    prompts = [torch.randn(1, n, d) for n in (5, 2, 7)]
    steps = [torch.randn(1, 4, d) for _ in prompts]

    def alone(x, more):
        cache = m.new_cache(1, 16)
        m(x, cache=cache)
        return torch.cat([m(more[:, i : i + 1], cache=cache) for i in range(more.shape[1])], 1)

    want = [alone(x, s) for x, s in zip(prompts, steps)]

    def prefilled(x, slots):
        cache = m.new_cache(1, x.shape[1])
        m(x, cache=cache)
        return StaticKVCache.from_cache(cache, slots)

    with torch.no_grad():
        batch = prefilled(prompts[0], 8)
        batch.extend(prefilled(prompts[1], 8))
        got = [[], [], []]
        for i in range(2):  # rows 0 and 1 decode two steps
            x = torch.cat([steps[0][:, i : i + 1], steps[1][:, i : i + 1]])
            h = m(x, positions=batch.pos[:, None].clone(), cache=batch)
            got[0].append(h[:1])
            got[1].append(h[1:])
        batch.resize(12)  # row 2 needs 7 + 4 slots
        batch.extend(prefilled(prompts[2], 12))
        for i in range(2):
            x = torch.cat([steps[0][:, 2 + i : 3 + i], steps[1][:, 2 + i : 3 + i], steps[2][:, i : i + 1]])
            h = m(x, positions=batch.pos[:, None].clone(), cache=batch)
            for r in range(3):
                got[r].append(h[r : r + 1])
        batch.select(torch.tensor([2]))  # rows 0 and 1 are done
        batch.resize(11)  # the longest remaining row needs 11 slots
        for i in range(2, 4):
            got[2].append(m(steps[2][:, i : i + 1], positions=batch.pos[:, None].clone(), cache=batch))
    for r in range(3):
        torch.testing.assert_close(torch.cat(got[r], 1), want[r], rtol=1e-5, atol=1e-5)
    assert batch.pos.tolist() == [11] and batch.keys[0].shape[2] == 11
    with pytest.raises(ValueError, match="cannot join"):
        batch.extend(prefilled(prompts[0], 8))
