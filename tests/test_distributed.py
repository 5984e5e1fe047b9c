"""Data parallelism on CPU (Gloo) under torchrun: DDP and FSDP2 match one process; resume is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import MemoryData, TinyLM, cfg

import calm
from calm import distributed as D
from calm.cli import main as cli_main
from calm.config import ARConfig, AutoencoderConfig
from calm.models import build_model
from calm.train import KILL_AT_STEP_ENV, read_metrics, train

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_distributed import AR_CONFIG, AE_CONFIG, live_windows
from test_train import MemoryData, TinyLM, cfg
from calm.models import build_model
from calm.train import train

out, strategy, model_name, grad_accum, steps, resume = sys.argv[1:7]
torch.manual_seed(0)
if model_name == "tiny":
    model = TinyLM()
elif model_name == "ar":  # built on meta: under FSDP2 each rank allocates and initialises its shards
    model = build_model(AR_CONFIG, device="meta")
else:  # draws masks / noise / dropout from the global RNG: exercises per-rank RNG restore
    model = build_model(AE_CONFIG, device="meta")
checkpointing = model_name == "ar"  # activation checkpointing composes with FSDP2 and changes no result
train(model, cfg(steps=int(steps), grad_accum=int(grad_accum), save_every=2, eval_every=2,
                 activation_checkpointing=checkpointing), MemoryData(), out,
      quiet=True, device="cpu", strategy=strategy, resume=resume == "1")
model.eval()  # the live (still sharded) model's outputs, for the exported checkpoint to match
with torch.no_grad():
    loss = float(model(live_windows())[0])
if torch.distributed.get_rank() == 0:
    open(out + "/live.json", "w").write(json.dumps({{"loss": loss}}))
from calm.distributed import destroy_distributed
destroy_distributed()  # not left to interpreter shutdown, where Gloo once aborted a rank in CI
"""

AR_CONFIG = ARConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, ffn_dim=24, max_seq_len=16)
AE_CONFIG = AutoencoderConfig(vocab_size=32, d_model=16, ffn_dim=32, latent_dim=8, mask_id=31)


def live_windows() -> torch.Tensor:
    return torch.randint(0, 31, (4, 16), generator=torch.Generator().manual_seed(11))


def torchrun(tmp_path, *args, env=None, check=True):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    proc = subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_single_process_helpers_are_no_ops():
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert D.is_main_process() and D.get_world_size() == 1
    D.barrier()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(D.all_reduce_mean(t), t) and D.all_reduce_mean(t) is not t
    model = TinyLM()
    assert D.wrap_model(model, "ddp") is model and D.unwrap_model(model) is model
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    with D.gradient_sync(model, False):
        pass


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy):
    """Same global batch -> same weights, with 2 accumulation micro-batches per rank (gradient sync
    skipped on the first: DDP no_sync / FSDP2 set_requires_gradient_sync). FSDP2: a Transformer
    built on the meta device, each rank initialising only its shards, with activation
    checkpointing, matches eager construction with the same seed and plain training; the last
    (sharded) checkpoint holds the consolidated weights."""
    model_name = "tiny" if strategy == "ddp" else "ar"
    torchrun(tmp_path, tmp_path / "dp", strategy, model_name, 2, 4, 0)
    if model_name == "tiny":
        torch.manual_seed(0)
        single = TinyLM()
    else:
        torch.manual_seed(cfg().seed)  # what train() seeds a meta-built model's init_weights with
        single = build_model(AR_CONFIG)
    train(
        single,
        cfg(steps=4, save_every=2, eval_every=2),
        MemoryData(),
        tmp_path / "one",
        quiet=True,
        device="cpu",
    )
    dp = load_file(str(tmp_path / "dp" / "checkpoint" / "model.safetensors"))
    for name, value in single.state_dict().items():
        if name in dp:
            torch.testing.assert_close(dp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # logged numbers are means over all ranks, so they match the single process too
    for a, b in zip(read_metrics(tmp_path / "dp"), read_metrics(tmp_path / "one")):
        assert a["split"] == b["split"] and a["step"] == b["step"]
        key = "loss" if a["split"] == "train" else "val_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)


@pytest.mark.slow
def test_distributed_resume_after_kill_is_exact(tmp_path, strategy="fsdp"):
    """FSDP2 with sharded (DCP) checkpoints: SIGKILL after step 3, resume, and the weights equal an
    uninterrupted run's; per-rank RNG streams restored (the autoencoder draws masks and noise on
    every step). Each rank's shard files hold about half the state; `calm export` of a sharded
    checkpoint loads with calm.load and computes what the live model computes."""
    torchrun(tmp_path, tmp_path / "full", strategy, "ae", 1, 5, 0)
    killed = torchrun(
        tmp_path, tmp_path / "run", strategy, "ae", 1, 5, 0, env={KILL_AT_STEP_ENV: "3"}, check=False
    )
    assert killed.returncode != 0
    step3 = tmp_path / "run" / "checkpoint"
    assert json.loads((step3 / "train_config.json").read_text())["steps"] == 5
    # a sharded checkpoint: one shard file per rank, nothing gathered (no model.safetensors yet)
    assert not (step3 / "model.safetensors").exists()
    shards = {p.name: p.stat().st_size for p in (step3 / "dcp").glob("*.distcp")}
    assert sorted(shards) == ["__0_0.distcp", "__1_0.distcp"]
    for size in shards.values():
        assert 0.35 < size / sum(shards.values()) < 0.65, shards
    at_step3 = calm.load(step3)  # read straight from the shards
    cli_main_ok(["export", str(step3), str(tmp_path / "export3")])
    exported3 = calm.load(tmp_path / "export3")
    for (name, a), b in zip(at_step3.state_dict().items(), exported3.state_dict().values()):
        assert torch.equal(a, b), name

    torchrun(tmp_path, tmp_path / "run", strategy, "ae", 1, 5, 1)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "run"))
    # the export of the final sharded checkpoint computes what the live sharded model computed
    cli_main_ok(["export", str(tmp_path / "run" / "checkpoint"), str(tmp_path / "export")])
    exported = calm.load(tmp_path / "export")
    assert not (tmp_path / "export" / "dcp").exists() and not (tmp_path / "export" / "train_state.pt").exists()
    with torch.no_grad():
        loss = float(exported(live_windows())[0])
    live = json.loads((tmp_path / "run" / "live.json").read_text())["loss"]
    assert loss == pytest.approx(live, rel=1e-6, abs=1e-7)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, b[k] if k in b else b["embed.weight"]), k


def cli_main_ok(argv):
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 0


STOP_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import MemoryData, TinyLM, cfg
from calm.train import train

class SignalOnRank1(MemoryData):
    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        if rank == 1 and step == 2:  # only rank 1 is told to stop, during step index 2
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_batch(step, batch_size, block_size, seed, rank, world_size)

torch.manual_seed(0)
train(TinyLM(), cfg(steps=8, save_every=100, eval_every=0), SignalOnRank1(), sys.argv[1], quiet=True, device="cpu")
"""


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(tests=str(TESTS)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out  # the workers exit by the signal's code, torchrun reports it
    assert "stopped by SIGTERM after step 3" in out, out
    from calm.checkpoint import load_train_state

    assert load_train_state(tmp_path / "run" / "checkpoint")["step"] == 3  # rank 0 saved that step
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 3


def test_resolve_device_is_the_one_device_rule():
    """auto -> CPU here; a bad name or CUDA where there is none is a ValueError naming it
    (the --device of eval, generate and serve, and training, all go through it)."""
    from calm.distributed import resolve_device

    expected_auto = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected_auto
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a valid device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
