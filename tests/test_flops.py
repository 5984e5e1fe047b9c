import importlib.util
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from calm.cli import main as cli_main
from calm.config import ConfigError, preset
from calm.flops import (
    attention_flops,
    autoencoder_counts,
    count_parameters,
    flops_report,
    predicted_speed_ratio,
)
from calm.models.ar import TokenTransformer
from calm.models.autoencoder import ChunkAutoencoder

HAVE_CALM = importlib.util.find_spec("calm.models.calm") is not None
needs_calm = pytest.mark.skipif(not HAVE_CALM, reason="calm.models.calm not written yet")

# Paper Table 1 (DESIGN §2.5): params, train FLOPs (total), inference FLOPs per token.
PAPER = {
    "transformer-s": (281e6, 6.6e20, 4.4e8),
    "transformer-m": (465e6, 11.9e20, 7.9e8),
    "transformer-l": (849e6, 22.5e20, 15.0e8),
    "calm-m": (371e6, 3.7e20, 2.9e8),
    "calm-l": (735e6, 7.7e20, 4.6e8),
    "calm-xl": (1.82e9, 19.5e20, 9.4e8),
}


def _measured_flops(fn) -> int:
    # The math SDPA backend decomposes attention into matmuls that the counter sees on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- the paper's figures ------------------------------------------------------------------------


def test_required_paper_figures():
    calm_m, tf_s = flops_report(preset("calm-m")), flops_report(preset("transformer-s"))
    assert calm_m["params"]["total"] == pytest.approx(371.7e6, rel=0.01)
    assert tf_s["params"]["total"] == pytest.approx(282e6, rel=0.01)
    assert calm_m["inference_flops_per_token"] == pytest.approx(2.9e8, rel=0.10)
    assert tf_s["inference_flops_per_token"] == pytest.approx(4.4e8, rel=0.10)
    assert calm_m["params"]["autoencoder"] == pytest.approx(75e6, rel=0.02)  # excluded from the total


@pytest.mark.parametrize("name", list(PAPER))
def test_all_paper_rows(name):
    params, train_total, inference = PAPER[name]
    report = flops_report(preset(name))
    assert report["params"]["total"] == pytest.approx(params, rel=0.01)
    assert report["inference_flops_per_token"] == pytest.approx(inference, rel=0.05)
    # Training FLOPs: the paper gives totals over its token budget, the same for all rows, so
    # compare ratios against Transformer-S.
    ref = flops_report(preset("transformer-s"))["train_flops_per_token"]
    ours = report["train_flops_per_token"] / ref
    assert ours == pytest.approx(train_total / PAPER["transformer-s"][1], rel=0.10)


def test_speed_ratio_matches_paper():
    ratio = predicted_speed_ratio(preset("calm-m"), preset("transformer-s"), mode="inference")
    assert ratio == pytest.approx(4.4 / 2.9, rel=0.05)
    train_ratio = predicted_speed_ratio(preset("calm-m"), preset("transformer-s"), mode="train")
    assert train_ratio == pytest.approx(6.6 / 3.7, rel=0.10)  # ours: 1.90 (head shares its h-only terms)
    # at the same text window (2048 tokens = 512 chunks) CALM's attention is cheaper still
    same_text = predicted_speed_ratio(
        preset("calm-m"), preset("transformer-s"), mode="inference", context_tokens=2048
    )
    assert same_text > ratio
    with pytest.raises(ValueError):
        predicted_speed_ratio(preset("calm-m"), preset("transformer-s"), mode="sideways")


# -- analytic counts against instantiated models -----------------------------------------------


@pytest.mark.parametrize(
    "name, changes",
    [
        ("transformer-tiny", {}),
        ("transformer-tiny", {"tie_embeddings": True}),
        ("transformer-tiny", {"num_kv_heads": 1}),
        ("transformer-cpu", {}),
    ],
)
def test_ar_params_equal_numel(name, changes):
    cfg = preset(name).replace(**changes)
    model = TokenTransformer(cfg)
    p = flops_report(cfg)["params"]
    assert p["total"] == count_parameters(model)
    assert p["embeddings"] == model.embed.weight.numel()
    assert p["backbone"] == count_parameters(model.backbone)
    assert p["lm_head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())


@pytest.mark.parametrize("name", ["transformer-s", "transformer-m", "transformer-l"])
def test_ar_paper_size_params_equal_numel_on_meta(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = TokenTransformer(cfg)
    assert flops_report(cfg)["params"]["total"] == count_parameters(model)


@pytest.mark.parametrize("name", ["ae-tiny", "ae-cpu"])
def test_autoencoder_params_equal_numel(name):
    cfg = preset(name)
    model = ChunkAutoencoder(cfg)
    counts = autoencoder_counts(cfg)
    assert counts["total"] == count_parameters(model)
    encoder = [model.encoder_pre, model.squeeze, model.encoder_post, model.encoder_norm, model.to_latent]
    assert counts["encoder"] == sum(count_parameters(m) for m in encoder)
    # one token position of the decoder, from the latent (the vocabulary projection left out)
    to_first = [model.from_latent, *model.decoder_pre, *model.decoder_post]
    linears = [m for part in to_first for m in part.modules() if isinstance(m, torch.nn.Linear)]
    expand_slice = model.expand.weight.numel() // cfg.chunk_size
    assert counts["decoder_first_token_matmul"] == sum(m.weight.numel() for m in linears) + expand_slice
    assert flops_report(cfg)["params"]["total"] == count_parameters(model)


def test_autoencoder_paper_size_on_meta():
    cfg = preset("ae-paper")
    with torch.device("meta"):
        model = ChunkAutoencoder(cfg)
    assert autoencoder_counts(cfg)["total"] == count_parameters(model)


# -- analytic FLOPs against FlopCounterMode on real passes --------------------------------------


@pytest.mark.parametrize("changes", [{}, {"num_kv_heads": 1, "tie_embeddings": True}])
def test_ar_flops_equal_measured(changes):
    cfg = preset("transformer-tiny").replace(max_seq_len=64, **changes)
    model = TokenTransformer(cfg)
    T = cfg.max_seq_len  # the default context
    report = flops_report(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, T + 1))
    inference = _measured_flops(lambda: model.logits(tokens[:, :T]))
    assert inference / T == report["inference_flops_per_token"]
    train = _measured_flops(lambda: model.loss(tokens)[0].backward())
    assert train / T == report["train_flops_per_token"]


def test_autoencoder_flops_equal_measured():
    cfg = preset("ae-tiny")
    model = ChunkAutoencoder(cfg).eval()
    chunks = torch.randint(0, cfg.vocab_size, (3, cfg.chunk_size))
    report = flops_report(cfg)
    measured = _measured_flops(lambda: model.decode_logits(model.encode(chunks)[0]))
    assert measured / (3 * cfg.chunk_size) == report["inference_flops_per_token"]


def test_attention_term_and_context():
    cfg = preset("transformer-s")
    with_attn = flops_report(cfg)
    without = flops_report(cfg, include_attention=False)
    diff = with_attn["inference_flops_per_token"] - without["inference_flops_per_token"]
    assert diff == attention_flops(cfg, 2048) == 4 * 2048 * 768 * 12
    short = flops_report(cfg, context=1024)
    assert with_attn["inference_flops_per_token"] - short["inference_flops_per_token"] == diff / 2
    calm = flops_report(preset("calm-m"), context=512)
    assert calm["context_tokens"] == 2048
    assert calm["flops_per_token"]["inference"]["attention"] == attention_flops(preset("calm-m"), 512) / 4


def test_calm_autoencoder_choice():
    paper = flops_report(preset("calm-m"))
    assert "ae-paper" in paper["autoencoder"]["source"]  # what CALM(config) builds, = the paper's AE
    tiny = flops_report(preset("calm-tiny"))
    assert tiny["autoencoder"]["config"]["d_model"] == 512  # default sizes, as CALM(config) builds
    ae = preset("ae-tiny").replace(d_model=32, ffn_dim=64)
    given = flops_report(preset("calm-tiny").replace(autoencoder=ae.to_dict()))
    assert given["params"]["autoencoder"] == autoencoder_counts(ae)["total"]
    assert given["params"]["total"] == tiny["params"]["total"]
    with pytest.raises(ConfigError, match="latent_dim"):
        flops_report(preset("calm-tiny"), autoencoder_config=preset("ae-cpu").replace(vocab_size=512))


def test_more_inference_samples_cost_more_head_and_decoder():
    one = flops_report(preset("calm-m"))["flops_per_token"]["inference"]
    many = flops_report(preset("calm-m"), inference_samples=10)["flops_per_token"]["inference"]
    assert many["ae_decoder"] == pytest.approx(10 * one["ae_decoder"])
    assert 8 * one["energy_head"] < many["energy_head"] < 10 * one["energy_head"]  # h-only terms shared
    assert many["backbone"] == one["backbone"]


# -- CALM (runs once calm.models.calm exists) ---------------------------------------------------


def _calm_model(cfg):
    from calm.models.calm import CALM

    return CALM(cfg)


@needs_calm
@pytest.mark.parametrize("name", ["calm-tiny", "calm-cpu"])
def test_calm_params_equal_numel(name):
    cfg = preset(name)
    model = _calm_model(cfg)
    p = flops_report(cfg)["params"]
    assert p["embeddings"] == model.embed.weight.numel()
    assert p["input_compression"] == count_parameters(model.compress)
    assert p["backbone"] == count_parameters(model.backbone)
    assert p["energy_head"] == count_parameters(model.head)
    own = sum(count_parameters(m) for m in (model.embed, model.compress, model.backbone, model.head))
    assert p["total"] == own


@needs_calm
def test_calm_with_its_autoencoder_equals_numel():
    cfg = preset("calm-tiny").replace(autoencoder=preset("ae-tiny").to_dict())
    model = _calm_model(cfg)
    p = flops_report(cfg)["params"]
    assert p["autoencoder"] == count_parameters(model.autoencoder)
    assert p["total_with_autoencoder"] == count_parameters(model)


@needs_calm
def test_calm_flops_equal_measured():
    torch.manual_seed(0)
    cfg = preset("calm-tiny").replace(autoencoder=preset("ae-tiny").to_dict(), num_target_samples=8)
    model = _calm_model(cfg)
    K, C = cfg.chunk_size, 9
    tokens = torch.randint(0, cfg.vocab_size, (1, C * K))
    # training: C - 1 steps (the last chunk is only a target), attending over C - 1 positions
    train = _measured_flops(lambda: model.loss(tokens)[0].backward())
    assert train / (C - 1) == flops_report(cfg, context=C - 1)["train_flops_per_token"] * K
    # inference: backbone over C chunks, one head sample per chunk, decoded by the AE
    model.eval()
    with torch.no_grad():
        infer = _measured_flops(lambda: model.sample_chunks(model.hidden(tokens), 1))
    assert infer / C == flops_report(cfg, context=C)["inference_flops_per_token"] * K


@needs_calm
def test_calm_paper_size_on_meta():
    cfg = preset("calm-m")
    with torch.device("meta"):
        model = _calm_model(cfg)
    own = sum(count_parameters(m) for m in (model.embed, model.compress, model.backbone, model.head))
    assert flops_report(cfg)["params"]["total"] == own == pytest.approx(371.7e6, rel=0.01)


# -- command line -------------------------------------------------------------------------------


def _cli_json(capsys, *argv) -> dict:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["flops", *argv, "--json"])
    assert exit_.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json(capsys):
    out = _cli_json(capsys, "--preset", "calm-m")
    assert out["kind"] == "calm" and out["name"] == "calm-m"
    assert out["params"]["total"] == pytest.approx(371.7e6, rel=0.01)
    assert out["inference_flops_per_token"] == pytest.approx(2.9e8, rel=0.1)
    out = _cli_json(capsys, "transformer-s", "--set", "num_layers=6", "--context", "1024")
    assert out["config"]["num_layers"] == 6 and out["context"] == 1024
    listing = _cli_json(capsys, "--list")
    assert listing["transformer-s"]["kind"] == "ar" and "calm-m" in listing


def test_cli_table_and_checkpoint_dir(capsys, tmp_path):
    cfg = preset("transformer-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"kind": cfg.kind, "config": cfg.to_dict()}))
    out = _cli_json(capsys, str(tmp_path))
    assert out["params"]["total"] == count_parameters(TokenTransformer(cfg))
    calm_dir = tmp_path / "calm"
    calm_dir.mkdir()
    calm_cfg = preset("calm-tiny").replace(autoencoder=preset("ae-tiny").to_dict())
    (calm_dir / "config.json").write_text(json.dumps({"kind": "calm", "config": calm_cfg.to_dict()}))
    out = _cli_json(capsys, str(calm_dir))
    assert out["autoencoder"]["source"] == "the CALM config"
    assert out["params"]["autoencoder"] == autoencoder_counts(preset("ae-tiny"))["total"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(["flops", "--preset", "calm-m"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "energy head" in text and "AE decoder" in text and "371.73M" in text


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["flops", "--preset", "no-such-model"])
    assert exit_.value.code == 2
    assert "preset" in capsys.readouterr().err


def test_command_line_names_stay_importable_from_calm_flops():
    # The command moved to calm.flops_cli; code that imported its names from calm.flops keeps working.
    import calm.flops
    import calm.flops_cli

    moved = ("load_target", "add_flops_arguments", "run_flops", "format_report")
    for name in (*moved, "_fmt_params", "_LABELS", "_list_presets"):
        assert getattr(calm.flops, name) is getattr(calm.flops_cli, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        calm.flops.no_such_name  # noqa: B018


# -- flow and diffusion heads ---------------------------------------------------------------------

_HEADS = [
    ("flow", {"flow_steps": 3}),
    ("flow", {"flow_steps": 2, "flow_solver": "euler"}),
    ("diffusion", {"diffusion_steps": 4}),
    ("diffusion", {"diffusion_steps": 3, "diffusion_solver": "ddim"}),
]


def test_adaln_frequency_size_matches_the_model():
    from calm.flops import ADALN_FREQ_DIM
    from calm.models.adaln_mlp import FREQ_DIM

    assert ADALN_FREQ_DIM == FREQ_DIM


@pytest.mark.parametrize("head, settings", _HEADS)
def test_flow_and_diffusion_heads_params_and_flops_equal_measured(head, settings):
    torch.manual_seed(0)
    cfg = preset("calm-tiny").replace(autoencoder=preset("ae-tiny").to_dict(), head=head, **settings)
    model = _calm_model(cfg)
    rep = flops_report(cfg)
    assert rep["params"][f"{head}_head"] == count_parameters(model.head)
    assert rep["params"]["total_with_autoencoder"] == count_parameters(model)
    assert rep["head"]["evals_per_sample"] == model.head.evals_per_sample
    K, C = cfg.chunk_size, 9
    tokens = torch.randint(0, cfg.vocab_size, (1, C * K))
    train = _measured_flops(lambda: model.loss(tokens)[0].backward())
    assert train / (C - 1) == flops_report(cfg, context=C - 1)["train_flops_per_token"] * K
    model.eval()
    # inference on one position (the report counts the time MLP per position; a call computes it
    # once for all its positions), with several samples sharing the per-time terms
    with torch.no_grad():
        h = model.hidden(tokens)[:, -1:]
        for samples in (1, 5):
            infer = _measured_flops(lambda s=samples: model.sample_chunks(h, s))
            rep = flops_report(cfg, context=C, inference_samples=samples)["flops_per_token"]["inference"]
            assert infer == (rep[f"{head}_head"] + rep["ae_decoder"]) * K


def test_more_head_steps_cost_proportionally_more():
    base = preset("calm-cpu").replace(head="flow", flow_steps=1)
    one = flops_report(base)["flops_per_token"]["inference"]["flow_head"]
    ten = flops_report(base.replace(flow_steps=10))["flops_per_token"]["inference"]["flow_head"]
    cond = 2 * 256 * 256 / 4  # cond_embed, once per position, per text token
    assert ten - cond == pytest.approx(10 * (one - cond))
    energy = flops_report(preset("calm-cpu"))["flops_per_token"]["inference"]["energy_head"]
    assert ten > 15 * energy  # 20 evaluations of a network about as large as the energy head
