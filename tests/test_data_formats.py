"""`calm prepare` input formats: compressed JSONL/text, Parquet, Arrow, datasets directories.

Every format, alone and mixed in one directory, must give exactly the token shards that the
same documents give as plain JSONL; broken archives, missing columns and binary files give one
clear error naming the file, and nothing already written is lost.
"""

import gzip
import json

import numpy as np
import pytest

from calm.data import DataError, prepare, read_documents, resolve_inputs
from calm.tokenizer import Tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

# No blank lines inside (so the blank-line rule of .txt inputs finds the same documents), no
# surrounding whitespace; unicode, a literal end-of-text marker and an internal newline.
DOCS = [f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(5 + i % 9)) for i in range(40)]
DOCS[3] = "Zweites Dokument: Grüße aus Köln, naïve café 🙂"
DOCS[7] = "two lines\nin one document"
DOCS[11] = "literal <|endoftext|> inside"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(iter(DOCS), vocab_size=300)


def run(inputs, out, tok, **kw):
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("shard_bytes", 256)  # 128 uint16 tokens per shard: several shards
    return prepare(inputs, out, tokenizer=tok, workers=0, progress=False, **kw)


def outputs(out):
    """Everything token-related in a prepared directory (shards, offsets, split entries)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".npy")}
    meta = json.loads((out / "meta.json").read_text())
    return files, meta["splits"]


# ----------------------------------------------------------------------------- writers of each format
def write_jsonl(path, docs, opener=open, **extra):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "meta": {"pile_set_name": "Test", "i": i}, **extra}) + "\n")
    return path


def write_zst(path, data: bytes, frames=3):
    """Zstandard as the Pile ships it; several frames back to back, as concatenated archives are."""
    step = max(1, len(data) // frames + 1)
    cctx = zstandard.ZstdCompressor(level=3)
    path.write_bytes(b"".join(cctx.compress(data[i : i + step]) for i in range(0, len(data), step)))
    return path


def jsonl_bytes(docs):
    return "".join(json.dumps({"text": d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs)).encode()


def write_parquet(path, docs, column="text", row_group_size=7):
    pq.write_table(
        pa.table({"id": list(range(len(docs))), column: docs}), path, row_group_size=row_group_size
    )
    return path


def write_arrow_stream(path, table, chunk=5):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)
    return path


def save_to_disk_layout(path, docs, column="text", shards=2):
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it: Arrow IPC *stream* shards
    ``data-0000i-of-0000n.arrow``, ``state.json`` listing them, ``dataset_info.json``."""
    path.mkdir(parents=True)
    table = pa.table({column: docs, "label": [i % 2 for i in range(len(docs))]})
    per = -(-len(docs) // shards)
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        write_arrow_stream(path / name, table.slice(i * per, per))
        names.append({"filename": name})
    state = {
        "_data_files": names,
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {
        "citation": "",
        "description": "",
        "features": {
            column: {"dtype": "string", "_type": "Value"},
            "label": {"dtype": "int64", "_type": "Value"},
        },
        "homepage": "",
        "license": "",
    }
    (path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    # a cache file from a .map() call lies beside the data and must not be read
    write_arrow_stream(path / "cache-deadbeef.arrow", pa.table({column: ["NOT A DOCUMENT"]}))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ref")
    run([write_jsonl(root / "docs.jsonl", DOCS)], root / "out", tok)
    return outputs(root / "out")


# ----------------------------------------------------------------------------- same shards as JSONL
def test_reference_has_several_shards(reference):
    files, splits = reference
    assert len(splits["train"]["shards"]) > 2 and all(s["tokens"] <= 128 for s in splits["train"]["shards"])
    assert splits["train"]["documents"] == 32 and splits["val"]["documents"] == 8


@pytest.mark.parametrize(
    "fmt", ["jsonl.gz", "jsonl.zst", "txt.gz", "txt.zst", "parquet", "arrow", "datasets", "datasetdict"]
)
def test_each_format_gives_the_jsonl_shards(fmt, tmp_path, tok, reference):
    if fmt == "jsonl.gz":
        src = write_jsonl(tmp_path / "docs.jsonl.gz", DOCS, opener=gzip.open)
    elif fmt == "jsonl.zst":
        src = write_zst(tmp_path / "docs.jsonl.zst", jsonl_bytes(DOCS))
    elif fmt == "txt.gz":
        src = tmp_path / "docs.txt.gz"
        src.write_bytes(gzip.compress(("\n\n".join(DOCS) + "\n").encode()))
    elif fmt == "txt.zst":
        src = write_zst(tmp_path / "docs.txt.zst", ("\n\n".join(DOCS) + "\n").encode())
    elif fmt == "parquet":
        src = write_parquet(tmp_path / "docs.parquet", DOCS)
    elif fmt == "arrow":
        src = write_arrow_stream(tmp_path / "docs.arrow", pa.table({"text": DOCS}))
    elif fmt == "datasets":
        src = save_to_disk_layout(tmp_path / "ds", DOCS, shards=3)
    else:  # DatasetDict: the train split for training inputs
        src = tmp_path / "dd"
        save_to_disk_layout(src / "train", DOCS)
        save_to_disk_layout(src / "test", ["held-out text"] * 3, shards=1)
        (src / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert list(read_documents(resolve_inputs([src])[0])) == DOCS
    run([src], tmp_path / "out", tok)
    assert outputs(tmp_path / "out") == reference


def test_mixed_directory_gives_the_jsonl_shards(tmp_path, tok, reference):
    d = tmp_path / "corpus"
    d.mkdir()
    write_zst(d / "a.jsonl.zst", jsonl_bytes(DOCS[:10]))  # sorted order: a, b, c (a dataset), d, e
    write_parquet(d / "b.parquet", DOCS[10:20])
    save_to_disk_layout(d / "c", DOCS[20:30])
    (d / "d.txt.gz").write_bytes(gzip.compress("\n\n".join(DOCS[30:35]).encode()))
    write_jsonl(d / "e.jsonl", DOCS[35:])
    (d / "notes.md").write_text("not an input")
    run([d], tmp_path / "out", tok)
    assert outputs(tmp_path / "out") == reference
    sources = json.loads((tmp_path / "out" / "meta.json").read_text())["sources"]
    assert [(s["format"], s["compression"]) for s in sources] == [
        ("jsonl", "zstd"),
        ("parquet", None),
        ("hf-dataset", None),
        ("text", "gzip"),
        ("jsonl", None),
    ]


def test_datasetdict_validation_split_for_val(tmp_path, tok):
    dd = tmp_path / "dd"
    save_to_disk_layout(dd / "train", DOCS[:30])
    save_to_disk_layout(dd / "validation", DOCS[30:])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    s = run([dd], tmp_path / "out", tok, val_inputs=[dd])
    assert s["splits"]["train"]["documents"] == 30 and s["splits"]["val"]["documents"] == 10
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError, match=r"no 'validation' / 'valid' / 'val' split.*dd/SPLIT"):
        run([dd], tmp_path / "out2", tok, val_inputs=[dd])


def test_stats_count_text_bytes_and_file_bytes(tmp_path, tok):
    src = write_zst(tmp_path / "docs.jsonl.zst", jsonl_bytes(DOCS))
    run([src], tmp_path / "out", tok)
    (st,) = json.loads((tmp_path / "out" / "meta.json").read_text())["sources"]
    assert st["bytes"] == len(jsonl_bytes(DOCS)) and st["file_bytes"] == src.stat().st_size
    assert st["documents"] == len(DOCS)


# ----------------------------------------------------------------------------- bad input
def _assert_nothing_lost(tmp_path, before):
    """The data set made before the failing run is intact and no scratch directory is left."""
    assert outputs(tmp_path / "out") == before
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))


@pytest.fixture
def existing(tmp_path, tok):
    run([write_jsonl(tmp_path / "good.jsonl", DOCS)], tmp_path / "out", tok)
    return outputs(tmp_path / "out")


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_truncated_archive_names_the_file(kind, tmp_path, tok, existing):
    rng = np.random.default_rng(1)
    data = jsonl_bytes([" ".join(f"w{x}" for x in rng.integers(0, 10**6, 50)) for _ in range(2000)])
    if kind == "zst":
        blob = zstandard.ZstdCompressor().compress(data)
    else:
        blob = gzip.compress(data)
    src = tmp_path / f"cut.jsonl.{kind}"
    src.write_bytes(blob[: len(blob) * 2 // 3])
    name = "zstd" if kind == "zst" else "gzip"
    with pytest.raises(
        DataError, match=rf"cut\.jsonl\.{kind}: corrupt or truncated {name} data after line \d+"
    ):
        run([src], tmp_path / "out", tok, overwrite=True)
    _assert_nothing_lost(tmp_path, existing)
    garbage = tmp_path / "junk.jsonl.zst"
    garbage.write_bytes(b"this is not zstandard at all" * 10)
    with pytest.raises(DataError, match=r"junk\.jsonl\.zst: corrupt or truncated zstd data"):
        run([garbage], tmp_path / "out", tok, overwrite=True)
    _assert_nothing_lost(tmp_path, existing)


def test_parquet_errors_name_file_column_and_row(tmp_path, tok, existing):
    src = write_parquet(tmp_path / "body.parquet", DOCS, column="body")
    with pytest.raises(
        DataError, match=r"body\.parquet: no 'text' column \(columns: 'id', 'body'\).*--text-field"
    ):
        run([src], tmp_path / "out", tok, overwrite=True)
    _assert_nothing_lost(tmp_path, existing)
    assert list(read_documents(src, text_field="body")) == DOCS
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), nulls)
    with pytest.raises(DataError, match=r"nulls\.parquet: row 2 \(0-based\): 'text' is null"):
        list(read_documents(nulls))
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' holds int64, not strings"):
        list(read_documents(ints))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(src.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file"):
        run([cut], tmp_path / "out", tok, overwrite=True, text_field="body")
    _assert_nothing_lost(tmp_path, existing)


def test_datasets_directory_errors(tmp_path, tok, existing):
    ds = save_to_disk_layout(tmp_path / "ds", DOCS, column="content")
    with pytest.raises(
        DataError, match=r"ds/data-00000-of-00002\.arrow: no 'text' column \(columns: 'content', 'label'\)"
    ):
        run([ds], tmp_path / "out", tok, overwrite=True)
    _assert_nothing_lost(tmp_path, existing)
    assert list(read_documents(ds, text_field="content")) == DOCS
    # a shard cut in the middle of a record batch
    shard = ds / "data-00001-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        DataError, match=r"data-00001-of-00002\.arrow: corrupt or truncated Arrow data after row \d+"
    ):
        run([ds], tmp_path / "out", tok, overwrite=True, text_field="content")
    _assert_nothing_lost(tmp_path, existing)
    # state.json naming a file outside the directory
    state = json.loads((ds / "state.json").read_text())
    state["_data_files"] = [{"filename": "../good.jsonl"}]
    (ds / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        DataError, match=r"state\.json _data_files\[0\] names '\.\./good\.jsonl', which is outside"
    ):
        run([ds], tmp_path / "out", tok, overwrite=True)


def test_missing_libraries_are_named(tmp_path, monkeypatch):
    import sys

    src = write_parquet(tmp_path / "docs.parquet", DOCS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(
        DataError, match=r"docs\.parquet: reading Parquet / Arrow needs the pyarrow package.*calm\[data\]"
    ):
        list(read_documents(src))
    z = write_zst(tmp_path / "docs.jsonl.zst", jsonl_bytes(DOCS))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DataError, match=r"docs\.jsonl\.zst: reading \.zst files needs the zstandard package"):
        list(read_documents(z))


# ----------------------------------------------------------------------------- binary files (issue 16)
def test_binary_file_is_refused_unless_allowed(tmp_path, tok):
    rng = np.random.default_rng(0)
    png = tmp_path / "image.txt"  # a PNG under a text name: signature, then compressed (random-looking) bytes
    png.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes())
    with pytest.raises(
        DataError, match=r"image\.txt: looks like a binary file.*limit is 30%.*--allow-binary"
    ):
        run([png], tmp_path / "out", tok)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    elf = tmp_path / "prog.jsonl.gz"  # the check looks at the decompressed bytes
    elf.write_bytes(
        gzip.compress(
            b"\x7fELF\x02\x01\x01" + bytes(4000) + rng.integers(0, 256, 8000, dtype=np.uint8).tobytes()
        )
    )
    with pytest.raises(DataError, match=r"prog\.jsonl\.gz: looks like a binary file"):
        list(read_documents(elf))
    with pytest.warns(UserWarning, match="invalid UTF-8"):
        s = run([png], tmp_path / "out", tok, allow_binary=True, val_fraction=0.0)
    assert s["invalid_utf8_replacements"] > 10_000
    # mostly-valid text with some Latin-1 bytes stays a warning, as before
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("Voilà une phrase française où les élèves étudient. " * 200).encode("latin-1"))
    with pytest.warns(UserWarning, match="invalid UTF-8"):
        run([latin], tmp_path / "out2", tok, val_fraction=0.0)


def test_binary_threshold_is_in_the_help():
    import argparse

    from calm.data import add_prepare_arguments

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    text = parser.format_help()
    assert "--allow-binary" in text and "30%" in text and "64 KiB" in text
