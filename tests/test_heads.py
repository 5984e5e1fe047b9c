"""CALM's generative heads behind one interface: the energy head unchanged by the refactor,
every head through training, save/load, sampling, BrierLM and the temperature samplers, and
clear errors for bad head settings."""

import zlib

import pytest
import torch

import calm
from calm.brier import calm_window_scores
from calm.checkpoint import save_checkpoint
from calm.config import HEAD_NAMES, CALMConfig, ConfigError, apply_overrides, preset
from calm.models.calm import CALM
from calm.models.energy import EnergyHead, energy_loss
from calm.models.head import HEADS, GenerativeHead, build_head, head_class
from calm.sampling import sample_approx, sample_exact

HEAD_SETTINGS = {"energy": {}, "flow": {"flow_steps": 3}, "diffusion": {"diffusion_steps": 5}}


def tiny_calm(head: str = "energy", seed: int = 0, **changes) -> CALM:
    """calm-tiny with every parameter set from a seeded generator (zero-initialised last layers
    would make every head's samples constant)."""
    torch.manual_seed(seed)
    model = CALM(preset("calm-tiny").replace(head=head, **{**HEAD_SETTINGS[head], **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():  # seeded by name: independent of the others
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The energy head is unchanged by the refactor


def _previous_energy_loss(model: CALM, toks: torch.Tensor):
    """Frozen copy of `CALM.loss` before the head interface (main at 68f6e8f)."""
    c = model.config
    chunks = model.to_chunks(toks)
    B, C, _ = chunks.shape
    h = model.hidden(chunks[:, :-1])
    with torch.no_grad():
        mu, log_std = model.autoencoder.encode(chunks[:, 1:])
        mu, std = mu.float(), log_std.float().exp()
        eps = torch.randn((B, C - 1, c.num_target_samples, c.latent_dim), device=mu.device)
        targets = eps.mul_(std.unsqueeze(-2))
    samples = model.head.sample(h, c.num_model_samples)
    per_pos, fidelity, diversity = energy_loss(
        samples.float() - mu.unsqueeze(-2), targets, c.energy_alpha, return_parts=True, center=False
    )
    return per_pos.mean(), {"fidelity": fidelity.detach().mean(), "diversity": diversity.detach().mean()}


def test_energy_loss_bit_for_bit_as_before():
    model = tiny_calm("energy")
    toks = tokens()
    torch.manual_seed(5)
    old_loss, old_metrics = _previous_energy_loss(model, toks)
    torch.manual_seed(5)
    new_loss, new_metrics = model.loss(toks)
    assert torch.equal(old_loss, new_loss)
    for k in old_metrics:
        assert torch.equal(old_metrics[k], new_metrics[k])
    # the gradients too
    grads = []
    for fn in (_previous_energy_loss, CALM.loss):
        model.zero_grad()
        torch.manual_seed(6)
        fn(model, toks)[0].backward()
        grads.append([p.grad.clone() for p in model.head.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# Values printed by this file's `tiny_calm("energy")` set-up run against main at 68f6e8f (before
# the head interface), on the 2-core x86 development machine, 1 thread. Bit for bit there; the
# tolerance only allows another CPU's float32 kernels.
PREVIOUS_LOSS = 78.94149017333984
PREVIOUS_SAMPLE_SUM = 37.12165902554989
PREVIOUS_SAMPLE_ABS_SUM = 212.5522295087576
PREVIOUS_HEAD_KEYS = [
    "noise_embd.weight", "noise_embd.bias", "hidden_embd.weight", "hidden_embd.bias",
    "norm_hidden.weight", "norm_hidden.bias", "norm_noise.weight", "norm_noise.bias",
    "blocks.0.in_ln.weight", "blocks.0.in_ln.bias", "blocks.0.linears.0.weight",
    "blocks.0.linears.0.bias", "blocks.0.linears.2.weight", "blocks.0.linears.2.bias",
    "blocks.0.linears.4.weight", "blocks.0.linears.4.bias", "blocks.0.down_proj.weight",
    "blocks.0.down_proj.bias", "final_layer.in_ln.weight", "final_layer.in_ln.bias",
    "final_layer.linears.0.weight", "final_layer.linears.0.bias", "final_layer.linears.2.weight",
    "final_layer.linears.2.bias",
]  # fmt: skip


def previous_implementation_values(model: CALM) -> tuple[float, float, float]:
    torch.manual_seed(5)
    loss = float(model.loss(tokens())[0].detach())
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    s = model.sample_latents(h, 4, generator=torch.Generator().manual_seed(8)).detach().double()
    return loss, float(s.sum()), float(s.abs().sum())


def test_energy_head_matches_values_recorded_from_the_previous_implementation():
    model = tiny_calm("energy")
    assert type(model.head) is EnergyHead
    assert [
        k.removeprefix("head.") for k in model.state_dict() if k.startswith("head.")
    ] == PREVIOUS_HEAD_KEYS
    loss, total, abs_total = previous_implementation_values(model)
    assert loss == pytest.approx(PREVIOUS_LOSS, rel=1e-5)
    assert total == pytest.approx(PREVIOUS_SAMPLE_SUM, rel=1e-5)
    assert abs_total == pytest.approx(PREVIOUS_SAMPLE_ABS_SUM, rel=1e-5)


def test_default_head_is_energy_and_old_configs_load():
    cfg = preset("calm-tiny").to_dict()
    for key in ("head", "flow_steps", "flow_solver", "diffusion_steps", "diffusion_solver",
                "diffusion_train_steps", "diffusion_schedule", "diffusion_target"):  # fmt: skip
        cfg.pop(key)  # a config.json written before the head fields existed
    assert CALMConfig.from_dict(cfg).head == "energy"


# ---------------------------------------------------------------------------------------------
# The interface


def test_registry_matches_config_names():
    assert tuple(HEADS) == HEAD_NAMES
    for name in HEAD_NAMES:
        cls = head_class(name)
        assert issubclass(cls, GenerativeHead) and cls.name == name


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_every_head_trains_samples_and_is_deterministic_given_noise(head):
    model = tiny_calm(head).train()
    loss, metrics = model.loss(tokens())
    assert loss.ndim == 0 and torch.isfinite(loss) and metrics
    loss.backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    model.eval()
    h = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    noise = model.head.noise((2, 3, 5), generator=torch.Generator().manual_seed(1))
    assert noise.shape == (2, 3, 5, model.head.noise_dim)
    z = model.head(h, noise)
    assert z.shape == (2, 3, 5, 16)
    assert torch.equal(z, model.head(h, noise.clone()))
    # samples differ between noise draws, and sample() == forward(noise()) for one generator
    assert not torch.allclose(z[..., 0, :], z[..., 1, :])
    same = model.sample_latents(h, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, z)
    # per position: a row's samples do not depend on the other rows of the batch
    torch.testing.assert_close(model.head(h[:1, :1], noise[:1, :1]), z[:1, :1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_noise_from_uniform_is_gaussian(head):
    h = tiny_calm(head).head
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0)).clamp_(1e-7, 1 - 1e-7)
    g = h.noise_from_uniform(u)
    se = 1 / len(u) ** 0.5
    assert abs(float(g.mean())) < 5 * se and abs(float(g.var()) - 1) < 5 * 2**0.5 * se


def test_energy_noise_from_uniform_is_the_shifted_uniform():
    u = torch.rand(5, 64)
    assert torch.equal(tiny_calm().head.noise_from_uniform(u.clone()), u - 0.5)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_save_load_keeps_every_head_identical(head, tmp_path):
    model = tiny_calm(head)
    model.set_head_sampling(**({} if head == "energy" else {"steps": 2}))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = calm.load(tmp_path / "ckpt")
    assert loaded.config == model.config and type(loaded.head) is type(model.head)
    assert loaded.head.describe() == model.head.describe()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    for m in (model, loaded):
        m.eval()
    a = model.sample_chunks(h, 3, generator=torch.Generator().manual_seed(9))
    b = loaded.sample_chunks(h, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    za = model.sample_latents(h, 3, generator=torch.Generator().manual_seed(9))
    zb = loaded.sample_latents(h, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(za, zb)
    torch.manual_seed(4)
    la = model.loss(tokens())[0]
    torch.manual_seed(4)
    lb = loaded.loss(tokens())[0]
    assert torch.equal(la, lb)


# ---------------------------------------------------------------------------------------------
# Sampling settings at use time, and bad settings


def test_set_head_sampling_changes_steps_and_solver():
    model = tiny_calm("flow")
    h = torch.randn(3, 64)
    x0 = model.head.noise((3, 2), generator=torch.Generator().manual_seed(0))
    before = model.head(h, x0)
    model.set_head_sampling(steps=1, solver="euler")
    assert model.config.flow_steps == 1 and model.config.flow_solver == "euler"
    assert model.head.evals_per_sample == 1
    assert not torch.allclose(before, model.head(h, x0))
    model.set_head_sampling(steps=3, solver="midpoint")
    assert torch.equal(before, model.head(h, x0))
    d = tiny_calm("diffusion").set_head_sampling(steps=7, solver="ddim")
    assert d.head.describe() == {"name": "diffusion", "evals_per_sample": 7, "steps": 7, "solver": "ddim"}
    assert d.head.noise_dim == 16
    d.set_head_sampling(solver="ddpm")
    assert d.head.noise_dim == 7 * 16


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"head": "gan"}, "head"),
        ({"flow_steps": 0}, "flow_steps"),
        ({"flow_solver": "rk4"}, "flow_solver"),
        ({"diffusion_steps": 0}, "diffusion_steps"),
        ({"diffusion_steps": 2000}, "diffusion_steps"),
        ({"diffusion_solver": "dpm"}, "diffusion_solver"),
        ({"diffusion_schedule": "sigmoid"}, "diffusion_schedule"),
        ({"diffusion_train_steps": 0}, "diffusion_train_steps"),
        ({"diffusion_target": "x0"}, "diffusion_target"),
    ],
)
def test_bad_head_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        preset("calm-tiny").replace(**changes)


def test_bad_settings_through_overrides_and_at_use_time():
    with pytest.raises(ConfigError, match="flow_steps"):
        apply_overrides(preset("calm-tiny"), ["head=flow", "flow_steps=0"])
    with pytest.raises(ConfigError, match="head"):
        head_class("gan")
    with pytest.raises(ConfigError, match="flow_steps"):
        tiny_calm("flow").set_head_sampling(steps=0)
    with pytest.raises(ConfigError, match="diffusion_solver"):
        tiny_calm("diffusion").set_head_sampling(solver="euler")
    with pytest.raises(ConfigError, match="head_steps"):
        tiny_calm("energy").set_head_sampling(steps=4)
    d = tiny_calm("diffusion")
    with pytest.raises(ConfigError, match="fixed by training"):
        d.head.configure(d.config.replace(diffusion_target="eps"))
    model = tiny_calm("flow")
    with pytest.raises(ConfigError):
        model.set_head_sampling(steps=-1)
    assert model.config.flow_steps == 3 and model.head.steps == 3  # a rejected change changes nothing


def test_flow_and_diffusion_heads_accept_one_training_draw():
    cfg = preset("calm-tiny").replace(head="flow", num_model_samples=1)
    assert build_head(cfg).num_samples == 1
    with pytest.raises(ConfigError, match="num_model_samples"):
        preset("calm-tiny").replace(num_model_samples=1)  # the energy score needs pairs


# ---------------------------------------------------------------------------------------------
# Everything that takes a CALM model takes each head


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_brier_and_temperature_samplers_accept_every_head(head):
    model = tiny_calm(head)
    scores = calm_window_scores(model, tokens(2, 2, 24), generator=torch.Generator().manual_seed(0))
    assert scores.estimates.shape[-1] == 4 and torch.isfinite(scores.estimates).all()
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)

    def draw(m):  # one head sample, decoded, is one draw
        return model.sample_chunks(h, m, generator=g)

    out = sample_exact(draw, 0.5, max_draws=16)
    assert out.shape == (2, 4)
    assert sample_approx(draw(20), 0.5, generator=g).shape == (2, 4)


class _Windows:
    """In-memory data for `calm.train.train`: the batch of a step is a function of (seed, step)."""

    def __init__(self, vocab=512):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(3, vocab, (4000,), generator=g)

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        starts = torch.randint(0, len(self.tokens) - block_size, (batch_size,), generator=g).tolist()
        return torch.stack([self.tokens[s : s + block_size] for s in starts])[rank::world_size]

    def val_windows(self, block_size, count):
        return self.tokens[: count * block_size].view(count, block_size)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_training_and_resume_are_exact_for_every_head(head, tmp_path):
    from calm.config import TrainConfig
    from calm.train import train

    train_cfg = TrainConfig(steps=4, batch_size=2, block_size=16, lr=1e-2, warmup_steps=1, eval_every=0,
                            save_every=0, log_every=1, seed=3)  # fmt: skip
    full = tiny_calm(head)
    train(full, train_cfg, _Windows(), tmp_path / "full", quiet=True)
    part = tiny_calm(head)
    train(part, train_cfg.replace(steps=2), _Windows(), tmp_path / "part", quiet=True)
    resumed = tiny_calm(head, seed=5)  # other weights: all must come from the checkpoint
    train(resumed, train_cfg, _Windows(), tmp_path / "part", resume=True, quiet=True)
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(full.head.net.input_proj.weight, tiny_calm(head).head.net.input_proj.weight)


def test_head_options_refuse_a_token_model():
    import argparse
    import types

    from calm.cli import apply_head_sampling

    ar = types.SimpleNamespace(config=types.SimpleNamespace(kind="ar"))
    with pytest.raises(ConfigError, match="CALM models only"):
        apply_head_sampling(ar, argparse.Namespace(head_steps=4, head_solver=None))
    apply_head_sampling(ar, argparse.Namespace(head_steps=None, head_solver=None))  # nothing asked: fine
