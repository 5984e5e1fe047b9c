"""Checkpoint directories: tied weights, strict loading, clear errors, atomic writes."""

import json
import subprocess
import sys
import textwrap
import types
from dataclasses import asdict, dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

import calm
from calm.checkpoint import (
    COMPLETE_FILE,
    CheckpointError,
    is_complete,
    latest_checkpoint,
    load_config,
    load_model,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from calm.config import AutoencoderConfig
from calm.models.autoencoder import ChunkAutoencoder


def tiny_ae(seed=0, **kw) -> ChunkAutoencoder:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64, d_model=16, ffn_dim=32, latent_dim=8, chunk_size=4, mask_id=3, pad_id=1, eot_id=0
    )
    cfg.update(kw)
    return ChunkAutoencoder(AutoencoderConfig(**cfg))


@dataclass
class TiedConfig:
    """Not a registered kind: used with `load_weights` only."""

    kind = "tied-test"
    vocab: int = 11
    dim: int = 6

    def to_dict(self):
        return asdict(self)


class TiedModel(nn.Module):
    def __init__(self, config: TiedConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab, config.dim)
        self.mid = nn.Linear(config.dim, config.dim)
        self.decoder = nn.Linear(config.dim, config.vocab, bias=False)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        return self.decoder(self.mid(self.embedding(tokens)))


def _tokens(n=3, seed=1):
    return torch.randint(4, 64, (n, 8), generator=torch.Generator().manual_seed(seed))


def test_tied_roundtrip_autoencoder(tmp_path):
    model = tiny_ae()
    path = save_checkpoint(tmp_path / "ae", model)
    assert is_complete(path)
    meta = json.loads((path / "config.json").read_text())
    assert meta["kind"] == "autoencoder" and meta["format"] == "calm-checkpoint-v1"
    assert meta["calm_version"] == calm.__version__ and meta["config"]["d_model"] == 16
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("embed.weight" in names) != ("lm_head.weight" in names)  # stored once

    loaded = load_model(path)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.embed.weight  # tie survives the load
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.loss(_tokens())[0], loaded.loss(_tokens())[0])
    # calm.load goes through the same path
    again = calm.load(path)
    assert torch.equal(again.embed.weight, model.embed.weight)


def test_tied_roundtrip_generic_module(tmp_path):
    torch.manual_seed(0)
    model = TiedModel(TiedConfig())
    save_checkpoint(tmp_path / "tied", model)
    fresh = TiedModel(TiedConfig())
    load_weights(fresh, tmp_path / "tied")
    assert fresh.decoder.weight is fresh.embedding.weight
    assert torch.equal(fresh.embedding.weight, model.embedding.weight)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(x), model(x))


def test_load_dtype_and_device(tmp_path):
    save_checkpoint(tmp_path / "ae", tiny_ae())
    m = load_model(tmp_path / "ae", device="cpu", dtype=torch.bfloat16)
    assert m.embed.weight.dtype == torch.bfloat16 and m.lm_head.weight is m.embed.weight


def test_missing_complete_marker(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    (path / COMPLETE_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete or interrupted checkpoint.*no COMPLETE marker"):
        load_model(path)


def test_corrupt_weights(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(path)
    data[:8] = (10**12).to_bytes(8, "little")  # same size, nonsense header length
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["latent_dim"] = 12
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"to_latent.weight: checkpoint \(16, 16\) vs model \(24, 16\)"):
        load_model(path)


def test_missing_and_unexpected_keys(tmp_path):
    save_checkpoint(tmp_path / "tied", TiedModel(TiedConfig()))

    class Other(TiedModel):
        def __init__(self, config):
            super().__init__(config)
            del self.mid
            self.extra = nn.Linear(config.dim, 2)

    with pytest.raises(
        CheckpointError, match=r"missing key\(s\): extra.bias, extra.weight.*unexpected key\(s\): mid"
    ):
        load_weights(Other(TiedConfig()), tmp_path / "tied")


def test_foreign_and_invalid_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a calm checkpoint: it has no config.json"):
        load_model(tmp_path / "empty")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (hf / COMPLETE_FILE).write_text("")
    with pytest.raises(CheckpointError, match="not a calm checkpoint config"):
        load_model(hf)

    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "kind": "mystery"}))
    with pytest.raises(CheckpointError, match="unknown model kind 'mystery'"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "bogus": 1}}))
    with pytest.raises(CheckpointError, match="invalid autoencoder config.*bogus"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "num_layers": 3}}))
    with pytest.raises(CheckpointError, match="num_layers"):
        load_config(path)


def test_official_layout_is_delegated(tmp_path, monkeypatch):
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({"patch_size": 4, "hidden_size": 8}))
    (official / "pytorch_model.bin").write_bytes(b"")
    calls = []
    fake = types.ModuleType("calm.official")
    fake.load_official = lambda path, ae_path=None, device=None, dtype=None: (
        calls.append((path, ae_path, device, dtype)) or "model"
    )
    monkeypatch.setitem(sys.modules, "calm.official", fake)
    assert load_model(official, dtype=torch.float32) == "model"
    assert load_model(official, ae_path="AE") == "model"
    assert calls == [(official, None, None, torch.float32), (official, "AE", None, None)]


def test_train_state_roundtrip(tmp_path):
    model = tiny_ae()
    opt = torch.optim.AdamW(model.parameters())
    model.loss(_tokens())[0].backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state()}]}
    save_checkpoint(tmp_path / "ck", model, train_state=state)
    loaded = load_train_state(tmp_path / "ck")
    assert loaded["step"] == 7
    assert torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    save_checkpoint(tmp_path / "plain", model)
    with pytest.raises(CheckpointError, match="not resumable"):
        load_train_state(tmp_path / "plain")


def test_replace_and_refuse_foreign_target(tmp_path):
    first, second = tiny_ae(seed=1), tiny_ae(seed=2)
    save_checkpoint(tmp_path / "ck", first)
    save_checkpoint(tmp_path / "ck", second, extra_files={"note.txt": "hello"})
    assert torch.equal(load_model(tmp_path / "ck").embed.weight, second.embed.weight)
    assert (tmp_path / "ck" / "note.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old siblings left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(tmp_path / "mine", first)
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_exception_mid_save_keeps_previous(tmp_path, monkeypatch):
    old, new = tiny_ae(seed=1), tiny_ae(seed=2)
    save_checkpoint(tmp_path / "ck", old)

    def boom(*a, **k):  # torch.save of the train state comes after the weights are written
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", new, train_state={"step": 1})
    assert torch.equal(load_model(tmp_path / "ck").embed.weight, old.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


CRASH_SCRIPT = """
import os, signal, sys, torch
import calm.checkpoint as ck
import calm.checkpoint_writing as writing  # the crashes are patched where the save looks them up
from calm.config import AutoencoderConfig
from calm.models.autoencoder import ChunkAutoencoder

path, mode = sys.argv[1], sys.argv[2]
def ae(seed):
    torch.manual_seed(seed)
    return ChunkAutoencoder(AutoencoderConfig(vocab_size=64, d_model=16, ffn_dim=32, latent_dim=8, mask_id=3))
ck.save_checkpoint(path, ae(1))
if mode == "mid-write":      # killed after the weights are written, before COMPLETE
    writing._fsync_tree = lambda root: os.kill(os.getpid(), signal.SIGKILL)
elif mode == "mid-swap":     # killed between 'old -> .old' and 'new -> path'
    real = os.rename
    def rename(a, b):
        real(a, b)
        if ".old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
    writing.os.rename = rename
ck.save_checkpoint(path, ae(2))
"""


@pytest.mark.parametrize("mode", ["mid-write", "mid-swap"])
def test_hard_kill_mid_save(tmp_path, mode):
    path = tmp_path / "checkpoint"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT), str(path), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    expected = tiny_ae(seed=1, vocab_size=64, mask_id=3, pad_id=1, eot_id=0).embed.weight
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.")]
    assert leftovers  # the crash left a temp (or old) directory behind
    for p in leftovers:
        if ".tmp-" in p.name:
            with pytest.raises(CheckpointError, match="interrupted"):
                load_model(p)
    if mode == "mid-swap":
        assert not path.exists()
        with pytest.warns(UserWarning, match="interrupted"):
            loaded = load_model(path)  # falls back to the complete previous version
        with pytest.warns(UserWarning, match="interrupted"):
            assert ".checkpoint.old-" in latest_checkpoint(tmp_path).name
    else:
        loaded = load_model(path)
    assert torch.equal(loaded.embed.weight, expected)
    # the next save repairs and cleans up
    save_checkpoint(path, tiny_ae(seed=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert torch.equal(load_model(path).embed.weight, tiny_ae(seed=3).embed.weight)


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 12, 6):
        save_checkpoint(tmp_path / f"checkpoint-{step}", tiny_ae())
    (tmp_path / "checkpoint-20").mkdir()  # incomplete: ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-12"
    save_checkpoint(tmp_path / "checkpoint", tiny_ae())
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert latest_checkpoint(tmp_path / "checkpoint-3") == tmp_path / "checkpoint-3"


def test_tokenizer_saved_and_attached(tmp_path):
    import calm.data as data
    text = "\n\n".join(f"document {i} says hello to the little checkpoint test" for i in range(40))
    (tmp_path / "in.txt").write_text(text)
    data.prepare(
        tmp_path / "in.txt", tmp_path / "data", vocab_size=300, workers=0, progress=False, log=lambda m: None
    )
    tok = data.TokenShards(tmp_path / "data", "train").tokenizer()
    model = tiny_ae(vocab_size=tok.vocab_size, mask_id=tok.mask_id, pad_id=tok.pad_id, eot_id=tok.eot_id)
    save_checkpoint(tmp_path / "ck", model, tokenizer=tok)
    loaded = calm.load(tmp_path / "ck")
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == tok.vocab_size
    assert loaded.tokenizer.encode("hello") == tok.encode("hello")
    assert load_model(save_checkpoint(tmp_path / "bare", model)).tokenizer is None


# ------------------------------------------------------------------------------ integrity (issue 16)


def _flip_byte_at_end(file):
    """Change one byte of the last tensor's data, keeping the file size."""
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))


def test_same_size_corruption_is_caught_by_the_hash_and_no_verify_skips_it(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    marker = json.loads((path / COMPLETE_FILE).read_text())
    import hashlib

    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert marker["sha256"] == {"model.safetensors": digest}  # what `sha256sum` prints
    _flip_byte_at_end(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not have the content that was saved"):
        load_model(path)
    load_model(path, verify=False)  # the user's choice: loads the (damaged) weights


def test_train_state_corruption_is_caught(tmp_path):
    path = save_checkpoint(tmp_path / "ck", tiny_ae(), train_state={"step": 3, "x": torch.arange(1000.0)})
    _flip_byte_at_end(path / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt does not have the content"):
        load_train_state(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe garbage"])
def test_complete_marker_that_is_not_json_is_corruption(tmp_path, text):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    (path / COMPLETE_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="COMPLETE is corrupted"):
        load_model(path)


def test_marker_entries_cannot_point_outside(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    marker = json.loads((path / COMPLETE_FILE).read_text())
    marker["sizes"]["../../../../etc/passwd"] = 1
    (path / COMPLETE_FILE).write_text(json.dumps(marker))
    load_model(path)  # only the files a checkpoint has are checked; foreign entries are never opened


def test_nonfinite_weights_are_an_error_naming_the_tensor(tmp_path):
    model = tiny_ae()
    with torch.no_grad():
        model.squeeze.weight[0, 0] = float("nan")
        model.to_latent.bias[1] = float("inf")
    path = save_checkpoint(tmp_path / "ae", model)
    with pytest.raises(CheckpointError, match=r"squeeze.weight, to_latent.bias hold NaN or infinite"):
        load_model(path)
    assert torch.isnan(load_model(path, verify=False).squeeze.weight[0, 0])


def test_weights_file_has_the_mode_of_the_other_files(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae(), train_state={"step": 1})
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["train_state.pt"], modes


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # The exceptions are the ones a real full tmpfs gave: safetensors' Rust error, and torch.save's
    # zip-writer check (it does not say why; the free space left decides).
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    old = tiny_ae(seed=1)
    save_checkpoint(tmp_path / "ck", old)

    def full_safetensors(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_model", full_safetensors)
        with pytest.raises(
            CheckpointError,
            match=r"cannot write checkpoint .*ck: no space left.*previous checkpoint .* is intact",
        ):
            save_checkpoint(tmp_path / "ck", tiny_ae(seed=2))

    def full_torch_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_torch_save)
        m.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
        with pytest.raises(CheckpointError, match="no space left"):
            save_checkpoint(tmp_path / "ck", tiny_ae(seed=2), train_state={"step": 1})
    assert torch.equal(load_model(tmp_path / "ck").embed.weight, old.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with monkeypatch.context() as m:  # with space left, torch's error is passed on as it is
        m.setattr(torch, "save", full_torch_save)
        with pytest.raises(RuntimeError, match="unexpected pos"):
            save_checkpoint(tmp_path / "ck", tiny_ae(seed=2), train_state={"step": 1})


def _edit_config(path, **changes):
    meta = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            del meta["config"][k]
        else:
            meta["config"][k] = v
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field,value", [("num_layers", "2"), ("vocab_size", "64"), ("kl_weight", True)])
def test_config_value_of_the_wrong_type_names_the_field(tmp_path, field, value):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    _edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match=f"field {field} must be"):
        load_model(path)


def test_config_field_removed_is_named_not_a_shape_dump(tmp_path):
    path = save_checkpoint(tmp_path / "ae", tiny_ae())
    _edit_config(path, d_model=None)
    with pytest.raises(
        CheckpointError, match=r"has no field\(s\) d_model; the default\(s\) d_model=512"
    ) as err:
        load_model(path)
    assert len(str(err.value)) < 1000 and "more" in str(err.value)
    path = save_checkpoint(tmp_path / "ok", tiny_ae())
    _edit_config(path, kl_clamp=None)  # a field that does not change shapes: loads, with a warning
    with pytest.warns(UserWarning, match=r"no field\(s\) kl_clamp"):
        load_model(path)
