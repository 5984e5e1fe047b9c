"""Sharded prepared data sets: one stream over many shards, exact batches and resume, old layouts,
files named by meta.json, a full disk, out-of-range token ids, --max-tokens."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch

from calm.data import (
    DataError,
    ShardedTokens,
    TokenShards,
    batch_for_step,
    eval_windows,
    prepare,
    window_starts,
)
from calm.tokenizer import Tokenizer

DOCS = [f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(10 + i % 30)) for i in range(120)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(iter(DOCS), vocab_size=300)


def run(out, tok, docs=DOCS, **kw):
    src = out.parent / f"{out.name}.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    kw.setdefault("val_fraction", 0.1)
    return prepare([src], out, tokenizer=tok, workers=0, progress=False, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok):
    """The same documents prepared as one shard and as many shards of 100 tokens."""
    root = tmp_path_factory.mktemp("pair")
    run(root / "one", tok)
    run(root / "many", tok, shard_bytes=200)
    return TokenShards(root / "one"), TokenShards(root / "many")


# ----------------------------------------------------------------------------- one stream
def test_shards_are_bounded_and_listed_with_counts(pair):
    one, many = pair
    assert len(one.files) == 1 and len(many.files) > 10
    meta = many.meta
    assert meta["format_version"] == 2 and meta["shard_bytes"] == 200
    shards = meta["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [f"train-{i:05d}.bin" for i in range(len(shards))]
    assert all(s["tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 100
    assert sum(s["tokens"] for s in shards) == len(many) == len(one)
    for s, f in zip(shards, many.files):
        assert f.stat().st_size == 2 * s["tokens"]
        assert s["max_id"] == int(np.fromfile(f, dtype=np.uint16).max())
    assert isinstance(many.tokens, ShardedTokens) and isinstance(one.tokens, np.memmap)


def test_many_shards_read_as_one_stream(pair):
    one, many = pair
    ref = np.asarray(one.tokens)
    assert np.array_equal(np.asarray(many.tokens), ref)
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(ref), 50).tolist() + [0, 99, 100, 101, len(ref) - 1]:
        b = a + int(rng.integers(0, 350))
        assert np.array_equal(many.read(a, b), ref[a:b])  # across one or several shard boundaries
        assert many.tokens[a] == ref[a]
    assert many.tokens[-1] == ref[-1] and np.array_equal(many.tokens[5:250:7], ref[5:250:7])
    for i in range(many.num_documents):  # documents that continue in the next shard
        assert np.array_equal(many.document(i), one.document(i))
    assert np.array_equal(many.doc_offsets, one.doc_offsets)


def test_batches_equal_the_single_shard_batches(pair):
    one, many = pair
    for step in (0, 1, 7, 40, 123):  # several epochs
        assert torch.equal(
            batch_for_step(one, step, 8, 48, seed=5), batch_for_step(many, step, 8, 48, seed=5)
        )
        a = batch_for_step(one, step, 4, 32, seed=1, random_offset=True)
        assert torch.equal(a, batch_for_step(many, step, 4, 32, seed=1, random_offset=True))
        for r in range(2):
            assert torch.equal(
                batch_for_step(one, step, 8, 48, seed=5, rank=r, world_size=2),
                batch_for_step(many, step, 8, 48, seed=5, rank=r, world_size=2),
            )
    val_one, val_many = TokenShards(one.data_dir, "val"), TokenShards(many.data_dir, "val")
    assert torch.equal(
        torch.cat(list(eval_windows(val_one, 16))), torch.cat(list(eval_windows(val_many, 16)))
    )


def test_a_rank_opens_only_the_shards_of_its_windows(pair):
    _, many = pair
    fresh = TokenShards(many.data_dir)
    opened = []
    real = fresh.tokens.shard
    fresh.tokens.shard = lambda i: (opened.append(i), real(i))[1]
    step, B, T = 3, 8, 48
    batch_for_step(fresh, step, B, T, seed=5, rank=1, world_size=4)
    starts = window_starts(fresh, step * B + np.arange(1, B, 4), T, seed=5)
    bounds = fresh.tokens.bounds
    need = {
        i for s in starts.tolist() for i in range(len(bounds) - 1) if bounds[i] < s + T and bounds[i + 1] > s
    }
    assert set(opened) == need and len(need) < len(fresh.files) / 2


def test_version_1_directory_still_loads(tmp_path, pair):
    one, _ = pair
    old = tmp_path / "v1"
    shutil.copytree(one.data_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["format_version"] = 1
    for split, info in meta["splits"].items():  # the layout calm prepare wrote before sharding
        (old / info["shards"][0]["file"]).rename(old / f"{split}.bin")
        meta["splits"][split] = {
            "file": f"{split}.bin",
            "tokens": info["tokens"],
            "documents": info["documents"],
            "doc_offsets": info["doc_offsets"],
        }
    (old / "meta.json").write_text(json.dumps(meta))
    v1 = TokenShards(old)
    assert v1.files == [old / "train.bin"] and np.array_equal(np.asarray(v1.tokens), np.asarray(one.tokens))
    assert torch.equal(batch_for_step(v1, 9, 4, 32, seed=2), batch_for_step(one, 9, 4, 32, seed=2))
    assert np.array_equal(v1.document(3), one.document(3))


def test_multi_shard_training_resumes_exactly(tmp_path, pair):
    from test_train import TinyConfig, TinyLM, cfg

    from calm.train import train

    one, many = pair

    def model(seed):
        torch.manual_seed(seed)
        return TinyLM(TinyConfig(vocab_size=one.vocab_size, dim=8))

    c = dict(batch_size=4, block_size=32, eval_every=3, eval_batches=1)
    full, single = model(0), model(0)
    train(full, cfg(steps=6, **c), many.data_dir, tmp_path / "full", quiet=True)
    train(single, cfg(steps=6, **c), one.data_dir, tmp_path / "single", quiet=True)
    train(model(0), cfg(steps=3, **c), many.data_dir, tmp_path / "part", quiet=True)
    resumed = model(99)
    train(resumed, cfg(steps=6, **c), many.data_dir, tmp_path / "part", resume=True, quiet=True)
    for (name, x), y, z in zip(
        full.state_dict().items(), resumed.state_dict().values(), single.state_dict().values()
    ):
        assert torch.equal(x, y), name
        assert torch.equal(x, z), name  # many shards train exactly as one file


# ----------------------------------------------------------------------------- --max-tokens
def test_max_tokens_stops_at_a_document_boundary(tmp_path, tok, pair):
    one, _ = pair
    s = run(tmp_path / "cut", tok, max_tokens=1000, shard_bytes=300)
    cut = TokenShards(tmp_path / "cut")
    assert s["stopped_at_max_tokens"] and 1000 <= len(cut) < 1000 + max(
        len(one.document(i)) for i in range(10)
    )
    assert np.array_equal(
        np.asarray(cut.tokens), np.asarray(one.tokens[: len(cut)])
    )  # a prefix, whole documents
    assert cut.tokens[-1] == cut.eot_id and cut.num_documents == int(np.sum(one.doc_offsets < len(cut)))
    val = TokenShards(tmp_path / "cut", "val")
    assert 0 < val.num_documents < TokenShards(one.data_dir, "val").num_documents
    # explicit validation inputs are still read in full
    v = tmp_path / "v.txt"
    v.write_text("\n\n".join(DOCS[:7]))
    s = run(tmp_path / "cut2", tok, max_tokens=500, val_inputs=[v])
    assert s["splits"]["val"]["documents"] == 7 and s["splits"]["train"]["tokens"] >= 500
    with pytest.raises(DataError, match="max_tokens must be >= 1"):
        run(tmp_path / "cut3", tok, max_tokens=0)


def test_cli_shard_size_and_max_tokens(tmp_path, tok, capsys):
    from calm.cli import main

    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS))
    tok.save(tmp_path / "tok")
    args = ["prepare", str(src), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok")]
    with pytest.raises(SystemExit) as e:
        main(
            [*args, "--shard-size", "1k", "--max-tokens", "3000", "--workers", "0", "--no-progress", "--json"]
        )
    assert e.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shard_bytes"] == 1024 and summary["splits"]["train"]["shards"] == -(
        -summary["splits"]["train"]["tokens"] // 512
    )
    with pytest.raises(SystemExit):
        main([*args[:-2], "--out", str(tmp_path / "p"), "--shard-size", "lots"])
    assert "not a size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- files named by meta.json (issue 16)
def _edit_meta(directory, fn):
    meta = json.loads((directory / "meta.json").read_text())
    fn(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "entry",
    ["shards[0].file", "v1 file", "doc_offsets"],
)
@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_meta_may_not_name_files_outside_the_directory(tmp_path, pair, entry, where):
    one, _ = pair
    d = tmp_path / "data"
    shutil.copytree(one.data_dir, d)
    info = json.loads((d / "meta.json").read_text())["splits"]["train"]
    # a real file of the right size outside: an unchecked reader would load it silently
    target = "train-00000.bin" if entry != "doc_offsets" else "train_docs.npy"
    shutil.copy(d / target, tmp_path / f"outside{target[-4:]}")
    name = str(tmp_path / f"outside{target[-4:]}") if where == "absolute" else f"../outside{target[-4:]}"

    def edit(meta):
        split = meta["splits"]["train"]
        if entry == "shards[0].file":
            split["shards"][0]["file"] = name
        elif entry == "v1 file":
            del split["shards"]
            split["file"] = name
            split["tokens"] = info["tokens"]
        else:
            split["doc_offsets"] = name

    _edit_meta(d, edit)
    label = {
        "shards[0].file": r"splits\.train\.shards\[0\]\.file",
        "v1 file": r"splits\.train\.file",
        "doc_offsets": r"splits\.train\.doc_offsets",
    }[entry]
    with pytest.raises(DataError, match=rf"meta\.json {label} names .*outside the directory"):
        shards = TokenShards(d)
        shards.document(0)


# ----------------------------------------------------------------------------- a full disk (issue 16)
@pytest.mark.parametrize("fail_at", [1, 5, "meta"])
def test_disk_full_is_one_line_and_loses_nothing(tmp_path, tok, monkeypatch, fail_at, capsys):
    import calm.data.preparation
    import calm.data.writer

    run(tmp_path / "out", tok)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []
    real = calm.data.writer.write_bytes

    def full_disk(f, data):
        calls.append(f.name)
        is_meta = str(f.name).endswith("meta.json")
        if (fail_at == "meta" and is_meta) or (fail_at != "meta" and len(calls) == fail_at):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, data)

    monkeypatch.setattr(calm.data.writer, "write_bytes", full_disk)
    monkeypatch.setattr(calm.data.preparation, "write_bytes", full_disk)
    from calm.cli import main

    src = tmp_path / "out.txt"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "prepare",
                str(src),
                "--out",
                str(tmp_path / "out"),
                "--overwrite",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on device" in err, err
    assert calls[-1].split("/")[-1] in err  # the file being written is named
    assert "nothing was written to" in err and "unchanged" in err
    # the data set made before is intact and loads; no scratch directory is left
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert len(TokenShards(tmp_path / "out")) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.txt"]


# ----------------------------------------------------------------------------- token ids out of range (issue 16)
@pytest.fixture
def poisoned(tmp_path, tok):
    run(tmp_path / "bad", tok, shard_bytes=200)
    shard = tmp_path / "bad" / "train-00003.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[17] = 65000  # > vocabulary (300)
    ids.tofile(shard)
    return tmp_path / "bad"


def test_out_of_range_ids_are_found_before_training(poisoned, tmp_path):
    from test_train import TinyConfig, TinyLM, cfg

    from calm.train import train

    with pytest.raises(
        DataError, match=r"train-00003\.bin: token id 65000 at position 17 is outside the vocabulary of 300"
    ):
        TokenShards(poisoned).check_token_ids()
    model = TinyLM(TinyConfig(vocab_size=300))
    with pytest.raises(DataError, match=r"train-00003\.bin: token id 65000 .*another tokenizer"):
        train(model, cfg(steps=3, block_size=32), poisoned, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoint").exists()
    # a model with a smaller vocabulary than the data's ids: also before training
    with pytest.raises(DataError, match=r"outside the vocabulary of 100 entries"):
        train(
            TinyLM(TinyConfig(vocab_size=100)),
            cfg(steps=3, block_size=32),
            poisoned,
            tmp_path / "run2",
            quiet=True,
        )


def test_batches_check_ids_as_they_are_read(poisoned):
    shards = TokenShards(poisoned)
    bad = 3 * 100 + 17  # position in the stream
    step = next(
        s
        for s in range(1000)
        if any(a <= bad < a + 16 for a in window_starts(shards, np.arange(s * 4, s * 4 + 4), 16, 0))
    )
    with pytest.raises(DataError, match=rf"window at token [\d,]+: token id 65000 at position {bad:,}"):
        batch_for_step(shards, step, 4, 16, seed=0)


def test_eval_uses_the_same_check(poisoned):
    from calm.evaluate import evaluate_model

    class Cfg:
        kind, vocab_size, max_seq_len = "ar", 300, 64

    class Model(torch.nn.Module):
        config = Cfg()

    with pytest.raises(
        DataError, match=r"token id 65000 at position [\d,]+ is outside the vocabulary of 300"
    ):
        evaluate_model(Model(), TokenShards(poisoned), block_size=16)
