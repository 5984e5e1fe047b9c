"""The device-side pieces of a training step: lr schedule, skipped updates, MFU inputs; `calm export`."""

import contextlib

import pytest
import torch
from test_train import MemoryData, cfg, tiny

import calm
from calm.checkpoint import CheckpointError
from calm.cli import main as cli_main
from calm.config import TrainConfig, preset
from calm.flops import flops_report, peak_bf16_flops, peak_flops
from calm.parallelize import mixed_precision
from calm.sharded_checkpoint import export_checkpoint
from calm.train import _train_flops_per_token, build_optimizer, lr_multiplier, train
from calm.train_step import DeviceSchedule, init_optimizer_state


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_device_schedule_is_lr_multiplier(schedule):
    c = TrainConfig(steps=60, warmup_steps=7, schedule=schedule, min_lr_ratio=0.2)
    model = tiny()
    sched = DeviceSchedule(build_optimizer(model, c), c, torch.device("cpu"))
    steps = torch.arange(0, 80, dtype=torch.float32)
    expected = torch.tensor([lr_multiplier(int(s), c) for s in steps])
    torch.testing.assert_close(sched.multiplier(steps), expected, rtol=1e-6, atol=1e-7)
    assert sched.multiplier(torch.tensor(3.0)).shape == ()  # the lr tensor the fused kernel reads


def test_a_skipped_step_leaves_weights_moments_and_counts_untouched():
    model = tiny()
    opt = build_optimizer(model, TrainConfig(lr=0.1))
    init_optimizer_state(opt)  # creates AdamW's state without changing anything
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(int(s["step"]) == 0 for s in opt.state.values())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k


def test_peak_flops_by_device_name():
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") is None  # slower part: --peak-tflops
    assert peak_bf16_flops("Tesla T4") is None
    assert peak_flops("cpu", 100.0) is None  # MFU only on CUDA
    assert mixed_precision(torch.device("cpu"), "auto") is None


def test_train_flops_per_token_is_calm_flops_at_the_training_window():
    calm_cfg = preset("calm-tiny")
    got = _train_flops_per_token(calm_cfg, TrainConfig(block_size=64))
    assert got == flops_report(calm_cfg, context=16)["train_flops_per_token"]
    assert _train_flops_per_token(tiny().config, TrainConfig()) is None  # a model calm.flops does not know


def test_export_of_an_ordinary_checkpoint_drops_the_training_state(tmp_path):
    ae = calm.models.build_model(preset("ae-tiny").replace(vocab_size=32, mask_id=31, pad_id=30, eot_id=29))
    train(ae, cfg(steps=2), MemoryData(), tmp_path / "run", quiet=True)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", str(tmp_path / "run" / "checkpoint"), str(tmp_path / "out"), "--json"])
    assert exit_.value.code == 0
    assert not (tmp_path / "out" / "train_state.pt").exists()
    loaded = calm.load(tmp_path / "out")
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="must lie outside"):
        export_checkpoint(tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint" / "x")


def test_lr_scale_groups_follow_the_device_schedule_and_the_log_shows_the_base_lr(tmp_path):
    """lr_scale groups keep their factor under the device schedule, through skipped steps and a
    resume; the logged lr is the unscaled one even when the first group is a scaled one."""
    from calm.train_step import StepRunner

    c = cfg(steps=8, warmup_steps=4, schedule="cosine", lr=1e-2, lr_scale="proj=0.5,norm=3")
    model = tiny(nan_token=31)
    opt = build_optimizer(model, c)
    factors = [g["lr"] / c.lr for g in opt.param_groups]
    assert set(factors) == {0.5, 1.0, 3.0} and factors[0] == 0.5  # the first group is scaled
    sched = DeviceSchedule(opt, c, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    runner = StepRunner(model, model.loss, opt, sched, params, c, torch.device("cpu"), contextlib.nullcontext())
    data = MemoryData(poison={2}, poison_id=31)  # step 2 is non-finite: skipped, the schedule waits
    for step in range(4):
        runner.run(step, data.train_batch(step, c.batch_size, c.block_size, c.seed, 0, 1))
    stats = runner.read()
    assert stats.skipped == 1 and stats.applied == 3
    last = lr_multiplier(2, c)  # the last step ran after 2 applied updates (step 2 was skipped)
    for g, f in zip(opt.param_groups, factors):
        assert float(g["lr"]) == pytest.approx(last * c.lr * f, rel=1e-6)
    assert stats.lr == pytest.approx(last * c.lr, rel=1e-6)  # unscaled, though group 0 is scaled
    # a resumed schedule (checkpoint state) puts every group back on its own factor
    resumed = DeviceSchedule(build_optimizer(tiny(), c), c, torch.device("cpu"))
    resumed.load_state_dict(sched.state_dict())
    assert resumed.state_dict() == {"last_epoch": 3}
    resumed.set_lr()
    for g, f in zip(resumed.optimizer.param_groups, factors):
        assert float(g["lr"]) == pytest.approx(lr_multiplier(3, c) * c.lr * f, rel=1e-6)
