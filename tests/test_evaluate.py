"""`calm eval` and `calm.evaluate`: data formats, results, errors, and the training hook."""

from __future__ import annotations

import json
import math

import pytest
import torch

from calm.checkpoint import save_checkpoint
from calm.config import ARConfig, AutoencoderConfig, CALMConfig, TrainConfig
from calm.evaluate import brier_eval_fn, evaluate_model, load_eval_tokens, make_windows
from calm.tokenizer import Tokenizer

WORDS = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire and "
    "birds sing in the tall green trees of the quiet old garden behind the house"
).split()


def _docs(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(20, 60, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx) + ".")
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(iter(_docs(200)), vocab_size=300)


def _ar(tok, seed=0) -> torch.nn.Module:
    from calm.models.ar import TokenTransformer

    torch.manual_seed(seed)
    cfg = ARConfig(
        vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2, ffn_dim=64, max_seq_len=64
    )
    return TokenTransformer(cfg).eval()


def _ae_config(tok, K=4) -> AutoencoderConfig:
    return AutoencoderConfig(
        vocab_size=tok.vocab_size,
        chunk_size=K,
        latent_dim=8,
        d_model=32,
        ffn_dim=64,
        eot_id=tok.eot_id,
        pad_id=tok.pad_id,
        mask_id=tok.mask_id,
    )


def _calm(tok, K=4, seed=0) -> torch.nn.Module:
    from calm.models.calm import CALM

    torch.manual_seed(seed)
    ae = _ae_config(tok, K)
    cfg = CALMConfig(
        vocab_size=tok.vocab_size,
        chunk_size=K,
        latent_dim=8,
        d_model=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        max_seq_len=16,
        noise_dim=8,
        autoencoder=ae.to_dict(),
    )
    model = CALM(cfg).eval()
    with torch.no_grad():  # the head's last layer starts at zero; make samples differ
        for p in model.head.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ckpt")
    from calm.models.autoencoder import ChunkAutoencoder

    torch.manual_seed(0)
    return {
        "ar": save_checkpoint(root / "ar", _ar(tok), tokenizer=tok),
        "calm": save_checkpoint(root / "calm", _calm(tok), tokenizer=tok),
        "ae": save_checkpoint(root / "ae", ChunkAutoencoder(_ae_config(tok)), tokenizer=tok),
        "ar_no_tok": save_checkpoint(root / "ar_no_tok", _ar(tok)),
    }


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("data")
    docs = _docs(40, seed=1)
    text = root / "plain.txt"
    text.write_text("\n\n".join(docs) + "\n")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    wiki = root / "wiki.txt"  # the WikiText layout: " = Title = " articles, lines start with a space
    wiki.write_text(
        "".join(
            f" \n = Article {i} = \n \n {d} \n \n = = Section = = \n \n {d} \n" for i, d in enumerate(docs)
        )
    )
    from calm.data import prepare

    prepared = root / "prepared"
    prepare([text], prepared, tokenizer=tok, val_fraction=0.5, progress=False, log=lambda m: None)
    empty = root / "empty.txt"
    empty.write_text("\n\n")
    return {"text": text, "jsonl": jsonl, "wiki": wiki, "prepared": prepared, "empty": empty, "docs": docs}


def _cli(capsys, *argv):
    from calm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ------------------------------------------------------------------------- evaluate_model
def test_evaluate_model_same_block_and_context_for_both_kinds(tok):
    tokens = torch.randint(0, tok.vocab_size, (32 * 12,), generator=torch.Generator().manual_seed(0))
    ar, calm = _ar(tok), _calm(tok)
    r_ar = evaluate_model(ar, tokens, block_size=32, seed=1)
    r_calm = evaluate_model(calm, tokens, block_size=32, seed=1)
    for r in (r_ar, r_calm):
        assert r["block_size"] == 32 and r["windows"] == 12 and r["tokens"] == 32 * 12
        assert r["context_tokens"]["max"] == 32 - 4
        for n in range(1, 5):
            assert math.isfinite(r[f"brier_{n}"]) and r[f"brier_{n}_se"] >= 0
        assert r["brier_lm"] >= 0 and r["tokens_per_s"] > 0
    assert r_ar["positions"] == 12 * (32 - 4)  # every position t = 1..28
    assert r_calm["positions"] == 12 * 7  # t = 4, 8, ..., 28
    assert r_ar["context_tokens"]["min"] == 1 and r_calm["context_tokens"]["min"] == 4
    assert abs(r_ar["context_tokens"]["mean"] - r_calm["context_tokens"]["mean"]) <= 4 / 2
    # With ar_stride = K the baseline is scored at exactly CALM's positions.
    r_strided = evaluate_model(ar, tokens, block_size=32, seed=1, ar_stride=4)
    assert r_strided["positions"] == r_calm["positions"]
    assert r_strided["context_tokens"] == r_calm["context_tokens"]
    # The baseline's cross-entropy is its own loss on the same windows.
    windows = make_windows(tokens, 32)
    with torch.no_grad():
        ce = float(ar.loss(windows)[0])
    assert r_ar["ce"] == pytest.approx(ce, rel=1e-5)
    assert r_ar["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert "ce" not in r_calm


def test_evaluate_model_seed_batch_and_windows(tok):
    tokens = torch.randint(0, tok.vocab_size, (32 * 6 + 7,), generator=torch.Generator().manual_seed(2))
    ar = _ar(tok)
    a = evaluate_model(ar, tokens, block_size=32, seed=3, batch_size=2)
    b = evaluate_model(ar, tokens, block_size=32, seed=3, batch_size=2)
    c = evaluate_model(ar, tokens, block_size=32, seed=4, batch_size=2)
    assert a["brier_4"] == b["brier_4"]
    assert a["brier_1"] == pytest.approx(c["brier_1"])  # exact term: no sampling
    windows = make_windows(tokens, 32)
    d = evaluate_model(ar, windows, seed=3, max_tokens=32 * 4)
    assert d["block_size"] == 32 and d["windows"] == 4
    lo, hi = a["brier_lm_ci"]
    assert lo <= a["brier_lm"] <= hi or a["brier_lm"] == 0


def test_evaluate_model_default_block_follows_the_model_context(tok):
    """A flat stream without block_size is cut into min(256, the model's context) windows, as
    `calm eval` does (a 64-token model used to fail with the 256-token default)."""
    tokens = torch.randint(0, tok.vocab_size, (64 * 3,), generator=torch.Generator().manual_seed(5))
    ar = _ar(tok)  # max_seq_len 64
    result = evaluate_model(ar, tokens, seed=0)
    assert result["block_size"] == 64 and result["windows"] == 3
    calm_model = _calm(tok).eval()
    context = calm_model.config.max_seq_len * calm_model.config.chunk_size
    result = evaluate_model(calm_model, torch.cat([tokens] * 4), seed=0)
    assert result["block_size"] == min(256, context)


def test_evaluate_model_rejects_bad_input(tok):
    ar, calm = _ar(tok), _calm(tok)
    tokens = torch.randint(0, tok.vocab_size, (500,))
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        evaluate_model(ar, tokens, block_size=128)
    with pytest.raises(ValueError, match=r"context of 64 tokens \(16 chunks of 4\)"):
        evaluate_model(calm, tokens, block_size=128)
    with pytest.raises(ValueError, match="no complete window"):
        evaluate_model(ar, tokens[:20], block_size=32)
    with pytest.raises(ValueError, match="too small"):
        evaluate_model(calm, tokens, block_size=7)
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate_model(ar, tokens + 1000, block_size=32)


# ------------------------------------------------------------------------- data
@pytest.mark.parametrize("fmt", ["text", "jsonl", "wiki"])
def test_text_formats_are_tokenized_with_eot_between_documents(tok, data_files, fmt):
    tokens, desc = load_eval_tokens([data_files[fmt]], tok)
    docs = data_files["docs"]
    expected_docs = len(docs) if fmt != "wiki" else len(docs)  # one article per " = Title = "
    assert desc["documents"] == expected_docs
    assert int((tokens == tok.eot_id).sum()) == expected_docs
    if fmt != "wiki":
        first = tok.encode(docs[0])
        assert tokens[: len(first)].tolist() == first and int(tokens[len(first)]) == tok.eot_id
    capped, _ = load_eval_tokens([data_files[fmt]], tok, max_tokens=50)
    assert len(capped) == 50 and torch.equal(capped, tokens[:50])


def test_evaluate_model_reads_token_shards(tok, data_files):
    from calm.data import TokenShards

    shards = TokenShards(data_files["prepared"], "val")  # a uint16 memory map
    ar = _ar(tok)
    r = evaluate_model(ar, shards, block_size=32, max_tokens=96, seed=0)
    assert r["windows"] == 3
    r2 = evaluate_model(ar, torch.from_numpy(shards.tokens[:96].astype("int64")), block_size=32, seed=0)
    assert r["brier_lm"] == r2["brier_lm"] and r["ce"] == r2["ce"]


def test_prepared_directory_uses_its_split(tok, data_files):
    from calm.data import TokenShards

    val, desc = load_eval_tokens([data_files["prepared"]], tok, split="val")
    train, _ = load_eval_tokens([data_files["prepared"]], tok, split="train")
    assert desc["format"] == "prepared" and desc["same_tokenizer"] is True
    assert torch.equal(
        val, torch.from_numpy(TokenShards(data_files["prepared"], "val").tokens.astype("int64"))
    )
    assert len(train) > 0 and not torch.equal(train[: len(val)], val)


# ------------------------------------------------------------------------- command line
@pytest.mark.parametrize("fmt", ["text", "jsonl", "wiki", "prepared"])
def test_cli_json_ar(capsys, checkpoints, data_files, fmt):
    code, out, err = _cli(
        capsys,
        checkpoints["ar"],
        "--data",
        data_files[fmt],
        "--block-size",
        "32",
        "--json",
        "--seed",
        "5",
        "--threads",
        "1",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "ar" and result["block_size"] == 32
    for key in ("brier_1", "brier_4_se", "brier_lm", "brier_lm_ci", "ce", "ppl", "positions", "tokens"):
        assert key in result
    assert result["tokens"] == result["windows"] * 32
    assert result["data"]["format"] == ("prepared" if fmt == "prepared" else "text")


def test_cli_calm_human_readable_and_json(capsys, checkpoints, data_files):
    code, out, err = _cli(capsys, checkpoints["calm"], "--data", data_files["jsonl"], "--block-size", "32")
    assert code == 0, err
    assert "block size   32 tokens" in out and "BrierLM" in out and "chunk-aligned" in out
    code, out, _ = _cli(
        capsys,
        checkpoints["calm"],
        "--data",
        data_files["jsonl"],
        "--block-size",
        "32",
        "--json",
        "--max-tokens",
        "96",
    )
    result = json.loads(out)
    assert result["kind"] == "calm" and result["chunk_size"] == 4 and result["windows"] == 3
    assert result["positions"] == 3 * 7


def test_cli_autoencoder_reconstruction(capsys, checkpoints, data_files):
    code, out, err = _cli(
        capsys, checkpoints["ae"], "--data", data_files["text"], "--json", "--max-tokens", "400"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "autoencoder" and result["tokens"] == 400
    assert {"mu", "posterior", "noise_0.1", "noise_0.5"} <= set(result["settings"])
    code, out, _ = _cli(capsys, checkpoints["ae"], "--data", data_files["text"], "--max-tokens", "400")
    assert "chunk exact match" in out


def test_cli_errors(capsys, checkpoints, data_files, tmp_path):
    code, _, err = _cli(capsys, tmp_path / "nope", "--data", data_files["text"])
    assert code == 2 and "nope does not exist" in err  # load_model's message, as in calm generate
    code, _, err = _cli(capsys, checkpoints["ar"], "--data", tmp_path / "missing.txt")
    assert code == 2 and "not found" in err and "missing.txt" in err
    code, _, err = _cli(capsys, checkpoints["ar"], "--data", data_files["text"], "--block-size", "1000")
    assert code == 2 and "exceeds the model's context of 64 tokens" in err
    code, _, err = _cli(capsys, checkpoints["ar"], "--data", data_files["empty"], "--block-size", "32")
    assert code == 2 and "no tokens" in err
    code, _, err = _cli(
        capsys, checkpoints["ar"], "--data", data_files["text"], "--block-size", "32", "--max-tokens", "10"
    )
    assert code == 2 and "no complete window" in err
    code, _, err = _cli(capsys, checkpoints["ar_no_tok"], "--data", data_files["text"], "--block-size", "32")
    assert code == 2 and "no tokenizer" in err


# ------------------------------------------------------------------------- training hook
def test_brier_eval_fn_logs_brier_lm_during_training(tmp_path, tok, data_files):
    from calm.data import TokenShards, eval_windows
    from calm.train import read_metrics, train

    val = TokenShards(data_files["prepared"], "val")
    windows = torch.cat(list(eval_windows(val, 32, batch_size=64)))[:4]
    eval_fn = brier_eval_fn(windows, seed=0)
    cfg = TrainConfig(
        steps=4,
        batch_size=2,
        block_size=32,
        eval_every=2,
        eval_batches=1,
        save_every=0,
        log_every=2,
        warmup_steps=1,
    )
    train(
        _ar(tok),
        cfg,
        data_files["prepared"],
        tmp_path / "run",
        tokenizer=tok,
        eval_fn=eval_fn,
        device="cpu",
        quiet=True,
    )
    records = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "val"]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert "val_loss" in r and 0 <= r["brier_lm"] <= 100 and r["brier_block_size"] == 32
        assert r["brier_positions"] == 4 * 28 and "brier_1_se" in r and "brier_ce" in r
    # The hook is deterministic for fixed weights (same seed each call).
    model = _ar(tok)
    assert eval_fn(model, 0) == eval_fn(model, 1)


# ------------------------------------------------------------------------- one loading rule (issue 16)
def test_cli_follows_the_old_copy_an_interrupted_save_leaves(capsys, checkpoints, data_files, tmp_path):
    import shutil

    crashed = tmp_path / "ar"  # a crash between a save's two renames leaves only .ar.old-<pid>-<hex>
    shutil.copytree(checkpoints["ar"], tmp_path / ".ar.old-12345-abcd")
    args = ["--data", data_files["text"], "--block-size", "32", "--max-tokens", "64", "--json"]
    with pytest.warns(UserWarning, match="a save was interrupted"):
        code, out, err = _cli(capsys, crashed, *args)
    assert code == 0, err
    assert json.loads(out)["kind"] == "ar"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_batch_size_must_be_positive(capsys, checkpoints, data_files, value):
    code, _, err = _cli(capsys, checkpoints["ar"], "--data", data_files["text"], "--batch-size", value)
    assert code == 2 and f"--batch-size must be >= 1, got {value}" in err


def test_cli_verifies_weights_unless_no_verify(capsys, checkpoints, data_files, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints["ar"], damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # same size, other content
    (damaged / "model.safetensors").write_bytes(bytes(data))
    args = ["--data", data_files["text"], "--block-size", "32", "--max-tokens", "64", "--json"]
    code, _, err = _cli(capsys, damaged, *args)
    assert code == 2 and "does not have the content that was saved" in err
    code, out, err = _cli(capsys, damaged, *args, "--no-verify")
    assert code == 0, err


def test_cli_block_size_defaults_to_the_models_context(capsys, checkpoints, data_files):
    """A model with a context shorter than 256 tokens is scored at its context, and says so."""
    for name in ("calm", "ar"):
        from calm.checkpoint import load_model
        from calm.evaluate import DEFAULT_BLOCK_SIZE, model_context_tokens

        context = model_context_tokens(load_model(checkpoints[name]))
        assert context < DEFAULT_BLOCK_SIZE  # the case the default must handle
        code, out, err = _cli(
            capsys, checkpoints[name], "--data", data_files["text"], "--json", "--max-tokens", "256"
        )
        assert code == 0, err
        assert json.loads(out)["block_size"] == context
        assert f"block size {context} tokens" in err
