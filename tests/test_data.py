"""`calm prepare` and the token shards: documents, bad input, round trip, batches."""

import argparse
import json
import warnings

import numpy as np
import pytest
import torch

from calm.data import (
    DataError,
    DataWarning,
    TokenShards,
    add_prepare_arguments,
    batch_for_step,
    eval_windows,
    is_val_document,
    looks_like_wikitext,
    prepare,
    read_documents,
    run_prepare,
    token_dtype,
    window_starts,
    windows_per_epoch,
)
from calm.tokenizer import Tokenizer

DOCS = [
    "First document.\nIt has two lines.",
    "Zweites Dokument: Grüße aus Köln, naïve café.",
    "第三の文書 with emoji 🙂 and <|endoftext|> written literally.",
    "Fourth one, short.",
    "  Fifth: leading spaces kept\n\tand a tab.",
    "Sixth document. " * 20,
    "Seventh — the last one.",
]


def write_blank_separated(path, docs):
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def run(inputs, out, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("progress", False)
    kw.setdefault("workers", 0)
    return prepare(inputs, out, **kw)


def decode_split(out, split):
    shards = TokenShards(out, split)
    tok = shards.tokenizer()
    return tok.decode(np.asarray(shards.tokens), skip_special=False), shards, tok


# ----------------------------------------------------------------------------- round trip
def test_round_trip_with_eot_separators(tmp_path):
    src = write_blank_separated(tmp_path / "docs.txt", DOCS)
    summary = run([src], tmp_path / "out", val_fraction=0.3)
    val_idx = [i for i in range(len(DOCS)) if is_val_document(i, 0.3)]
    assert val_idx == [3, 6]
    train_docs = [d for i, d in enumerate(DOCS) if i not in val_idx]
    val_docs = [DOCS[i] for i in val_idx]
    text, shards, tok = decode_split(tmp_path / "out", "train")
    assert text == "".join(d + "<|endoftext|>" for d in train_docs)
    assert shards.num_documents == len(train_docs) == summary["splits"]["train"]["documents"]
    assert len(shards) == summary["splits"]["train"]["tokens"]
    assert shards.tokens[-1] == tok.eot_id
    # the literal "<|endoftext|>" inside a document is text, not a separator
    assert int((np.asarray(shards.tokens) == tok.eot_id).sum()) == len(train_docs)
    for i, d in enumerate(train_docs):
        doc = shards.document(i)
        assert doc[-1] == tok.eot_id and tok.decode(doc[:-1], skip_special=False) == d
    text, shards, _ = decode_split(tmp_path / "out", "val")
    assert text == "".join(d + "<|endoftext|>" for d in val_docs)

    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0 and meta["mask_id"] == 2
    assert meta["splits"]["train"]["documents"] == 5 and meta["splits"]["val"]["documents"] == 2
    assert meta["sources"][0]["path"] == str(src) and meta["sources"][0]["doc_split"] == "blank"
    assert meta["bytes_read"] == src.stat().st_size
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "tokenizer_meta.json").is_file()
    assert np.load(tmp_path / "out" / "train_docs.npy")[0] == 0
    assert not list(tmp_path.glob("out.tmp-*"))


def test_workers_processes_give_identical_output(tmp_path):
    src = write_blank_separated(tmp_path / "docs.txt", DOCS * 5)
    tok = Tokenizer.train_bpe(iter(DOCS), vocab_size=300)
    run([src], tmp_path / "a", tokenizer=tok, workers=0, batch_chars=100)
    run([src], tmp_path / "b", tokenizer=tok, workers=2, batch_chars=100)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}-00000.bin").read_bytes() == (
            tmp_path / "b" / f"{split}-00000.bin"
        ).read_bytes()


def test_last_document_becomes_validation_when_fraction_picks_none(tmp_path):
    src = write_blank_separated(tmp_path / "docs.txt", DOCS[:3])
    s = run([src], tmp_path / "out", val_fraction=0.01)
    assert s["splits"]["train"]["documents"] == 2 and s["splits"]["val"]["documents"] == 1
    assert decode_split(tmp_path / "out", "val")[0] == DOCS[2] + "<|endoftext|>"


def test_explicit_val_files(tmp_path):
    tr = write_blank_separated(tmp_path / "train.txt", DOCS[:5])
    va = write_blank_separated(tmp_path / "valid.txt", DOCS[5:])
    s = run([tr], tmp_path / "out", val_inputs=[va])
    assert s["splits"]["train"]["documents"] == 5 and s["splits"]["val"]["documents"] == 2
    assert decode_split(tmp_path / "out", "val")[0] == "".join(d + "<|endoftext|>" for d in DOCS[5:])
    with pytest.raises(DataError, match="both as training and validation"):
        run([tr], tmp_path / "out2", val_inputs=[tr])


def test_pretrained_tokenizer_dir_and_dtype_choice(tmp_path):
    from test_tokenizer import llama_style_tokenizer_json

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    src = write_blank_separated(tmp_path / "docs.txt", DOCS)
    # small Llama-style vocabulary -> uint16
    llama_style_tokenizer_json(tmp_path / "small.json")
    s = run([src], tmp_path / "o16", tokenizer=tmp_path / "small.json")
    assert s["dtype"] == "uint16" and not s["tokenizer_trained"]
    # Llama-3-sized ids (> 65,535) -> uint32; eot is <|end_of_text|>
    v = llama_style_tokenizer_json(tmp_path / "big.json", bpe_size=70000)
    s = run([src], tmp_path / "o32", tokenizer=tmp_path / "big.json", val_fraction=0.3)
    assert s["dtype"] == "uint32" and s["eot_id"] == v + 1 and s["vocab_size"] == v + 6
    text, shards, tok = decode_split(tmp_path / "o32", "train")
    assert shards.tokens.dtype == np.uint32
    assert text.count("<|end_of_text|>") == shards.num_documents
    # a prepared data set's directory works as --tokenizer too
    s = run([src], tmp_path / "again", tokenizer=tmp_path / "o32")
    assert s["eot_id"] == v + 1 and s["pad_id"] == tok.pad_id


# ----------------------------------------------------------------------------- inputs
def test_jsonl_input_and_text_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    rows = [{"text": d, "id": i} for i, d in enumerate(DOCS)] + [{"text": "   "}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    docs = list(read_documents(f))
    assert docs == DOCS  # verbatim, newlines inside texts kept
    g = tmp_path / "other.jsonl"
    g.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:3]), encoding="utf-8")
    assert list(read_documents(g, text_field="body")) == DOCS[:3]
    s = run([f], tmp_path / "out", val_fraction=0.0)
    assert s["splits"]["train"]["documents"] == len(DOCS) and s["skipped"]["empty_documents"] == 1
    assert decode_split(tmp_path / "out", "train")[0] == "".join(d + "<|endoftext|>" for d in DOCS)


def test_directory_input_recursive_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "b.txt").write_text("doc b", encoding="utf-8")
    (d / "a.txt").write_text("doc a1\n\ndoc a2", encoding="utf-8")
    (d / "sub" / "c.jsonl").write_text('{"text": "doc c"}\n', encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    (d / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    s = run([d], tmp_path / "out", val_fraction=0.0)
    assert s["files"] == 3
    assert (
        decode_split(tmp_path / "out", "train")[0]
        == "doc a1<|endoftext|>doc a2<|endoftext|>doc b<|endoftext|>doc c<|endoftext|>"
    )
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no .txt, .jsonl or .json files"):
        run([tmp_path / "emptydir"], tmp_path / "o2")


def test_doc_split_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffPara one\r\nline two\r\n\r\n \r\nPara two\r\n".encode())
    assert list(read_documents(f, doc_split="blank")) == ["Para one\nline two", "Para two"]
    assert list(read_documents(f, doc_split="file")) == ["Para one\nline two\n\n \nPara two"]
    with pytest.raises(DataError, match="doc_split"):
        list(read_documents(f, doc_split="lines"))


WIKI = (
    " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More alpha . \n"
    " = Played , W = \n Legend line inside alpha . \n \n"
    " = Beta = \n \n Beta text . \n \n"
)


def test_wikitext_rule_synthetic(tmp_path):
    f = tmp_path / "wiki.txt"
    f.write_text(WIKI, encoding="utf-8")
    assert looks_like_wikitext(f)
    docs = list(read_documents(f))  # auto -> wikitext
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = \n") and "= = Section = =" in docs[0] and "Played , W" in docs[0]
    assert docs[1] == " = Beta = \n \n Beta text . "
    # the blank-line rule would cut the same file into paragraphs
    assert len(list(read_documents(f, doc_split="blank"))) > 2


def test_wikitext_valid_has_60_articles(shared_data, tmp_path):
    valid = shared_data / "wikitext2" / "valid.txt"
    assert looks_like_wikitext(valid)
    docs = list(read_documents(valid))
    assert len(docs) == 60
    assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)
    # a slice: the first 400 lines, through prepare (auto mode), with the tokens round-tripping
    lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    piece = tmp_path / "valid_head.txt"
    piece.write_text("".join(lines), encoding="utf-8")
    expected = list(read_documents(piece))
    assert 1 < len(expected) < 60
    s = run([piece], tmp_path / "out", val_fraction=0.0, vocab_size=400)
    assert s["splits"]["train"]["documents"] == len(expected)
    assert decode_split(tmp_path / "out", "train")[0] == "".join(d + "<|endoftext|>" for d in expected)


def test_non_wikitext_corpora_use_blank_lines(shared_data, tmp_path):
    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(True)[:60]
    f = tmp_path / "shakespeare.txt"
    f.write_text("".join(lines), encoding="utf-8")
    assert not looks_like_wikitext(f)
    docs = list(read_documents(f))
    assert docs[0].startswith("First Citizen:\n") and len(docs) == sum(1 for x in lines if not x.strip()) + 1


# ----------------------------------------------------------------------------- bad input
def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="input not found: .*nope.txt"):
        run([tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="not found"):
        run(
            [write_blank_separated(tmp_path / "a.txt", DOCS)],
            tmp_path / "out",
            val_inputs=[tmp_path / "v.txt"],
        )
    with pytest.raises(DataError, match="not found"):
        run([write_blank_separated(tmp_path / "a.txt", DOCS)], tmp_path / "out", tokenizer=tmp_path / "tok")


def test_invalid_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        run([f], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_missing_text_field_and_wrong_type(tmp_path):
    f = tmp_path / "nofield.jsonl"
    f.write_text('{"text": "a"}\n\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"nofield\.jsonl:3: no 'text' field \(keys: 'content'\)"):
        list(read_documents(f))
    g = tmp_path / "notstr.jsonl"
    g.write_text('{"text": "a"}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"notstr\.jsonl:2: field 'text' is a int, not a string"):
        run([g], tmp_path / "out")
    h = tmp_path / "array.json"
    h.write_text('[{"text": "a"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"array\.json:1: .*JSON arrays are not supported"):
        list(read_documents(h))
    h.write_text('[\n  {"text": "a"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"array\.json:1: JSON arrays are not supported"):
        list(read_documents(h))
    k = tmp_path / "list.jsonl"
    k.write_text('["a"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        list(read_documents(k))


@pytest.mark.filterwarnings("ignore::calm.data.DataWarning")  # the empty-file warnings, tested below
def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    files = [tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "empty.jsonl"]
    with pytest.raises(DataError, match="empty corpus"):
        run(files, tmp_path / "out")
    tok = Tokenizer.train_bpe(iter(DOCS), vocab_size=300)
    with pytest.raises(DataError, match="empty corpus"):
        run(files, tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises(DataError, match="empty validation corpus"):
        run(
            [write_blank_separated(tmp_path / "a.txt", DOCS)],
            tmp_path / "out",
            val_inputs=files[:1],
            tokenizer=tok,
        )


def test_empty_file_is_skipped_with_warning(tmp_path):
    src = write_blank_separated(tmp_path / "a.txt", DOCS)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.warns(DataWarning, match="empty.txt: empty; skipped"):
        s = run([src, tmp_path / "empty.txt"], tmp_path / "out")
    assert s["skipped"]["empty_files"] == 1
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [x["empty"] for x in meta["sources"]] == [False, True]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    # \xe9 (Latin-1 e-acute) and \xff\xfe are invalid UTF-8: 3 replacements; a genuine U+FFFD is not counted
    f.write_bytes(b"caf\xe9 au lait\n\nsecond \xff\xfe doc \xef\xbf\xbd kept\n\nthird doc\n")
    with pytest.warns(DataWarning, match=r"latin1\.txt: 3 invalid UTF-8"):
        s = run([f], tmp_path / "out", val_fraction=0.0)
    assert s["invalid_utf8_replacements"] == 3
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"][0]["invalid_utf8_replacements"] == 3
    text = decode_split(tmp_path / "out", "train")[0]
    assert (
        text
        == "caf\ufffd au lait<|endoftext|>second \ufffd\ufffd doc \ufffd kept<|endoftext|>third doc<|endoftext|>"
    )
    # JSONL lines are decoded the same way
    g = tmp_path / "bad.jsonl"
    g.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.warns(DataWarning, match="1 invalid UTF-8"):
        s = run([g], tmp_path / "out2")
    assert s["invalid_utf8_replacements"] == 1


def test_output_exists_and_overwrite(tmp_path):
    src = write_blank_separated(tmp_path / "a.txt", DOCS)
    run([src], tmp_path / "out")
    with pytest.raises(DataError, match="already exists"):
        run([src], tmp_path / "out")
    s = run([src], tmp_path / "out", overwrite=True, val_fraction=0.0)
    assert s["splits"]["val"]["documents"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_token_shards_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TokenShards(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a prepared data set"):
        TokenShards(tmp_path / "plain")
    src = write_blank_separated(tmp_path / "a.txt", DOCS)
    run([src], tmp_path / "out")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(tmp_path / "out", "test")
    with open(tmp_path / "out" / "train-00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="damaged"):
        TokenShards(tmp_path / "out", "train")


# ----------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    docs = [f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(60)]
    src = write_blank_separated(tmp / "docs.txt", docs)
    run([src], tmp / "out", val_fraction=0.1)
    return TokenShards(tmp / "out", "train")


def test_batch_for_step_is_a_pure_function_of_seed_and_step(shards):
    a = batch_for_step(shards, 5, 8, 16, seed=1)
    assert a.dtype == torch.long and a.shape == (8, 16)
    fresh = TokenShards(shards.data_dir, "train")  # a resumed run: new object, empty cache
    assert torch.equal(a, batch_for_step(fresh, 5, 8, 16, seed=1))
    assert torch.equal(a, batch_for_step(shards, 5, 8, 16, seed=1))
    assert not torch.equal(a, batch_for_step(shards, 6, 8, 16, seed=1))
    assert not torch.equal(a, batch_for_step(shards, 5, 8, 16, seed=2))
    tokens = torch.from_numpy(np.asarray(shards.tokens).astype(np.int64))
    for row in a:  # every row is an aligned window of the data
        starts = [s for s in range(0, len(tokens) - 15, 16) if torch.equal(tokens[s : s + 16], row)]
        assert starts


def test_each_epoch_visits_every_window_once(shards):
    T, B = 16, 4
    n = windows_per_epoch(len(shards), T)
    epoch0 = window_starts(shards, np.arange(n), T, seed=3)
    epoch1 = window_starts(shards, np.arange(n, 2 * n), T, seed=3)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(0, n * T, T))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    tokens = torch.from_numpy(np.asarray(shards.tokens).astype(np.int64))
    for step in (0, n // B, n // B + 1):  # includes a batch straddling the epoch boundary
        batch = batch_for_step(shards, step, B, T, seed=3)
        starts = window_starts(shards, np.arange(step * B, (step + 1) * B), T, seed=3)
        assert torch.equal(batch, torch.stack([tokens[s : s + T] for s in starts.tolist()]))


def test_ranks_partition_the_global_batch(shards):
    for step in (0, 7, 123):  # 123 crosses several epochs
        full = batch_for_step(shards, step, 12, 16, seed=0)
        for world in (2, 3, 4):
            parts = [
                batch_for_step(shards, step, 12, 16, seed=0, rank=r, world_size=world) for r in range(world)
            ]
            assert all(p.shape == (12 // world, 16) for p in parts)
            merged = torch.empty_like(full)
            for r, p in enumerate(parts):
                merged[r::world] = p
            assert torch.equal(merged, full)
    with pytest.raises(ValueError, match="divisible"):
        batch_for_step(shards, 0, 10, 16, seed=0, rank=0, world_size=3)


def test_random_offset_is_seeded_and_stays_in_range(shards):
    T = 16
    n = windows_per_epoch(len(shards), T, random_offset=True)
    assert n == windows_per_epoch(len(shards), T) - 1 or (len(shards) + 1) % T == 0
    a = [batch_for_step(shards, s, 4, T, seed=9, random_offset=True) for s in range(3 * n // 4)]
    b = [batch_for_step(shards, s, 4, T, seed=9, random_offset=True) for s in range(3 * n // 4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.shape == (4, T) for x in a)
    for epoch in range(3):
        starts = window_starts(shards, np.arange(epoch * n, (epoch + 1) * n), T, seed=9, random_offset=True)
        assert len(set((starts % T).tolist())) == 1  # one offset per epoch
        assert starts.min() >= 0 and starts.max() + T <= len(shards)


def test_token_shards_pickle_by_path(shards):
    import pickle

    blob = pickle.dumps(shards)
    assert len(blob) < 1000  # not a copy of the tokens
    again = pickle.loads(blob)
    assert len(again) == len(shards) and np.array_equal(np.asarray(again.tokens), np.asarray(shards.tokens))
    assert torch.equal(batch_for_step(again, 3, 4, 16, seed=0), batch_for_step(shards, 3, 4, 16, seed=0))


def test_too_short_for_a_window(shards):
    with pytest.raises(DataError, match="fewer than one window"):
        batch_for_step(shards, 0, 2, len(shards) + 1, seed=0)


def test_eval_windows(shards):
    T = 32
    wins = list(eval_windows(shards, T))
    n = len(shards) // T
    assert len(wins) == n and all(w.shape == (T,) and w.dtype == torch.long for w in wins)
    assert torch.equal(torch.cat(wins), torch.from_numpy(np.asarray(shards.tokens[: n * T]).astype(np.int64)))
    assert len(list(eval_windows(shards, T, max_tokens=3 * T + 5))) == 3
    batches = list(eval_windows(shards, T, batch_size=4))
    assert torch.equal(torch.cat(batches), torch.stack(wins)) and batches[0].shape == (4, T)


# ----------------------------------------------------------------------------- command line
def test_cli_json_summary(tmp_path, capsys):
    src = write_blank_separated(tmp_path / "a.txt", DOCS)
    (tmp_path / "empty.txt").write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    for action in parser._actions:
        assert action.help, action.dest
    args = parser.parse_args(
        [str(src), str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out"), "--vocab-size", "300"]
        + ["--workers", "0", "--val-fraction", "0.3", "--json", "--no-progress"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_prepare(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["splits"]["train"]["documents"] == 5 and summary["splits"]["val"]["documents"] == 2
    assert summary["warnings"] and "empty.txt" in summary["warnings"][0]
    assert "warning:" in captured.err and "empty.txt" in captured.err
    args = parser.parse_args([str(src), "--out", str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "out")])
    assert run_prepare(args) == 0
    assert "train" in capsys.readouterr().out
