"""No host sync inside a training step: our code reads device values only at log/eval/save points.

On a GPU every ``Tensor.item()`` / ``.tolist()`` / ``int(t)`` / ``float(t)`` / ``bool(t)`` (a
Python ``if`` on a tensor) makes the host wait for the device. Here, on the CPU, such calls made
from the `calm` package are counted during whole training runs: a run with twice as many steps
between the same number of log lines must make exactly as many, so any read added inside the
step (loop, models, losses) makes this fail. (The GPU check, `benchmarks/gpu_check.py`, runs
steps under ``torch.cuda.set_sync_debug_mode("error")`` as well.)
"""

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import calm
from calm.config import TrainConfig, preset
from calm.models import build_model
from calm.train import train

CALM_SOURCES = str(Path(calm.__file__).resolve().parent)
READS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def host_reads():
    """Counter of (method, file:line) for the tensor-to-host reads made from calm's own code."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(CALM_SOURCES):
                calls[(name, f"{Path(caller.co_filename).name}:{sys._getframe(1).f_lineno}")] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class Windows:
    """Random token windows per step, made without any tensor-to-host read."""

    def __init__(self, vocab):
        self.vocab = vocab

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        return torch.randint(0, self.vocab, (batch_size, block_size), generator=g)[rank::world_size]

    def val_windows(self, block_size, count):
        return torch.zeros(0, block_size, dtype=torch.long)


def reads_during(kind: str, steps: int, log_every: int, tmp_path) -> Counter:
    config = {"autoencoder": "ae-tiny", "calm": "calm-tiny", "ar": "transformer-tiny"}[kind]
    torch.manual_seed(0)
    model = build_model(preset(config))
    cfg = TrainConfig(
        steps=steps, batch_size=2, block_size=32, log_every=log_every, eval_every=0, save_every=0,
        warmup_steps=2, grad_accum=2,
    )  # fmt: skip
    with host_reads() as calls:
        train(model, cfg, Windows(model.config.vocab_size), tmp_path / f"{kind}-{steps}", quiet=True, device="cpu")
    return calls


@pytest.mark.parametrize("kind", ["autoencoder", "calm", "ar"])
def test_no_host_read_between_log_intervals(kind, tmp_path):
    short = reads_during(kind, steps=4, log_every=2, tmp_path=tmp_path)  # 2 log lines, 1 save
    long = reads_during(kind, steps=8, log_every=4, tmp_path=tmp_path)  # 2 log lines, 1 save
    assert sum(short.values()) > 0  # the counter sees the reads at the log lines
    extra = {k: v - short.get(k, 0) for k, v in long.items() if v != short.get(k, 0)}
    assert not extra, f"host reads that grow with the steps between log lines: {extra}"
