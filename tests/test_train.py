"""The training loop: schedule, parameter groups, accumulation, bad steps, logging, exact resume."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from calm.checkpoint import CheckpointError, load_model, load_train_state
from calm.config import AutoencoderConfig, ConfigError, TrainConfig
from calm.models.autoencoder import ChunkAutoencoder
from calm.train import (
    KILL_AT_STEP_ENV,
    TrainingError,
    lr_multiplier,
    param_groups,
    read_metrics,
    train,
)

# ------------------------------------------------------------------------------ tiny helpers


@dataclass
class TinyConfig:
    kind = "tiny"
    vocab_size: int = 32
    dim: int = 8

    def to_dict(self):
        return asdict(self)


class TinyLM(nn.Module):
    """A deterministic bigram-ish LM with a tied head, a norm and a bias: every parameter kind."""

    def __init__(self, config=None, nan_token=None):
        super().__init__()
        self.config = config or TinyConfig()
        self.embed = nn.Embedding(self.config.vocab_size, self.config.dim)
        self.proj = nn.Linear(self.config.dim, self.config.dim)
        self.norm = nn.LayerNorm(self.config.dim)
        self.nan_token = nan_token

    def loss(self, tokens):
        h = self.norm(torch.tanh(self.proj(self.embed(tokens[:, :-1]))))
        logits = h @ self.embed.weight.T
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        if self.nan_token is not None and (tokens == self.nan_token).any():
            loss = loss * float("nan")
        return loss, {"ppl": loss.detach().exp()}

    def forward(self, tokens):
        return self.loss(tokens)


class MemoryData:
    """In-memory `DataSource`: the batch of a step is a pure function of (seed, step)."""

    def __init__(self, n=4000, vocab=32, poison=None, poison_id=31, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.train = torch.randint(0, vocab - 1, (n,), generator=g)
        self.val = torch.randint(0, vocab - 1, (n // 4,), generator=g)
        self.poison, self.poison_id = set(poison or ()), poison_id
        self.requested = []

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        self.requested.append(step)
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        starts = torch.randint(0, len(self.train) - block_size, (batch_size,), generator=g)
        rows = torch.stack([self.train[s : s + block_size] for s in starts.tolist()])
        if step in self.poison:
            rows[:, 0] = self.poison_id
        return rows[rank::world_size]

    def val_windows(self, block_size, count):
        n = min(count, len(self.val) // block_size)
        return self.val[: n * block_size].view(n, block_size)


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=6,
        batch_size=4,
        block_size=16,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        save_every=0,
        log_every=1,
        eval_batches=2,
        seed=3,
        weight_decay=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


# ------------------------------------------------------------------------------ schedule, groups


def test_lr_schedule_values():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="constant")
    assert [lr_multiplier(s, c) for s in (0, 4, 9, 10, 50, 200)] == [0.1, 0.5, 1.0, 1.0, 1.0, 1.0]
    c = TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(9, c) == 1.0
    assert lr_multiplier(10, c) == 1.0  # cosine starts at the top
    assert lr_multiplier(60, c) == pytest.approx(0.55)  # halfway: midpoint of 1 and the floor
    assert lr_multiplier(110, c) == pytest.approx(0.1)  # floor reached at the last step
    assert lr_multiplier(500, c) == pytest.approx(0.1)  # and held
    c = TrainConfig(steps=5, warmup_steps=0)
    assert lr_multiplier(0, c) == 1.0


def test_scheduler_lr_seen_by_each_update(tmp_path):
    train(tiny(), cfg(steps=5, warmup_steps=4, lr=0.2), MemoryData(), tmp_path, quiet=True)
    lrs = [r["lr"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert lrs == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])


def test_decay_groups_exclude_vectors_embeddings_and_frozen():
    torch.manual_seed(0)
    ae = ChunkAutoencoder(AutoencoderConfig(vocab_size=64, d_model=16, ffn_dim=32, latent_dim=8, mask_id=3))
    ae.squeeze.requires_grad_(False)  # stand-in for CALM's frozen autoencoder
    decay, no_decay = param_groups(ae, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert id(ae.embed.weight) in ids(no_decay)  # embedding (and the tied head) never decays
    assert id(ae.to_latent.weight) in ids(decay) and id(ae.to_latent.bias) in ids(no_decay)
    assert id(ae.encoder_norm.weight) in ids(no_decay)
    assert id(ae.squeeze.weight) not in ids(decay) | ids(no_decay)
    assert all(p.ndim >= 2 for p in decay["params"])
    n_trainable = len({id(p) for p in ae.parameters() if p.requires_grad})
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


# ------------------------------------------------------------------------------ loop behaviour


def test_grad_accumulation_matches_one_batch(tmp_path):
    a, b = tiny(), tiny()
    train(a, cfg(steps=3), MemoryData(), tmp_path / "a", quiet=True)
    train(b, cfg(steps=3, grad_accum=2), MemoryData(), tmp_path / "b", quiet=True)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    c = tiny()
    train(c, cfg(steps=3, batch_size=2), MemoryData(), tmp_path / "c", quiet=True)
    assert not torch.allclose(a.proj.weight, c.proj.weight)  # the comparison has teeth


def test_nonfinite_loss_skips_update_but_advances_data(tmp_path, capsys):
    data = MemoryData(poison={2, 3})
    model = tiny(nan_token=31)
    summary = train(model, cfg(steps=6, save_every=6), data, tmp_path, quiet=True)
    assert data.requested == [0, 1, 2, 3, 4, 5]  # the data position moves on
    assert "non-finite loss" in capsys.readouterr().err
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_train_state(tmp_path / "checkpoint")
    assert state["scheduler"]["last_epoch"] == 4  # 6 steps, 2 skipped: scheduler stepped 4 times
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())
    assert [r["lr"] for r in records][4] == pytest.approx(1e-2)  # 3rd real update: past warm-up
    assert summary["step"] == 6


def test_abort_after_max_bad_steps(tmp_path):
    data = MemoryData(poison=range(100))
    model = tiny(nan_token=31)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="3 consecutive steps with a non-finite loss"):
        train(model, cfg(steps=10, max_bad_steps=3), data, tmp_path, quiet=True)
    assert data.requested == [0, 1, 2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_metrics_log_eval_fn_and_checkpoints(tmp_path):
    calls = []

    def eval_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(step)
        return {"custom": float(step)}

    model = tiny()
    summary = train(
        model,
        cfg(steps=6, eval_every=3, save_every=2, log_every=2),
        MemoryData(),
        tmp_path,
        eval_fn=eval_fn,
        keep_checkpoints=True,
        quiet=True,
    )
    assert calls == [3, 6]
    records = read_metrics(tmp_path)
    train_recs = [r for r in records if r["split"] == "train"]
    val_recs = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    assert {"loss", "ppl", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= set(train_recs[0])
    assert train_recs[-1]["tokens"] == 6 * 4 * 16
    assert [r["step"] for r in val_recs] == [3, 6] and val_recs[0]["custom"] == 3.0
    assert {"val_loss", "val_ppl"} <= set(val_recs[0])
    assert summary["val_loss"] == val_recs[-1]["val_loss"] and summary["custom"] == 6.0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "checkpoint",
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert load_train_state(tmp_path / "checkpoint")["step"] == 6
    weights = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert torch.equal(weights["proj.weight"], model.proj.weight.detach())


def test_fresh_run_refuses_existing_checkpoint_and_resume_needs_one(tmp_path):
    train(tiny(), cfg(steps=2), MemoryData(), tmp_path, quiet=True)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(tiny(), cfg(steps=2), MemoryData(), tmp_path, quiet=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny(), cfg(steps=2), MemoryData(), tmp_path / "other", resume=True, quiet=True)
    with pytest.raises(ConfigError, match="divisible"):
        train(tiny(), cfg(batch_size=3, grad_accum=2), MemoryData(), tmp_path / "x", quiet=True)


def _ae(seed=0):
    torch.manual_seed(seed)
    return ChunkAutoencoder(
        AutoencoderConfig(vocab_size=32, d_model=16, ffn_dim=32, latent_dim=8, mask_id=31)
    )


def test_evaluation_does_not_disturb_training_randomness(tmp_path):
    # The autoencoder draws masks, noise and dropout from the global RNG on every step.
    a, b = _ae(), _ae()
    train(a, cfg(steps=4, eval_every=0), MemoryData(), tmp_path / "a", quiet=True)
    train(b, cfg(steps=4, eval_every=1), MemoryData(), tmp_path / "b", quiet=True)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_in_process_resume_is_exact(tmp_path):
    full = _ae()
    train(full, cfg(steps=6, save_every=100), MemoryData(), tmp_path / "full", quiet=True)
    part = _ae()
    train(part, cfg(steps=3), MemoryData(), tmp_path / "part", quiet=True)
    resumed = _ae(seed=99)  # different init: everything must come from the checkpoint
    train(resumed, cfg(steps=6), MemoryData(), tmp_path / "part", resume=True, quiet=True)
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "part"))


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import calm.data as data
    root = tmp_path_factory.mktemp("prepared")
    words = "the a cat dog sat ran on under mat log and then quietly".split()
    g = torch.Generator().manual_seed(0)
    docs = [
        " ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist())
        for _ in range(60)
    ]
    (root / "in.txt").write_text("\n\n".join(docs))
    data.prepare(
        root / "in.txt",
        root / "data",
        vocab_size=280,
        val_fraction=0.2,
        workers=0,
        progress=False,
        log=lambda m: None,
    )
    return root / "data"


AE_ARGS = [
    "--preset",
    "ae-tiny",
    "--steps",
    "8",
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--set",
    "d_model=16",
    "ffn_dim=32",
    "latent_dim=8",
    "save_every=3",
    "log_every=1",
    "eval_every=4",
    "eval_batches=1",
    "warmup_steps=2",
    "lr=3e-3",
    "--quiet",
    "--device",
    "cpu",
]


def _cli(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "calm", "train-ae", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_cli_resume_after_sigkill_is_bitwise_identical(prepared, tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    out = _cli("--data", str(prepared), "--out", str(full), *AE_ARGS, "--json")
    summary = json.loads(out.stdout)
    assert summary["step"] == 8 and summary["kind"] == "autoencoder" and "val_loss" in summary

    killed = _cli(
        "--data", str(prepared), "--out", str(crashed), *AE_ARGS, env={KILL_AT_STEP_ENV: "5"}, check=False
    )
    assert killed.returncode == -9  # SIGKILL after step 5; the last checkpoint is from step 3
    assert max(r["step"] for r in read_metrics(crashed)) == 5
    assert load_train_state(crashed / "checkpoint")["step"] == 3

    _cli("--data", str(prepared), "--out", str(crashed), *AE_ARGS, "--resume")
    a, b = _weights(full), _weights(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(crashed))  # no duplicated or lost lines

    model = load_model(crashed / "checkpoint")
    tok = model.tokenizer
    assert model.config.vocab_size == tok.vocab_size and model.config.mask_id == tok.mask_id
    assert model.lm_head.weight is model.embed.weight


def _main(*argv, capsys):
    """`calm ...` in this process: (exit code, stdout, stderr)."""
    from calm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_cli_config_routing_and_errors(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(prepared), "--out", str(run), *AE_ARGS]
    code, out, err = _main(
        "train-ae", *common, "--steps", "2", "--set", "grad_accum=2", "--json", capsys=capsys
    )
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert summary["step"] == 2 and summary["loss"] > 0
    state = load_train_state(run / "checkpoint")
    assert state["train_config"]["grad_accum"] == 2 and state["train_config"]["block_size"] == 16
    model = load_model(run / "checkpoint")
    assert model.config.d_model == 16 and model.config.vocab_size == model.tokenizer.vocab_size

    code, _, err = _main("train-ae", *common, capsys=capsys)
    assert code == 2 and "already holds a checkpoint" in err
    code, _, err = _main(
        "train-ae",
        "--data",
        str(prepared),
        "--out",
        str(tmp_path / "b"),
        *AE_ARGS,
        "--set",
        "bogus=1",
        capsys=capsys,
    )
    assert code == 2 and "no config field named 'bogus'" in err
    code, _, err = _main("train-ae", *common, "--resume", "--set", "d_model=32", capsys=capsys)
    assert code == 2 and "cannot change the model config when resuming (d_model=32)" in err
    code, _, err = _main("train-ae", *common, "--set", "vocab_size=50", capsys=capsys)
    assert code == 2 and "contradicts the data's tokenizer" in err
    # resuming with a larger step budget continues the run (same --set values are accepted)
    code, out, err = _main("train-ae", *common, "--resume", "--steps", "3", "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 3
    code, out, err = _main("train-ae", *common, "--resume", "--steps", "3", capsys=capsys)
    assert code == 0 and "trained autoencoder: step 3/3" in out


def test_cli_train_ar_baseline(prepared, tmp_path, capsys):
    code, out, err = _main(
        "train",
        "--model",
        "ar",
        "--data",
        str(prepared),
        "--out",
        str(tmp_path / "ar"),
        "--preset",
        "transformer-tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--set",
        "d_model=16",
        "num_heads=2",
        "num_layers=1",
        "ffn_dim=32",
        "--quiet",
        "--json",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert code == 0, err
    assert json.loads(out)["kind"] == "ar"
    assert load_model(tmp_path / "ar" / "checkpoint").config.kind == "ar"
    # evaluations log BrierLM next to the validation cross-entropy (on by default)
    val = [r for r in read_metrics(tmp_path / "ar") if r.get("split") == "val"]
    assert val and all("brier_lm" in r and "val_loss" in r for r in val)
    assert all(r["brier_block_size"] == 16 for r in val)


def test_cli_train_calm_needs_autoencoder(prepared, tmp_path, capsys):
    code, _, err = _main(
        "train", "--data", str(prepared), "--out", str(tmp_path / "c"), "--quiet", capsys=capsys
    )
    assert code == 2 and "--ae" in err


def test_cli_train_calm_on_trained_autoencoder(prepared, tmp_path, capsys):
    ae_run, calm_run = tmp_path / "ae", tmp_path / "calm"
    code, _, err = _main(
        "train-ae", "--data", str(prepared), "--out", str(ae_run), *AE_ARGS, "--steps", "2", capsys=capsys
    )
    assert code == 0, err
    args = [
        "train",
        "--data",
        str(prepared),
        "--out",
        str(calm_run),
        "--ae",
        str(ae_run / "checkpoint"),
        "--preset",
        "calm-tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--set",
        "d_model=16",
        "num_heads=2",
        "num_layers=1",
        "ffn_dim=32",
        "num_target_samples=4",
        "--quiet",
        "--json",
        "--device",
        "cpu",
    ]
    code, out, err = _main(*args, capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["kind"] == "calm"
    model = load_model(calm_run / "checkpoint")
    ae = load_model(ae_run / "checkpoint")
    trained_ae = {k: v for k, v in model.state_dict().items() if k.startswith("autoencoder.")}
    assert trained_ae, "CALM should carry its autoencoder"
    for k, v in ae.state_dict().items():  # frozen: the autoencoder inside is unchanged by training
        assert torch.equal(trained_ae[f"autoencoder.{k}"], v), k


# ------------------------------------------------------------------------------ reliability (issue 16)


def _prepare(root, words, *, val_fraction=0.2, docs=60, seed=0):
    import calm.data as data
    g = torch.Generator().manual_seed(seed)
    text = [
        " ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist())
        for _ in range(docs)
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.txt").write_text("\n\n".join(text))
    data.prepare(
        root / "in.txt", root / "data", vocab_size=280, val_fraction=val_fraction, workers=0,
        progress=False, log=lambda m: None,
    )  # fmt: skip
    return root / "data"


def test_resume_refuses_data_with_another_tokenizer_of_the_same_size(prepared, tmp_path, capsys):
    other = _prepare(tmp_path / "other", "zebra yak xylophone wolf vole urchin tapir seal rook".split())
    assert json.loads((other / "meta.json").read_text())["vocab_size"] == 280  # same size, other merges
    run = tmp_path / "run"
    code, _, err = _main(
        "train-ae", "--data", str(prepared), "--out", str(run), *AE_ARGS, "--steps", "2", capsys=capsys
    )
    assert code == 0, err
    saved_tokenizer = (run / "checkpoint" / "tokenizer.json").read_bytes()
    code, _, err = _main(
        "train-ae",
        "--data",
        str(other),
        "--out",
        str(run),
        *AE_ARGS,
        "--steps",
        "3",
        "--resume",
        capsys=capsys,
    )
    assert code == 2
    assert "trained with a different tokenizer than the data in" in err and "checkpoint's tokenizer" in err
    assert load_train_state(run / "checkpoint")["step"] == 2
    assert (run / "checkpoint" / "tokenizer.json").read_bytes() == saved_tokenizer
    # the same data resumes as before
    code, _, err = _main(
        "train-ae",
        "--data",
        str(prepared),
        "--out",
        str(run),
        *AE_ARGS,
        "--steps",
        "3",
        "--resume",
        capsys=capsys,
    )
    assert code == 0, err


AR_TINY = ["--model", "ar", "--preset", "transformer-tiny", "--set", "d_model=16", "num_heads=2", "num_layers=1",
           "ffn_dim=32", "--quiet", "--device", "cpu"]  # fmt: skip


def test_validation_split_shorter_than_a_window_is_said_at_start_not_a_crash(tmp_path, capsys):
    words = "the a cat dog sat ran on under mat log and then quietly".split()
    data = _prepare(tmp_path / "short", words, val_fraction=0.02)  # one document of ~120 tokens
    assert json.loads((data / "meta.json").read_text())["splits"]["val"]["tokens"] < 128
    run = tmp_path / "ar"
    code, out, err = _main(
        "train", "--data", str(data), "--out", str(run), *AR_TINY, "--steps", "4", "--batch-size", "2",
        "--block-size", "128", "--set", "eval_every=2", "save_every=2", "--json", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "validation split has fewer than 1 window(s) of 128 tokens" in err
    assert json.loads(out)["step"] == 4 and load_train_state(run / "checkpoint")["step"] == 4


SIGNAL_ARGS = [a for a in AE_ARGS if a not in ("save_every=3", "eval_every=4")] + [
    "--set", "save_every=100000", "eval_every=100",
]  # fmt: skip


def _popen_train_ae(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "calm", "train-ae", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_step(proc, run, step, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        if any(r["step"] >= step for r in records if r.get("split") == "train"):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"no step {step} in {run} after {timeout} s")


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_is_bitwise_identical(prepared, tmp_path):
    import signal

    steps = ["--steps", "300"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _cli("--data", str(prepared), "--out", str(full), *SIGNAL_ARGS, *steps)
    proc = _popen_train_ae("--data", str(prepared), "--out", str(stopped), *SIGNAL_ARGS, *steps)
    _wait_for_step(proc, stopped, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = load_train_state(stopped / "checkpoint")["step"]
    assert 3 <= step < 300
    assert f"stopped by SIGTERM after step {step}: checkpoint saved in {stopped / 'checkpoint'}" in err
    assert max(r["step"] for r in read_metrics(stopped)) == step  # nothing logged past the save
    _cli("--data", str(prepared), "--out", str(stopped), *SIGNAL_ARGS, *steps, "--resume")
    a, b = _weights(full), _weights(stopped)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(stopped))


def test_sigint_in_process_raises_after_saving(tmp_path):
    import signal

    from calm.train import TrainingInterrupted

    class SignalAt(MemoryData):
        def train_batch(self, step, *a):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # arrives during step 2 (index), i.e. the 3rd step
            return super().train_batch(step, *a)

    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(), cfg(steps=6), SignalAt(), tmp_path, quiet=True)
    assert (info.value.step, info.value.exit_code, info.value.signal_name) == (3, 130, "SIGINT")
    assert load_train_state(tmp_path / "checkpoint")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_second_training_on_the_same_run_directory_is_refused(prepared, tmp_path, capsys):
    import signal

    run = tmp_path / "run"
    first = _popen_train_ae("--data", str(prepared), "--out", str(run), *SIGNAL_ARGS, "--steps", "1000000")
    try:
        _wait_for_step(first, run, 1)
        code, _, err = _main(
            "train-ae", "--data", str(prepared), "--out", str(run), *AE_ARGS, "--steps", "2", capsys=capsys
        )
        assert code == 2
        assert f"is in use by another training run (pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        first.communicate(timeout=60)
    code, _, err = _main(
        "train-ae", "--data", str(prepared), "--out", str(run), *AE_ARGS, "--steps", "2", capsys=capsys
    )
    assert code == 0, err
