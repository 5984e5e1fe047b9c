"""The device-side pieces of a training step: lr schedule, skipped updates, MFU inputs; `calm export`."""

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
