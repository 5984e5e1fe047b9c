"""Hub repo ids resolved from a local Hugging Face cache, never the network.

The tests build the cache exactly as `huggingface_hub` lays it out:
``<cache>/models--OWNER--NAME/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}``.
"""

import hashlib
import os
import shutil
import socket

import pytest
from test_official import release  # noqa: F401 - the fixture: a tiny authors'-format CALM + autoencoder

import calm
from calm.hub import HubError, cached_sibling, hub_cache_dir, parse_repo_id, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache, repo_id, src_dir, commit=COMMIT):
    """Put the files of ``src_dir`` into ``cache`` as ``huggingface-cli download repo_id`` would."""
    owner, name = repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src_dir.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / f.relative_to(src_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch, no_network):
    c = tmp_path / "hf" / "hub"
    c.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return c


def test_repo_id_spelling():
    assert parse_repo_id("cccczshao/CALM-M") == ("cccczshao/CALM-M", None)
    assert parse_repo_id(f"cccczshao/CALM-M@{COMMIT}") == ("cccczshao/CALM-M", COMMIT)
    for path in ("./x/y", "/abs/dir", "a/b/c", "runs/../x", "checkpoint", "a/.b", ""):
        assert parse_repo_id(path) is None, path


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"


def test_resolves_a_cached_snapshot_offline(cache, tmp_path, monkeypatch):
    src = tmp_path / "files"
    src.mkdir()
    (src / "config.json").write_text("{}")
    snap = add_to_cache(cache, "owner/model", src)
    assert resolve_model_path("owner/model") == snap
    assert resolve_model_path(f"owner/model@{COMMIT}") == snap
    assert (resolve_model_path("owner/model") / "config.json").read_text() == "{}"
    # HF_HOME instead of HF_HUB_CACHE
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert resolve_model_path("owner/model") == snap
    # a local directory spelled like a repo id wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "model").mkdir(parents=True)
    assert resolve_model_path("owner/model").resolve() == tmp_path / "owner" / "model"


def test_missing_repo_says_what_to_download(cache):
    with pytest.raises(
        HubError,
        match=r"cccczshao/CALM-M not found: no such directory, and it is not in the local Hugging Face cache "
        r"\(.*hf/hub\); to use the Hub repo, download it first with `huggingface-cli download cccczshao/CALM-M`",
    ):
        resolve_model_path("cccczshao/CALM-M")
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        calm.load("cccczshao/CALM-M")
    with pytest.raises(HubError, match=r"at revision 'deadbeef'"):
        resolve_model_path("cccczshao/CALM-M@deadbeef")


def test_cli_eval_with_a_missing_repo_is_one_line(cache, capsys):
    from calm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "cccczshao/CALM-L", "--data", str(cache)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huggingface-cli download cccczshao/CALM-L" in err


def test_release_by_repo_id_finds_its_autoencoder_in_the_cache(cache, release):  # noqa: F811
    calm_snap = add_to_cache(cache, "cccczshao/CALM-M", release["calm_dir"])
    ae_snap = add_to_cache(cache, "cccczshao/CALM-Autoencoder", release["ae_dir"], commit="f" * 40)
    assert cached_sibling(calm_snap, "CALM-Autoencoder") == ae_snap
    assert cached_sibling(release["calm_dir"], "CALM-Autoencoder") is None  # not inside a Hub cache
    model = calm.load("cccczshao/CALM-M")
    assert model.config.kind == "calm"
    assert model.official_load_report.autoencoder_source == str(ae_snap)
    # and named explicitly, as --ae does
    from calm.checkpoint import load_model

    model2 = load_model("cccczshao/CALM-M", ae_path="cccczshao/CALM-Autoencoder")
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert a.equal(b), k


def test_our_checkpoint_by_repo_id(cache, tmp_path):
    import torch

    from calm.checkpoint import save_checkpoint
    from calm.config import ARConfig
    from calm.models.ar import TokenTransformer

    torch.manual_seed(0)
    model = TokenTransformer(
        ARConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_seq_len=32)
    )
    save_checkpoint(tmp_path / "ck", model)
    shutil.rmtree(tmp_path / "ck" / "checkpoint", ignore_errors=True)
    add_to_cache(cache, "someone/tiny-ar", tmp_path / "ck")
    loaded = calm.load("someone/tiny-ar")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.equal(b), k


def test_a_missing_run_dir_with_an_old_copy_is_not_taken_for_a_repo_id(cache, tmp_path, monkeypatch):
    import torch

    from calm.checkpoint import save_checkpoint
    from calm.config import ARConfig
    from calm.models.ar import TokenTransformer

    monkeypatch.chdir(tmp_path)
    model = TokenTransformer(
        ARConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_seq_len=32)
    )
    save_checkpoint(tmp_path / "runs" / "ck", model)
    (tmp_path / "runs" / "ck").rename(
        tmp_path / "runs" / ".ck.old-123-abc"
    )  # a save interrupted between renames
    with pytest.warns(UserWarning, match="complete previous version"):
        loaded = calm.load("runs/ck")  # spelled like a repo id, but its .old copy is here
    assert torch.equal(
        loaded.state_dict()["embed.weight"]
        if "embed.weight" in loaded.state_dict()
        else next(iter(loaded.state_dict().values())),
        next(iter(model.state_dict().values())),
    )
    with pytest.raises(FileNotFoundError, match=r"runs/nothing not found: no such directory"):
        calm.load("runs/nothing")
