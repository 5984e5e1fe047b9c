"""Inference shortcuts (`calm.fast_decode`): same results as the plain modules."""

from __future__ import annotations

import torch

from calm.config import preset
from calm.decoding import ChunkDecoder
from calm.fast_decode import ChunkInputTable
from calm.generation import generate
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM


def _calm(seed: int = 0) -> CALM:
    torch.manual_seed(seed)
    model = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=0.5)
    torch.nn.init.normal_(model.compress[0].bias, std=0.1)  # a bias that the table must carry
    return model.eval()


def test_chunk_input_table_equals_chunk_inputs():
    model = _calm()
    chunks = torch.randint(0, model.config.vocab_size, (3, 5, model.config.chunk_size))
    table = ChunkInputTable.for_model(model)
    with torch.no_grad():
        torch.testing.assert_close(table(chunks), model.chunk_inputs(chunks), rtol=1e-5, atol=1e-5)
        assert table(chunks[:, 0]).shape == (3, model.config.d_model)  # any leading shape


def test_chunk_input_table_is_cached_and_rebuilt_when_weights_change():
    model = _calm()
    table = ChunkInputTable.for_model(model)
    assert ChunkInputTable.for_model(model) is table
    chunks = torch.randint(0, model.config.vocab_size, (2, 3, model.config.chunk_size))
    with torch.no_grad():
        model.embed.weight.mul_(2)  # in place: the version counter moves
        fresh = ChunkInputTable.for_model(model)
        assert fresh is not table
        torch.testing.assert_close(fresh(chunks), model.chunk_inputs(chunks), rtol=1e-5, atol=1e-5)
        model.compress[0].bias.add_(1)
        torch.testing.assert_close(
            ChunkInputTable.for_model(model)(chunks), model.chunk_inputs(chunks), rtol=1e-5, atol=1e-5
        )


def test_chunk_input_table_has_a_size_limit(monkeypatch):
    model = _calm()
    K, V, two_d = model.config.chunk_size, model.config.vocab_size, 2 * model.config.d_model
    monkeypatch.setattr(ChunkInputTable, "max_bytes", K * V * two_d * 4 - 1)
    assert ChunkInputTable.for_model(model) is None
    monkeypatch.setattr(ChunkInputTable, "max_bytes", K * V * two_d * 4)
    assert ChunkInputTable.for_model(model) is not None


def test_generate_with_and_without_the_table_agree(monkeypatch):
    model = _calm()
    prompts = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33))]
    kw = dict(max_new_tokens=24, seed=3, eos_id=None)
    fast = generate(model, prompts, temperature=1.0, **kw) + generate(model, prompts, temperature=0.5, **kw)
    monkeypatch.setattr(ChunkInputTable, "max_bytes", 0)
    plain = generate(model, prompts, temperature=1.0, **kw) + generate(model, prompts, temperature=0.5, **kw)
    assert fast == plain


def test_cached_tables_go_with_their_model():
    import gc

    import calm.fast_decode as fd

    model = _calm()
    ChunkInputTable.for_model(model)
    ChunkDecoder.for_model(model).decode(torch.zeros(1, model.config.latent_dim))  # nothing kept alive
    keys = {k for k in fd._cache if k[1] == id(model.embed.weight)}
    assert len(keys) == 1
    del model
    gc.collect()
    assert not keys & set(fd._cache)
