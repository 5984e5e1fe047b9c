"""Generation and the command line with every head: flow and diffusion heads take the PyTorch
decode path (the fused kernel runs the energy head only), keep generate()'s row-independence
guarantees, and ``--head-steps`` / ``--head-solver`` change their sampling at use time. The
energy head generates exactly what it generated before the head interface."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from calm.checkpoint import save_checkpoint
from calm.cli import main
from calm.config import preset
from calm.generation import GenerationError, generate
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM
from calm.tokenizer import Tokenizer

PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]
SETTINGS = {"energy": {}, "flow": {"flow_steps": 2}, "diffusion": {"diffusion_steps": 4}}


def _calm(head: str) -> CALM:
    """calm-tiny + ae-tiny, every parameter from a generator seeded by its name."""
    torch.manual_seed(0)
    cfg = preset("calm-tiny").replace(head=head, **SETTINGS[head])
    model = CALM.from_autoencoder(cfg, ChunkAutoencoder(preset("ae-tiny")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # a flow / diffusion network this large gives outputs far beyond the noise's effect
            scale = 0.1 if head != "energy" and name.startswith("head.") else 0.3
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {head: _calm(head) for head in SETTINGS}


# Printed by the same model and calls on main at 68f6e8f (before the head interface); the fused
# kernel and the PyTorch path gave the same tokens there.
PREVIOUS_ENERGY_OUTPUTS = {
    "t1": [[363, 430, 21, 165, 223, 430, 21, 165, 248, 259, 96, 35], [108, 30, 30, 165, 363, 169, 21, 165, 223, 430, 354, 329]],
    "exact": [[223, 430, 21, 190, 223, 430, 86, 190, 223, 430, 24, 190], [108, 413, 412, 419, 223, 430, 21, 190, 223, 430, 86, 190]],
    "approx": [[223, 430, 21, 190, 223, 430, 86, 462, 223, 430, 86, 190], [108, 30, 30, 165, 363, 169, 21, 165, 273, 30, 21, 165]],
}  # fmt: skip
CALLS = {
    "t1": dict(temperature=1.0),
    "exact": dict(temperature=0.5, sampler="exact", num_samples=32),
    "approx": dict(temperature=0.5, sampler="approx", num_samples=32),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("fused", [False, None])
def test_energy_head_generates_what_it_did_before(models, call, fused):
    out = models["energy"].generate(
        PROMPTS, max_new_tokens=12, seed=3, eos_id=None, fused_kernel=fused, **CALLS[call]
    )
    assert out == PREVIOUS_ENERGY_OUTPUTS[call]


@pytest.mark.parametrize("head", ["flow", "diffusion"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_flow_and_diffusion_heads_generate_row_independently(models, head, call):
    model = models[head]
    out, stats = generate(
        model, PROMPTS, max_new_tokens=8, seed=3, eos_id=None, return_stats=True, **CALLS[call]
    )
    assert [len(r) for r in out] == [8, 8] and all(0 <= t < 512 for r in out for t in r)
    assert stats.fused_draws == 0  # the fused kernel runs the energy head only: PyTorch path
    assert generate(model, PROMPTS, max_new_tokens=8, seed=3, eos_id=None, **CALLS[call]) == out
    # batched == one by one (row b uses seed + b)
    assert generate(model, [PROMPTS[1]], max_new_tokens=8, seed=4, eos_id=None, **CALLS[call])[0] == out[1]
    other = generate(model, PROMPTS, max_new_tokens=8, seed=30, eos_id=None, **CALLS[call])
    assert other != out  # the head's noise reaches the samples


def test_flow_head_refuses_a_required_fused_kernel(models):
    with pytest.raises(GenerationError, match="energy head only"):
        generate(models["flow"], PROMPTS, max_new_tokens=4, seed=0, fused_kernel=True)


def test_diffusion_steps_change_the_generated_text(models):
    model = _calm("diffusion")
    before = generate(model, PROMPTS, max_new_tokens=12, seed=1, eos_id=None)
    model.set_head_sampling(steps=1, solver="ddim")
    after = generate(model, PROMPTS, max_new_tokens=12, seed=1, eos_id=None)
    assert before != after


# ---------------------------------------------------------------------------------------------
# calm generate / calm eval --head-steps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("head_cli")
    words = "the a cat dog sat on mat and ran far away home tree bird sang".split()
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(200)]
    tok = Tokenizer.train_bpe(text, vocab_size=300)
    out = {}
    for head in SETTINGS:
        model = _calm(head)
        out[head] = save_checkpoint(root / head, model, tokenizer=tok)
    data = root / "valid.txt"
    data.write_text("\n\n".join(text[:60]) + "\n")
    out["data"] = data
    return out


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    got = capsys.readouterr()
    return exc.value.code, got.out, got.err


@pytest.mark.parametrize("head, steps, solver", [("flow", 3, "euler"), ("diffusion", 2, "ddim")])
def test_generate_and_eval_take_head_steps(checkpoints, capsys, head, steps, solver):
    ckpt = str(checkpoints[head])
    code, out, _ = _cli(
        ["generate", ckpt, "-p", "the cat", "-n", "8", "--seed", "0", "--json",
         "--head-steps", str(steps), "--head-solver", solver], capsys
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["head"] == {
        "name": head,
        "evals_per_sample": steps,
        "steps": steps,
        "solver": solver,
    }
    code, out, _ = _cli(
        ["eval", ckpt, "--data", str(checkpoints["data"]), "--max-tokens", "512", "--block-size", "32",
         "--no-progress", "--json", "--head-steps", str(steps)], capsys
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["head"]["steps"] == steps and 0 <= result["brier_lm"] <= 100


@pytest.mark.parametrize(
    "head, extra, message",
    [
        ("flow", ["--head-steps", "0"], "flow_steps"),
        ("diffusion", ["--head-steps", "0"], "diffusion_steps"),
        ("flow", ["--head-solver", "rk4"], "flow_solver"),
        ("diffusion", ["--head-solver", "euler"], "diffusion_solver"),
        ("energy", ["--head-steps", "4"], "head_steps"),
    ],
)
def test_bad_head_options_are_clear_errors(checkpoints, capsys, head, extra, message):
    for command in (["generate", str(checkpoints[head]), "-p", "the cat", "-n", "4"],
                    ["eval", str(checkpoints[head]), "--data", str(checkpoints["data"]), "--no-progress"]):  # fmt: skip
        code, out, err = _cli([*command, *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err
