"""`calm generate`: JSON output, streaming text, prompt files, clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from calm.checkpoint import save_checkpoint
from calm.cli import main
from calm.config import preset
from calm.generate import TextStream
from calm.models import build_model
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM
from calm.tokenizer import Tokenizer

WORDS = "the a cat dog sat on mat and ran far away home tree bird sang loud soft".split()


def _text(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_cli")
    tok = Tokenizer.train_bpe(_text(300), vocab_size=400)
    assert tok.vocab_size <= 512
    torch.manual_seed(0)
    calm = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(calm.head.final_layer.linears[-1].weight, std=0.5)
    ar = build_model(preset("transformer-tiny"))
    return {
        "calm": save_checkpoint(root / "calm", calm, tokenizer=tok),
        "ar": save_checkpoint(root / "ar", ar, tokenizer=tok),
        "ae": save_checkpoint(root / "ae", ChunkAutoencoder(preset("ae-tiny")), tokenizer=tok),
        "tok": tok,
    }


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", *argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_json_output_parses(kind, checkpoints, capsys):
    args = [
        str(checkpoints[kind]),
        "-p",
        "the cat sat",
        "-p",
        "a dog",
        "--max-new-tokens",
        "9",
        "--seed",
        "1",
    ]
    args += ["--temperature", "0.5", "--num-samples", "16", "--json", "--ignore-eos"]
    code, out, _ = _run(args, capsys)
    assert code == 0
    result = json.loads(out)  # one JSON object, nothing else on stdout
    assert result["kind"] == kind and result["prompts"] == ["the cat sat", "a dog"]
    assert result["new_tokens"] == [9, 9] and len(result["completions"]) == 2
    assert result["tokens_per_s"] > 0 and result["time_s"] > 0
    assert result["prompt_tokens"] == [len(checkpoints["tok"].encode(p)) for p in result["prompts"]]
    # reproducible, and the completions are the decoded generate() output
    code, out2, _ = _run(args, capsys)
    assert json.loads(out2)["completions"] == result["completions"]


def test_exact_sampler_and_bf16_decoding_options(checkpoints, capsys):
    base = [str(checkpoints["calm"]), "-p", "the cat", "-n", "8", "--seed", "0", "--json", "--ignore-eos"]
    for extra in (
        ["--sampler", "exact", "-t", "0.5", "--max-draws", "64"],
        ["-t", "0.5", "--dtype", "bfloat16"],
    ):
        code, out, _ = _run([*base, *extra], capsys)
        assert code == 0 and json.loads(out)["new_tokens"] == [8]


def test_single_prompt_streams_prompt_then_completion(checkpoints, capsys):
    ckpt = str(checkpoints["calm"])
    common = [ckpt, "-p", "the bird", "-n", "12", "--seed", "3", "--ignore-eos"]
    code, streamed, err = _run(common, capsys)
    assert code == 0 and "tokens/s" in err
    _, out, _ = _run([*common, "--json"], capsys)
    completion = json.loads(out)["completions"][0]
    assert streamed == "the bird" + completion + "\n"


def test_prompt_file_and_multiple_prompts(checkpoints, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("the cat\n\na dog ran\n")
    code, out, _ = _run([str(checkpoints["ar"]), "--prompt-file", str(f), "-n", "5", "--seed", "0"], capsys)
    assert code == 0
    assert "=== [0] ===\nthe cat" in out and "=== [1] ===\na dog ran" in out
    code, out, _ = _run([str(checkpoints["ar"]), "--prompt-file", str(f), "-n", "5", "--json"], capsys)
    assert json.loads(out)["prompts"] == ["the cat", "a dog ran"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-p", "the cat", "--temperature", "1.5"], "logits"),
        (["-p", "the cat", "--temperature", "0"], "temperature must be > 0"),
        (["-p", ""], "prompt 0 is empty"),
        ([], "no prompt given"),
        (["-p", "the cat", "--max-new-tokens", "0"], "max_new_tokens"),
        (["-p", "the " * 400], "longer than the model's context"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "prompt file not found"),
        (["--prompt-file", "/"], "--prompt-file / is a directory"),
        (["-p", "the cat", "-t", "0.5", "--max-draws", "0"], "max_draws must be an integer >= 1"),
        (["-p", "the cat", "-t", "0.5", "--num-samples", "0"], "num_samples must be an integer >= 1"),
    ],
)
def test_errors_are_clear(checkpoints, capsys, extra, message):
    code, out, err = _run([str(checkpoints["calm"]), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert out == ""  # rejected before the prompt is echoed


def test_unknown_sampler_is_rejected_by_the_parser(checkpoints, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(checkpoints["calm"]), "-p", "x", "--sampler", "greedy"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_autoencoder_checkpoint_is_refused(checkpoints, capsys):
    code, _, err = _run([str(checkpoints["ae"]), "-p", "the cat"], capsys)
    assert code == 2 and "autoencoder" in err


def test_text_stream_holds_back_split_characters(checkpoints):
    tok = checkpoints["tok"]
    ids = tok.encode("héllo wörld")
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
