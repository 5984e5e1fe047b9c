"""Construction on the meta device: same weights as eager construction for the same seed, ties
kept, buffers recomputed, every parameter covered by ``init_weights``; bounds checked from shapes."""

import pytest
import torch

from calm.config import ARConfig, preset
from calm.models import build_model, model_class
from calm.models.layers import materialize
from calm.models.transformer import Backbone

CONFIGS = {
    "autoencoder": preset("ae-tiny"),
    # every optional CALM part: auxiliary token head, noise atoms, Xavier last layer
    "calm": preset("calm-tiny").replace(aux_token_weight=0.5, head_noise_atoms=4, head_init="xavier"),
    "ar": preset("transformer-tiny").replace(tie_embeddings=True),
    # the other generative heads (the diffusion head also computes its schedule at construction)
    "calm-flow": preset("calm-tiny").replace(head="flow"),
    "calm-diffusion": preset("calm-tiny").replace(head="diffusion", diffusion_schedule="linear"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_then_init_weights_equals_eager_construction(name):
    config = CONFIGS[name]
    kind = config.kind
    torch.manual_seed(7)
    eager = model_class(kind)(config)
    after_eager = torch.rand(3)  # the RNG stream after construction matters to what follows

    with torch.device("meta"):
        lazy = model_class(kind)(config)
    assert all(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    materialize(lazy, "cpu")
    with torch.no_grad():  # garbage until initialised: make any parameter init_weights misses show
        for p in lazy.parameters():
            p.fill_(float("nan"))
        for b in lazy.buffers():
            b.fill_(float("nan"))
    torch.manual_seed(7)
    lazy.init_weights()
    assert torch.equal(torch.rand(3), after_eager)

    a, b = eager.state_dict(keep_vars=True), lazy.state_dict(keep_vars=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name, buf in lazy.named_buffers():  # non-persistent buffers (rotary tables) too
        assert torch.equal(buf, dict(eager.named_buffers())[name]), name
    # tied parameters are still one Parameter
    tied = {"autoencoder": ("embed", "lm_head"), "calm": None, "ar": ("embed", "lm_head")}[kind]
    if tied:
        assert getattr(lazy, tied[0]).weight is getattr(lazy, tied[1]).weight
    if kind == "calm":
        assert lazy.autoencoder.embed.weight is lazy.autoencoder.lm_head.weight
        assert not any(p.requires_grad for p in lazy.autoencoder.parameters())
        tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        losses = []
        for model in (eager, lazy):
            torch.manual_seed(3)
            losses.append(model.loss(tokens)[0])
        assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])


def test_build_model_on_meta_and_without_init():
    config = CONFIGS["calm"]
    meta = build_model(config, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    bare = build_model(config, init=False)  # allocated for a loader: buffers real, weights not drawn
    torch.manual_seed(0)
    ref = build_model(config)
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(bare.named_buffers())[name], buf), name
    bare.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    torch.manual_seed(1)
    a = ref.loss(tokens)[0]
    torch.manual_seed(1)
    assert torch.equal(bare.loss(tokens)[0], a)


def test_context_bound_is_checked_from_shapes():
    backbone = Backbone(ARConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_seq_len=8))
    backbone(torch.zeros(1, 8, 16))
    with pytest.raises(ValueError, match="position 8 is beyond the model's context of 8"):
        backbone(torch.zeros(1, 9, 16))
