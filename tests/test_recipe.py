"""The small-scale training-recipe knobs (issue 14): head initialisation, discrete noise atoms,
the auxiliary token head, the oracle / context-free reference energies, per-module lr."""

import math

import pytest
import torch

from calm.config import CALMConfig, ConfigError, TrainConfig, apply_overrides, preset
from calm.flops import flops_report
from calm.models.calm import CALM
from calm.models.energy import EnergyHead
from calm.train import build_optimizer, param_groups


def _tiny(**kw) -> CALM:
    torch.manual_seed(0)
    return CALM(preset("calm-tiny").replace(**kw))


def test_zero_init_blocks_every_gradient_before_the_last_layer_xavier_does_not():
    tokens = torch.randint(3, 512, (2, 32))
    grads = {}
    for init in ("zero", "xavier"):
        model = _tiny(head_init=init)
        loss, _ = model.loss(tokens)
        loss.backward()
        grads[init] = (
            model.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum(),
            model.head.blocks[0].down_proj.weight.grad.abs().sum(),
        )
    assert grads["zero"][0] == 0 and grads["zero"][1] == 0  # why "xavier" exists
    assert grads["xavier"][0] > 0 and grads["xavier"][1] > 0


def test_xavier_init_changes_only_the_last_layer():
    torch.manual_seed(0)
    a = EnergyHead(16, 4, noise_dim=8, num_blocks=1)
    torch.manual_seed(0)
    b = EnergyHead(16, 4, noise_dim=8, num_blocks=1, zero_last=False)
    sa, sb = a.state_dict(), b.state_dict()
    last = "final_layer.linears.2.weight"
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != last)
    assert not sa[last].any() and sb[last].abs().sum() > 0


def test_noise_atoms_pick_one_vector_from_the_first_noise_coordinate():
    torch.manual_seed(0)
    head = EnergyHead(16, 4, noise_dim=8, num_blocks=1, zero_last=False, noise_atoms=4)
    h = torch.randn(3, 16)
    noise = torch.rand(3, 6, 8) - 0.5
    with torch.no_grad():
        out = head(h, noise)
        # the atom is a step function of the first coordinate: moving it inside one of the four
        # intervals of [-0.5, 0.5) changes only the continuous part; the lookup is atoms[index]
        index = ((noise[..., 0] + 0.5) * 4).long()
        ref_x = head.norm_noise(head.noise_embd(noise) + head.atoms.weight[index])
        hh = head.norm_hidden(head.hidden_embd(h))
        for block in head.blocks:
            ref_x = block(ref_x, block.hidden_part(hh))
        assert torch.allclose(out, head.final_layer(ref_x), atol=1e-6)
        edge = noise.clone()
        edge[..., 0] = 0.5  # the closed end of the interval maps to the last atom
        head(h, edge)
    assert "atoms.weight" in head.state_dict()
    with pytest.raises(ConfigError, match="head_noise_atoms"):
        preset("calm-tiny").replace(head_noise_atoms=-1)


def test_aux_token_head_adds_its_cross_entropy_and_flops():
    tokens = torch.randint(3, 512, (2, 32))
    plain, aux = _tiny(), _tiny(aux_token_weight=0.5)
    assert plain.token_head is None and aux.token_head is not None
    loss, metrics = aux.loss(tokens)
    assert loss.item() == pytest.approx(metrics["energy"].item() + 0.5 * metrics["aux_ce"].item(), rel=1e-5)
    logits = aux.token_head(aux.hidden(aux.to_chunks(tokens)[:, :-1]), aux.embed.weight)
    assert logits.shape == (2, 32 // 4 - 1, 4, 512)
    assert metrics["aux_ce"].item() == pytest.approx(math.log(512), rel=0.05)  # near uniform at init
    cfg = preset("calm-tiny")
    without = flops_report(cfg)
    with_aux = flops_report(cfg.replace(aux_token_weight=1.0))
    d, K, V = cfg.d_model, cfg.chunk_size, cfg.vocab_size
    extra = with_aux["train_flops_per_token"] - without["train_flops_per_token"]
    assert extra == pytest.approx(3 * 2 * (K * d * d + K * d * V) / K)
    assert with_aux["inference_flops_per_token"] == without["inference_flops_per_token"]
    with pytest.raises(ConfigError, match="aux_token_weight"):
        cfg.replace(aux_token_weight=-1.0)


def test_reference_energies_bracket_the_model_and_define_the_gap():
    model = _tiny(head_init="xavier").eval()
    tokens = torch.randint(3, 512, (4, 64))
    torch.manual_seed(2)
    with torch.no_grad():
        loss, m = model.loss(tokens)
    assert {"energy", "oracle_energy", "context_free_energy"} <= set(m)
    # posterior samples of the true chunk beat posterior samples of random other chunks
    assert m["oracle_energy"] < m["context_free_energy"]
    means = {k: float(v) for k, v in m.items()}
    gap = CALM.derived_metrics(means)["gap_closed"]
    expected = (means["context_free_energy"] - means["energy"]) / (
        means["context_free_energy"] - means["oracle_energy"]
    )
    assert gap == pytest.approx(expected)
    # the oracle is the posterior itself: its energy is exactly what feeding the posterior
    # samples as "model samples" gives; at 0 gap a model matches the context-free sampler
    assert CALM.derived_metrics({**means, "energy": means["context_free_energy"]})["gap_closed"] == 0
    assert CALM.derived_metrics({**means, "energy": means["oracle_energy"]})["gap_closed"] == 1
    with torch.no_grad():
        model.train()
        _, m_train = model.loss(tokens)
    assert "oracle_energy" not in m_train  # references cost nothing in training


def test_lr_scale_gives_named_modules_their_own_learning_rate():
    model = _tiny(head_init="xavier")
    cfg = apply_overrides(TrainConfig(lr=1e-3), ["lr_scale=head=3"])
    assert cfg.lr_scales == {"head": 3.0}
    opt = build_optimizer(model, cfg)
    head_ids = {id(p) for p in model.head.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head_ids or not ids & head_ids  # a group is all head or no head
        assert group["lr"] == pytest.approx(3e-3 if ids <= head_ids else 1e-3)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match="no parameters"):
        param_groups(model, 0.1, 1e-3, {"nothing": 2.0})
    for bad in ("head", "head=0", "head=x", "=2"):
        with pytest.raises(ConfigError, match="lr_scale"):
            TrainConfig(lr_scale=bad)


def test_recipe_fields_round_trip_through_the_config():
    cfg = CALMConfig(head_init="xavier", head_noise_atoms=16, aux_token_weight=0.25)
    assert CALMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="head_init"):
        CALMConfig(head_init="ones")
