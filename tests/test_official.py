"""Loading and converting the authors' released checkpoints (calm.official).

Every checkpoint here is written in exactly the authors' Hugging Face layout (their key names,
config fields and file names; random weights, tiny sizes), then loaded and converted. The
converted model's outputs are compared with a forward pass written here from the raw official
tensors with plain torch ops (HF Llama attention: rotate-half RoPE, causal; the authors'
autoencoder and MLPGenerator), independent of the library's modules and key maps.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

import calm
from calm.cli import main as cli_main
from calm.models.autoencoder import ChunkAutoencoder
from calm.official import (
    OfficialFormatError,
    autoencoder_key_map,
    calm_key_map,
    convert_official,
    load_official,
    load_official_tokenizer,
)

# ------------------------------------------------------------------------------------------
# A small Llama-3-style tokenizer.json (byte-level BPE behind the Llama-3 regex split, special
# tokens after the BPE vocabulary, and the authors' [PAD] right after them).

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]
TEXT = "Grüße aus Köln, it's 2025! 日本語 🙂\n\nThe quick brown fox jumps over the lazy dog."


def write_tokenizer_json(path, *, with_pad: bool = True) -> int:
    """Write a Llama-3-like tokenizer.json; returns the BPE size V (<|end_of_text|> = V + 1)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([TEXT] * 10, trainer)
    d = json.loads(hf.to_str())
    v = len(d["model"]["vocab"])
    names = SPECIALS + (["[PAD]"] if with_pad else [])
    d["added_tokens"] = [
        {
            "id": v + i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in enumerate(names)
    ]
    d["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    d["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [v], "tokens": ["<|begin_of_text|>"]}
        },
    }
    path.write_text(json.dumps(d))
    return v


# ------------------------------------------------------------------------------------------
# Checkpoints in the authors' layout

AE_DIMS = dict(d=24, ffn=40, latent=8, K=4, layers=2)
CALM_DIMS = dict(d=32, ffn=48, layers=2, heads=4, kv=2, head_layers=2, noise=8, max_pos=16)


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def _norm_w(n):
    return 1.0 + 0.1 * torch.randn(n)


def official_ae_state(vocab: int) -> dict[str, torch.Tensor]:
    d, ffn, lat, K, L = (AE_DIMS[k] for k in ("d", "ffn", "latent", "K", "layers"))
    t = {"encoder.embed_tokens.weight": _rand(vocab, d, scale=1.0)}
    for i in range(L):
        p = f"encoder.encoder_layers.{i}."
        t[p + "mlp.gate_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.up_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.down_proj.weight"] = _rand(d, ffn)
        t[p + "layernorm.weight"] = _norm_w(d)
    t["encoder.hidden_to_latent.weight"] = _rand(2 * lat, d)
    t["encoder.hidden_to_latent.bias"] = _rand(2 * lat)
    t["encoder.squeeze_layer.weight"] = _rand(d, K * d)
    t["encoder.squeeze_layer.bias"] = _rand(d)
    t["encoder.norm.weight"] = _norm_w(d)
    t["decoder.lm_head_weight"] = t["encoder.embed_tokens.weight"]  # the same Parameter in their model
    t["decoder.latent_to_hidden.weight"] = _rand(d, lat)
    t["decoder.latent_to_hidden.bias"] = _rand(d)
    for i in range(L):
        p = f"decoder.decoder_layers.{i}."
        t[p + "mlp.gate_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.up_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.down_proj.weight"] = _rand(d, ffn)
        t[p + "layernorm.weight"] = _norm_w(d)
    t["decoder.expand_layer.weight"] = _rand(K * d, d)
    t["decoder.expand_layer.bias"] = _rand(K * d)
    t["decoder.norm.weight"] = _norm_w(d)
    return t


def official_ae_config(v: int, vocab: int) -> dict:
    return {
        "architectures": ["Autoencoder"],
        "model_type": "llama",
        "hidden_size": AE_DIMS["d"],
        "intermediate_size": AE_DIMS["ffn"],
        "num_encoder_layers": AE_DIMS["layers"],
        "num_decoder_layers": AE_DIMS["layers"],
        "patch_size": AE_DIMS["K"],
        "latent_size": AE_DIMS["latent"],
        "ae_dropout": 0.15,
        "kl_clamp": 0.5,
        "kl_weight": 0.001,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "bos_token_id": v,
        "eos_token_id": v + 1,
        "pad_token_id": v + len(SPECIALS),
        "torch_dtype": "float32",
    }


def official_calm_state(vocab: int, *, head_copies=("mlp_generator.", "generative_head.")) -> dict:
    d, ffn, L, H, KV, J, nz = (
        CALM_DIMS[k] for k in ("d", "ffn", "layers", "heads", "kv", "head_layers", "noise")
    )
    K, lat, hd = AE_DIMS["K"], AE_DIMS["latent"], CALM_DIMS["d"] // CALM_DIMS["heads"]
    t = {"transformer.embed_tokens.weight": _rand(vocab, d, scale=1.0)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = _rand(H * hd, d)
        t[p + "self_attn.k_proj.weight"] = _rand(KV * hd, d)
        t[p + "self_attn.v_proj.weight"] = _rand(KV * hd, d)
        t[p + "self_attn.o_proj.weight"] = _rand(d, H * hd)
        t[p + "mlp.gate_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.up_proj.weight"] = _rand(ffn, d)
        t[p + "mlp.down_proj.weight"] = _rand(d, ffn)
        t[p + "input_layernorm.weight"] = _norm_w(d)
        t[p + "post_attention_layernorm.weight"] = _norm_w(d)
    t["transformer.norm.weight"] = _norm_w(d)
    head = {
        "noise_embd.weight": _rand(d, nz, scale=1.0),
        "noise_embd.bias": _rand(d),
        "hidden_embd.weight": _rand(d, d),
        "hidden_embd.bias": _rand(d),
        "norm_hidden.weight": _norm_w(d),
        "norm_hidden.bias": _rand(d),
        "norm_noise.weight": _norm_w(d),
        "norm_noise.bias": _rand(d),
    }
    for j in range(J):
        p = f"mlp_blocks.{j}."
        head[p + "in_ln.weight"], head[p + "in_ln.bias"] = _norm_w(d), _rand(d)
        head[p + "linears.0.weight"], head[p + "linears.0.bias"] = _rand(d, 2 * d), _rand(d)
        head[p + "linears.2.weight"], head[p + "linears.2.bias"] = _rand(d, d), _rand(d)
        head[p + "linears.4.weight"], head[p + "linears.4.bias"] = _rand(2 * d, d), _rand(2 * d)
        head[p + "down_proj.weight"], head[p + "down_proj.bias"] = _rand(d, d), _rand(d)
    head["final_layer.in_ln.weight"], head["final_layer.in_ln.bias"] = _norm_w(d), _rand(d)
    head["final_layer.linears.0.weight"], head["final_layer.linears.0.bias"] = _rand(d, d), _rand(d)
    head["final_layer.linears.2.weight"], head["final_layer.linears.2.bias"] = _rand(lat, d), _rand(lat)
    for prefix in head_copies:  # one module registered under both names: the same tensors
        t.update({prefix + k: v for k, v in head.items()})
    t["embed_proj.0.weight"], t["embed_proj.0.bias"] = _rand(2 * d, K * d, scale=0.1), _rand(2 * d)
    t["embed_proj.2.weight"], t["embed_proj.2.bias"] = _rand(d, 2 * d), _rand(d)
    t["embed_proj.3.weight"], t["embed_proj.3.bias"] = _norm_w(d), _rand(d)
    return t


def official_calm_config(v: int, vocab: int) -> dict:
    return {
        "architectures": ["EnergyTransformer"],
        "ae_path": "/mnt/authors/checkpoints/CALM-Autoencoder",
        "hidden_size": CALM_DIMS["d"],
        "intermediate_size": CALM_DIMS["ffn"],
        "num_hidden_layers": CALM_DIMS["layers"],
        "num_attention_heads": CALM_DIMS["heads"],
        "num_key_value_heads": CALM_DIMS["kv"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": CALM_DIMS["max_pos"],
        "vocab_size": vocab,
        "bos_token_id": v,
        "eos_token_id": v + 1,
        "pad_token_id": v + len(SPECIALS),
        "patch_size": AE_DIMS["K"],
        "latent_size": AE_DIMS["latent"],
        "num_mlp_layers": CALM_DIMS["head_layers"],
        "noise_size": CALM_DIMS["noise"],
        "num_samples": 8,
        "beta": 1.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def write_bin(directory, config: dict, state: dict, *, shards: int = 1) -> None:
    """config.json + pytorch_model.bin, or HF-style shards + pytorch_model.bin.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(directory, config: dict, state: dict, *, shards: int = 1) -> None:
    """config.json + model.safetensors (or shards + index) as HF writes it: no shared tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


# ------------------------------------------------------------------------------------------
# The independent reference: the authors' forward passes from the raw tensors.


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def llama_mlp(x, t, p):
    gate = F.linear(x, t[p + "gate_proj.weight"])
    return F.linear(F.silu(gate) * F.linear(x, t[p + "up_proj.weight"]), t[p + "down_proj.weight"])


def ref_ae_encode(t, ids, prefix=""):
    """Authors' Encoder.forward: ids [N, K] -> latent states [N, 2l] (μ then log σ)."""
    N, K = ids.shape
    L = AE_DIMS["layers"]
    h = t[prefix + "encoder.embed_tokens.weight"][ids]
    for stage in range(2):
        for j in range(L // 2):
            p = f"{prefix}encoder.encoder_layers.{stage * (L // 2) + j}."
            h = h + llama_mlp(rms(h, t[p + "layernorm.weight"]), t, p + "mlp.")
        if stage == 0:
            h = h.reshape(N, 1, -1)
            h = F.linear(
                h, t[prefix + "encoder.squeeze_layer.weight"], t[prefix + "encoder.squeeze_layer.bias"]
            )
    h = rms(h, t[prefix + "encoder.norm.weight"])
    w, b = t[prefix + "encoder.hidden_to_latent.weight"], t[prefix + "encoder.hidden_to_latent.bias"]
    return F.linear(h, w, b).reshape(N, -1)


def ref_ae_decode(t, z, prefix=""):
    """Authors' Decoder.forward: latents [N, l] -> logits [N, K, V] through lm_head_weight."""
    N, K, L = z.shape[0], AE_DIMS["K"], AE_DIMS["layers"]
    h = F.linear(
        z, t[prefix + "decoder.latent_to_hidden.weight"], t[prefix + "decoder.latent_to_hidden.bias"]
    )
    for stage in range(2):
        for j in range(L // 2):
            p = f"{prefix}decoder.decoder_layers.{stage * (L // 2) + j}."
            h = h + llama_mlp(rms(h, t[p + "layernorm.weight"]), t, p + "mlp.")
        if stage == 0:
            h = F.linear(
                h, t[prefix + "decoder.expand_layer.weight"], t[prefix + "decoder.expand_layer.bias"]
            )
            h = h.reshape(N, K, -1)
    h = rms(h, t[prefix + "decoder.norm.weight"])
    head = t.get(prefix + "decoder.lm_head_weight", t[prefix + "encoder.embed_tokens.weight"])
    return F.linear(h, head)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_calm_hidden(t, tokens, theta=10000.0):
    """Authors' EnergyTransformer: embed_tokens -> [B, C, K·d] -> embed_proj -> LlamaModel."""
    d, H, KV, L = (CALM_DIMS[k] for k in ("d", "heads", "kv", "layers"))
    K, hd = AE_DIMS["K"], d // H
    B, T = tokens.shape
    C = T // K
    x = t["transformer.embed_tokens.weight"][tokens].reshape(B, C, K * d)
    x = F.silu(F.linear(x, t["embed_proj.0.weight"], t["embed_proj.0.bias"]))
    x = F.linear(x, t["embed_proj.2.weight"], t["embed_proj.2.bias"])
    x = F.layer_norm(x, (d,), t["embed_proj.3.weight"], t["embed_proj.3.bias"], eps=1e-6)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.outer(torch.arange(C).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    causal = torch.ones(C, C, dtype=torch.bool).triu(1)
    for i in range(L):
        p = f"transformer.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = F.linear(h, t[p + "self_attn.q_proj.weight"]).view(B, C, H, hd).transpose(1, 2)
        k = F.linear(h, t[p + "self_attn.k_proj.weight"]).view(B, C, KV, hd).transpose(1, 2)
        v = F.linear(h, t[p + "self_attn.v_proj.weight"]).view(B, C, KV, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out = (att @ v).transpose(1, 2).reshape(B, C, d)
        x = x + F.linear(out, t[p + "self_attn.o_proj.weight"])
        x = x + llama_mlp(rms(x, t[p + "post_attention_layernorm.weight"]), t, p + "mlp.")
    return rms(x, t["transformer.norm.weight"])


def ref_head_sample(t, hidden, noise, prefix="generative_head."):
    """Authors' MLPGenerator.sample with the noise given: hidden [..., d], noise [..., n, nz]."""
    d = hidden.shape[-1]

    def lin(x, name):
        return F.linear(x, t[prefix + name + ".weight"], t[prefix + name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (d,), t[prefix + name + ".weight"], t[prefix + name + ".bias"], eps=1e-6)

    y = ln(lin(hidden, "hidden_embd"), "norm_hidden").unsqueeze(-2).expand(*noise.shape[:-1], d)
    x = ln(lin(noise, "noise_embd"), "norm_noise")
    for j in range(CALM_DIMS["head_layers"]):
        p = f"mlp_blocks.{j}."
        u = lin(torch.cat((ln(x, p + "in_ln"), y), dim=-1), p + "linears.0")
        u = lin(F.silu(lin(F.silu(u), p + "linears.2")), p + "linears.4")
        gate, up = u.chunk(2, dim=-1)
        x = x + lin(F.silu(gate) * up, p + "down_proj")
    x = ln(x, "final_layer.in_ln")
    return lin(F.silu(lin(x, "final_layer.linears.0")), "final_layer.linears.2")


# ------------------------------------------------------------------------------------------
# The mapping written out independently of calm.official (official regex -> our name).

AE_RULES = [
    (r"encoder\.embed_tokens\.weight", "embed.weight"),
    (r"encoder\.encoder_layers\.0\.layernorm\.weight", "encoder_pre.0.norm.weight"),
    (r"encoder\.encoder_layers\.1\.layernorm\.weight", "encoder_post.0.norm.weight"),
    (r"encoder\.encoder_layers\.0\.mlp\.(\w+)\.weight", r"encoder_pre.0.mlp.\1.weight"),
    (r"encoder\.encoder_layers\.1\.mlp\.(\w+)\.weight", r"encoder_post.0.mlp.\1.weight"),
    (r"encoder\.squeeze_layer\.(weight|bias)", r"squeeze.\1"),
    (r"encoder\.norm\.weight", "encoder_norm.weight"),
    (r"encoder\.hidden_to_latent\.(weight|bias)", r"to_latent.\1"),
    (r"decoder\.latent_to_hidden\.(weight|bias)", r"from_latent.\1"),
    (r"decoder\.decoder_layers\.0\.layernorm\.weight", "decoder_pre.0.norm.weight"),
    (r"decoder\.decoder_layers\.1\.layernorm\.weight", "decoder_post.0.norm.weight"),
    (r"decoder\.decoder_layers\.0\.mlp\.(\w+)\.weight", r"decoder_pre.0.mlp.\1.weight"),
    (r"decoder\.decoder_layers\.1\.mlp\.(\w+)\.weight", r"decoder_post.0.mlp.\1.weight"),
    (r"decoder\.expand_layer\.(weight|bias)", r"expand.\1"),
    (r"decoder\.norm\.weight", "decoder_norm.weight"),
    (r"decoder\.lm_head_weight", "lm_head.weight"),
]
CALM_RULES = [
    (r"transformer\.embed_tokens\.weight", "embed.weight"),
    (r"transformer\.norm\.weight", "backbone.norm.weight"),
    (r"transformer\.layers\.(\d+)\.self_attn\.(\w)_proj\.weight", r"backbone.layers.\1.attn.\2_proj.weight"),
    (r"transformer\.layers\.(\d+)\.mlp\.(\w+)\.weight", r"backbone.layers.\1.mlp.\2.weight"),
    (r"transformer\.layers\.(\d+)\.input_layernorm\.weight", r"backbone.layers.\1.attn_norm.weight"),
    (r"transformer\.layers\.(\d+)\.post_attention_layernorm\.weight", r"backbone.layers.\1.mlp_norm.weight"),
    (r"embed_proj\.([023])\.(weight|bias)", r"compress.\1.\2"),
    (r"(?:generative_head|mlp_generator)\.mlp_blocks\.(.+)", r"head.blocks.\1"),
    (r"(?:generative_head|mlp_generator)\.(.+)", r"head.\1"),
]


def ours_for(key: str, rules) -> str:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(f"no rule for {key}")


def assert_tensors_landed(model_state, raw, rules, *, ours_prefix="", raw_prefix=""):
    """Every raw tensor equals the model tensor the mapping names, and every model tensor is covered."""
    covered = set()
    for key, value in raw.items():
        if not key.startswith(raw_prefix):
            continue
        name = ours_prefix + ours_for(key[len(raw_prefix) :], rules)
        assert name in model_state, f"{key} -> {name}: not in the model"
        assert torch.equal(model_state[name], value), f"{key} -> {name}: values differ"
        covered.add(name)
    return covered


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Raw tensors and directories: tokenizer, autoencoder (.bin), CALM (.bin, both head copies)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("release")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    v = write_tokenizer_json(tok_dir / "tokenizer.json")
    vocab = v + len(SPECIALS) + 1  # + [PAD]
    ae_state = official_ae_state(vocab)
    calm_state = official_calm_state(vocab)
    ae_dir, calm_dir = root / "CALM-Autoencoder", root / "CALM-M"
    write_bin(ae_dir, official_ae_config(v, vocab), ae_state)
    shutil.copy(tok_dir / "tokenizer.json", ae_dir / "tokenizer.json")
    write_bin(calm_dir, official_calm_config(v, vocab), calm_state)
    shutil.copy(tok_dir / "tokenizer.json", calm_dir / "tokenizer.json")
    return {
        "root": root,
        "v": v,
        "vocab": vocab,
        "ae": ae_state,
        "calm": calm_state,
        "ae_dir": ae_dir,
        "calm_dir": calm_dir,
        "tok_dir": tok_dir,
    }


def _tokens(vocab, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def check_autoencoder_outputs(ae: ChunkAutoencoder, raw: dict, prefix: str = ""):
    chunks = _tokens(ae.config.vocab_size, (5, AE_DIMS["K"]))
    with torch.no_grad():
        mu, log_std = ae.encode(chunks)
        ref = ref_ae_encode(raw, chunks, prefix)
        l = AE_DIMS["latent"]
        torch.testing.assert_close(mu, ref[:, :l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_std, ref[:, l:], rtol=1e-5, atol=1e-5)
        z = mu + log_std.exp() * torch.randn_like(mu)
        torch.testing.assert_close(ae.decode_logits(z), ref_ae_decode(raw, z, prefix), rtol=1e-5, atol=1e-5)
        assert torch.equal(ae.decode(z), ref_ae_decode(raw, z, prefix).argmax(-1))


# ------------------------------------------------------------------------------------------
# Key maps


def test_key_maps_match_the_independent_rules(release):
    ae_map = autoencoder_key_map(2)
    assert set(ae_map) == set(release["ae"])
    assert all(ae_map[k] == ours_for(k, AE_RULES) for k in ae_map)
    calm_map = calm_key_map(CALM_DIMS["layers"], CALM_DIMS["head_layers"], head_prefix="mlp_generator.")
    assert set(calm_map) == {k for k in release["calm"] if not k.startswith("generative_head.")}
    assert all(calm_map[k] == ours_for(k, CALM_RULES) for k in calm_map)


# ------------------------------------------------------------------------------------------
# Autoencoder


def test_autoencoder_bin_loads_maps_and_matches_the_reference(release):
    ae = load_official(release["ae_dir"])
    assert isinstance(ae, ChunkAutoencoder) and not ae.training
    c = ae.config
    assert (c.d_model, c.ffn_dim, c.latent_dim, c.chunk_size, c.num_layers) == (24, 40, 8, 4, 2)
    assert (c.vocab_size, c.eot_id, c.pad_id, c.mask_id) == (
        release["vocab"],
        release["v"] + 1,
        release["v"] + len(SPECIALS),
        0,  # the released AE's token-drop value (training only)
    )
    assert (c.kl_clamp, c.kl_weight, c.token_mask_prob, c.latent_dropout) == (0.5, 1e-3, 0.15, 0.15)
    state = ae.state_dict()
    covered = assert_tensors_landed(state, release["ae"], AE_RULES)
    assert covered == set(state)
    assert ae.lm_head.weight is ae.embed.weight
    check_autoencoder_outputs(ae, release["ae"])
    # a tokenizer was found in the directory and agrees with the model
    tok = ae.tokenizer
    assert (tok.eot_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (c.eot_id, c.pad_id, 0, c.vocab_size)


def test_autoencoder_safetensors_without_output_matrix_restores_the_tie(release, tmp_path):
    raw = {k: v for k, v in release["ae"].items() if k != "decoder.lm_head_weight"}
    d = tmp_path / "ae-st"
    write_safetensors(d, official_ae_config(release["v"], release["vocab"]), raw)
    ae = load_official(d)
    assert ae.lm_head.weight is ae.embed.weight
    assert torch.equal(ae.lm_head.weight, release["ae"]["decoder.lm_head_weight"])
    assert any("tie restored" in n for n in ae.official_load_report.notes)
    assert ae.tokenizer is None  # none in the directory
    check_autoencoder_outputs(ae, release["ae"])


def test_autoencoder_sharded_bin(release, tmp_path):
    d = tmp_path / "ae-sharded"
    write_bin(d, official_ae_config(release["v"], release["vocab"]), release["ae"], shards=3)
    assert len(list(d.glob("pytorch_model-*-of-00003.bin"))) == 3
    ae = load_official(d, tokenizer_path=release["tok_dir"])
    assert_tensors_landed(ae.state_dict(), release["ae"], AE_RULES)
    assert ae.lm_head.weight is ae.embed.weight
    check_autoencoder_outputs(ae, release["ae"])


def test_dtype_and_memory_mapping(release):
    ae = load_official(release["ae_dir"], dtype=torch.bfloat16)
    assert {p.dtype for p in ae.parameters()} == {torch.bfloat16}
    assert ae.lm_head.weight is ae.embed.weight
    # without a dtype the parameters are the file's own (memory-mapped) tensors: no copy was made
    ae32 = load_official(release["ae_dir"])
    assert {p.dtype for p in ae32.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------
# CALM


def check_calm_outputs(model, raw_calm, raw_ae, *, head_prefix, ae_prefix=""):
    tokens = _tokens(model.config.vocab_size, (2, 5 * AE_DIMS["K"]), seed=3)
    with torch.no_grad():
        h = model.hidden(tokens)
        ref_h = ref_calm_hidden(raw_calm, tokens)
        torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-5)
        noise = torch.rand(2, 5, 3, CALM_DIMS["noise"], generator=torch.Generator().manual_seed(4)) - 0.5
        z = model.head(h, noise)
        ref_z = ref_head_sample(raw_calm, ref_h, noise, prefix=head_prefix)
        torch.testing.assert_close(z, ref_z, rtol=1e-4, atol=1e-5)
        chunks = model.autoencoder.decode(z)
        assert torch.equal(chunks, ref_ae_decode(raw_ae, ref_z.reshape(-1, AE_DIMS["latent"]), ae_prefix)
                           .argmax(-1).reshape(2, 5, 3, AE_DIMS["K"]))  # fmt: skip


def test_calm_bin_with_autoencoder_dir(release):
    model = load_official(release["calm_dir"], ae_path=release["ae_dir"])
    from calm.models.calm import CALM

    assert isinstance(model, CALM)
    c = model.config
    assert (c.d_model, c.ffn_dim, c.num_layers, c.num_heads, c.kv_heads) == (32, 48, 2, 4, 2)
    assert (c.max_seq_len, c.rope_theta, c.norm_eps, c.vocab_size) == (16, 10000.0, 1e-6, release["vocab"])
    assert (c.chunk_size, c.latent_dim, c.num_head_layers, c.noise_dim) == (4, 8, 2, 8)
    assert (c.num_model_samples, c.energy_alpha) == (8, 1.0)
    state = model.state_dict()
    covered = assert_tensors_landed(state, release["calm"], CALM_RULES)
    covered |= assert_tensors_landed(state, release["ae"], AE_RULES, ours_prefix="autoencoder.")
    assert covered == set(state)
    assert model.autoencoder.lm_head.weight is model.autoencoder.embed.weight
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert model.official_load_report.autoencoder_source == str(release["ae_dir"])
    check_calm_outputs(model, release["calm"], release["ae"], head_prefix="generative_head.")


def test_calm_finds_the_autoencoder_beside_it(release):
    # ae_path in the config is the authors' absolute path; its last part is looked for next door
    model = load_official(release["calm_dir"])
    assert any("beside" in n for n in model.official_load_report.notes)
    check_calm_outputs(model, release["calm"], release["ae"], head_prefix="mlp_generator.")


def test_calm_sharded_safetensors_with_embedded_autoencoder_copy(release, tmp_path):
    # HF's safetensors writer keeps one head copy and drops the AE's tied output matrix
    raw = official_calm_state(release["vocab"], head_copies=("generative_head.",))
    torch.manual_seed(5)
    ae_raw = official_ae_state(release["vocab"])
    raw.update({"ae_model." + k: v for k, v in ae_raw.items() if k != "decoder.lm_head_weight"})
    d = tmp_path / "alone" / "CALM-L"
    write_safetensors(d, official_calm_config(release["v"], release["vocab"]), raw, shards=3)
    model = load_official(d, tokenizer_path=release["tok_dir"] / "tokenizer.json")
    notes = model.official_load_report.notes
    assert any("ae_model." in n for n in notes)
    state = model.state_dict()
    own = {k: v for k, v in raw.items() if not k.startswith("ae_model.")}
    covered = assert_tensors_landed(state, own, CALM_RULES)
    assert model.autoencoder.lm_head.weight is model.autoencoder.embed.weight
    for key, value in ae_raw.items():
        name = "autoencoder." + ours_for(key, AE_RULES)
        assert torch.equal(state[name], value), key
        covered.add(name)
    assert covered == set(state)
    check_calm_outputs(model, raw, ae_raw, head_prefix="generative_head.")
    assert model.tokenizer is not None and model.tokenizer.vocab_size == release["vocab"]


# ------------------------------------------------------------------------------------------
# Conversion, calm.load and the CLI


def test_convert_then_load_gives_the_same_model(release, tmp_path):
    out = tmp_path / "converted"
    summary = convert_official(release["calm_dir"], release["ae_dir"], out, log=None)
    assert summary["kind"] == "calm" and summary["out"] == str(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    # de-duplicated: the autoencoder's tied output matrix is stored once
    assert len(keys & {"autoencoder.embed.weight", "autoencoder.lm_head.weight"}) == 1
    model = calm.load(out)
    state = model.state_dict()
    covered = assert_tensors_landed(state, release["calm"], CALM_RULES)
    covered |= assert_tensors_landed(state, release["ae"], AE_RULES, ours_prefix="autoencoder.")
    assert covered == set(state)
    assert model.autoencoder.lm_head.weight is model.autoencoder.embed.weight
    check_calm_outputs(model, release["calm"], release["ae"], head_prefix="generative_head.")
    tok = model.tokenizer
    assert (tok.eot_id, tok.pad_id, tok.mask_id) == (release["v"] + 1, release["v"] + len(SPECIALS), 0)
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_calm_load_reads_a_release_directory_directly(release):
    model = calm.load(release["calm_dir"])  # dispatches to calm.official (autoencoder found beside it)
    check_calm_outputs(model, release["calm"], release["ae"], head_prefix="generative_head.")
    assert model.tokenizer is not None


def test_cli_converts_an_autoencoder_alone_with_json(release, tmp_path, capsys):
    out = tmp_path / "ae-converted"
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert-official", "--ae", str(release["ae_dir"]), "--out", str(out), "--json"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["kind"] == "autoencoder" and summary["params"] > 0
    assert "writing" in captured.err  # progress goes to stderr under --json
    ae = calm.load(out)
    assert isinstance(ae, ChunkAutoencoder)
    assert_tensors_landed(ae.state_dict(), release["ae"], AE_RULES)
    check_autoencoder_outputs(ae, release["ae"])


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert-official", "--calm", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "no config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_authors_tokenizer_with_pad_loads_and_round_trips(release):
    v = release["v"]
    tok = load_official_tokenizer(release["tok_dir"])
    assert tok.eot_id == v + 1 and tok.id_to_token(tok.eot_id) == "<|end_of_text|>"
    assert tok.pad_id == v + len(SPECIALS) and tok.id_to_token(tok.pad_id) == "[PAD]"
    assert tok.mask_id == 0 and tok.added_tokens == []
    assert tok.vocab_size == release["vocab"]  # nothing added: matches the embedding table
    ids = tok.encode(TEXT)
    assert v not in ids  # no BOS from the post-processor
    assert tok.decode(ids) == TEXT
    assert tok.decode([*ids, tok.eot_id], skip_special=False) == TEXT + "<|end_of_text|>"


def test_meta_tokenizer_without_pad_gets_the_authors_pad(tmp_path, release):
    v = write_tokenizer_json(tmp_path / "tokenizer.json", with_pad=False)
    tok = load_official_tokenizer(tmp_path)
    assert tok.pad_id == v + len(SPECIALS) and tok.added_tokens == ["[PAD]"]
    assert tok.vocab_size == release["vocab"]
    assert tok.decode(tok.encode(TEXT)) == TEXT


# ------------------------------------------------------------------------------------------
# Errors


def test_not_a_release_layout(tmp_path, release):
    with pytest.raises(OfficialFormatError, match="no config.json"):
        load_official(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2}))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OfficialFormatError, match="lacks patch_size, latent_size"):
        load_official(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"patch_size": 4, "latent_size": 8}))
    with pytest.raises(OfficialFormatError, match="neither a CALM config"):
        load_official(tmp_path)
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(release["ae_dir"] / "config.json", d / "config.json")
    with pytest.raises(OfficialFormatError, match="no weights"):
        load_official(d)
    with pytest.raises(OfficialFormatError, match="not a directory"):
        load_official(tmp_path / "config.json")


def test_missing_shard_is_named(release, tmp_path):
    d = tmp_path / "ae"
    write_bin(d, official_ae_config(release["v"], release["vocab"]), release["ae"], shards=3)
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(OfficialFormatError, match=r"missing shard\(s\) pytorch_model-00002-of-00003\.bin"):
        load_official(d)
    # no index either: the shard set is still checked
    (d / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(OfficialFormatError, match="pytorch_model-00002-of-00003.bin"):
        load_official(d)


def test_wrong_shape_names_the_key(release, tmp_path):
    raw = dict(release["ae"])
    raw["decoder.decoder_layers.1.mlp.up_proj.weight"] = torch.zeros(AE_DIMS["ffn"] + 1, AE_DIMS["d"])
    d = tmp_path / "ae"
    write_bin(d, official_ae_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match=r"decoder\.decoder_layers\.1\.mlp\.up_proj\.weight") as e:
        load_official(d)
    assert "(40, 24)" in str(e.value) and "(41, 24)" in str(e.value)  # expected vs found
    raw = dict(release["calm"])
    raw["transformer.layers.1.self_attn.v_proj.weight"] = torch.zeros(3, CALM_DIMS["d"])
    d = tmp_path / "calm"
    write_bin(d, official_calm_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match=r"transformer\.layers\.1\.self_attn\.v_proj\.weight"):
        load_official(d, ae_path=release["ae_dir"])


def test_config_and_weights_disagree(release, tmp_path):
    cfg = official_ae_config(release["v"], release["vocab"]) | {"hidden_size": 48}
    write_bin(tmp_path / "ae", cfg, release["ae"])
    with pytest.raises(OfficialFormatError, match="disagree.*hidden_size=48.*encoder.embed_tokens.weight"):
        load_official(tmp_path / "ae")
    cfg = official_calm_config(release["v"], release["vocab"]) | {"num_hidden_layers": 3}
    write_bin(tmp_path / "calm", cfg, release["calm"])
    with pytest.raises(OfficialFormatError, match="num_hidden_layers=3.*2 Transformer layer"):
        load_official(tmp_path / "calm", ae_path=release["ae_dir"])
    cfg = official_calm_config(release["v"], release["vocab"]) | {"num_key_value_heads": 4}
    write_bin(tmp_path / "calm2", cfg, release["calm"])
    with pytest.raises(OfficialFormatError, match="num_key_value_heads=4.*k_proj"):
        load_official(tmp_path / "calm2", ae_path=release["ae_dir"])


def test_unexpected_and_missing_keys_are_listed(release, tmp_path):
    raw = dict(release["ae"]) | {"encoder.extra_layer.weight": torch.zeros(2)}
    write_bin(tmp_path / "extra", official_ae_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match=r"unexpected tensor\(s\).*encoder\.extra_layer\.weight"):
        load_official(tmp_path / "extra")
    raw = {k: v for k, v in release["ae"].items() if k != "decoder.norm.weight"}
    write_bin(tmp_path / "missing", official_ae_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match=r"missing tensor\(s\): decoder\.norm\.weight"):
        load_official(tmp_path / "missing")


def test_untied_output_matrix_is_refused(release, tmp_path):
    raw = dict(release["ae"])
    raw["decoder.lm_head_weight"] = raw["encoder.embed_tokens.weight"] + 1.0
    write_bin(tmp_path / "ae", official_ae_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match="untied output matrix cannot be represented"):
        load_official(tmp_path / "ae")


def test_differing_head_copies_are_refused(release, tmp_path):
    raw = {k: v.clone() for k, v in release["calm"].items()}
    raw["mlp_generator.final_layer.linears.2.bias"] += 1.0
    write_bin(tmp_path / "calm", official_calm_config(release["v"], release["vocab"]), raw)
    with pytest.raises(OfficialFormatError, match="final_layer.linears.2.bias.*differ"):
        load_official(tmp_path / "calm", ae_path=release["ae_dir"])


def test_calm_without_an_autoencoder_says_to_pass_ae(release, tmp_path):
    d = tmp_path / "lonely" / "CALM-M"
    write_bin(d, official_calm_config(release["v"], release["vocab"]), release["calm"])
    with pytest.raises(OfficialFormatError, match="--ae"):
        load_official(d)
    with pytest.raises(OfficialFormatError, match="is a CALM checkpoint, not an autoencoder"):
        load_official(d, ae_path=release["calm_dir"])


def test_generate_and_eval_take_ae_for_a_release_without_its_autoencoder(release, tmp_path, capsys):
    d = tmp_path / "lonely" / "CALM-M"
    write_bin(d, official_calm_config(release["v"], release["vocab"]), release["calm"])
    shutil.copy(release["tok_dir"] / "tokenizer.json", d / "tokenizer.json")
    gen = ["generate", str(d), "--prompt", "hello there", "-n", "8", "--seed", "0", "--json", "--ignore-eos"]

    def run(argv):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    code, out, err = run(gen)
    assert code != 0 and out == "" and "--ae AE_DIR" in err
    code, out, _ = run([*gen, "--ae", str(release["ae_dir"])])
    assert code == 0
    assert json.loads(out)["new_tokens"] == [8]
    text = tmp_path / "text.txt"
    text.write_text("hello there, general kenobi. " * 40)
    ev = ["eval", str(d), "--data", str(text), "--block-size", "32", "--max-tokens", "256", "--json"]
    code, out, err = run(ev)
    assert code != 0 and "--ae AE_DIR" in err
    code, out, _ = run([*ev, "--ae", str(release["ae_dir"])])
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] == 256 and math.isfinite(result["brier_lm"])


def test_load_model_refuses_ae_path_for_our_own_checkpoints(release, tmp_path):
    from calm.checkpoint import CheckpointError, load_model, save_checkpoint

    ours = save_checkpoint(tmp_path / "ae", ChunkAutoencoder(calm.config.preset("ae-tiny")))
    with pytest.raises(CheckpointError, match="only for the authors' released CALM models"):
        load_model(ours, ae_path=release["ae_dir"])


# ------------------------------------------------------------------------------------------
# Names inside a release stay inside it; special ids come from its configs (issue 16)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_shard_index_entries_must_stay_in_the_directory(release, tmp_path, fmt, bad):
    d = tmp_path / "rel" / "ae"
    writer = write_bin if fmt == "bin" else write_safetensors
    writer(d, official_ae_config(release["v"], release["vocab"]), release["ae"], shards=2)
    index = d / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")
    meta = json.loads(index.read_text())
    key = sorted(meta["weight_map"])[0]
    shard = d / meta["weight_map"][key]
    if not bad.startswith("/"):  # make the escaping name a real, loadable file outside
        shutil.copy(shard, d.parent / "outside.bin")
    meta["weight_map"][key] = bad
    index.write_text(json.dumps(meta))
    with pytest.raises(OfficialFormatError, match=re.escape(f"weight_map entry {key!r}: {bad!r}")):
        load_official(d)


def test_ae_path_ending_in_dotdot_selects_nothing_above_the_release(release, tmp_path):
    # an autoencoder that ".." would reach: the directory above the release's parent
    write_bin(tmp_path, official_ae_config(release["v"], release["vocab"]), release["ae"])
    d = tmp_path / "downloads" / "CALM-M"
    cfg = official_calm_config(release["v"], release["vocab"]) | {"ae_path": "/mnt/authors/.."}
    write_bin(d, cfg, release["calm"])
    with pytest.raises(
        OfficialFormatError, match=r"ae_path '/mnt/authors/\.\.' does not end in a directory name"
    ):
        load_official(d)
    model = load_official(d, ae_path=tmp_path)  # naming it explicitly is the user's choice
    assert model.official_load_report.autoencoder_source == str(tmp_path)


def test_special_ids_come_from_the_configs_however_the_autoencoder_is_found(release, tmp_path):
    v = release["v"]
    eot, pad = v + 1, v + len(SPECIALS)  # <|end_of_text|> and [PAD] in the release's configs
    raw = official_calm_state(release["vocab"], head_copies=("generative_head.",))
    raw.update({"ae_model." + k: t for k, t in release["ae"].items() if k != "decoder.lm_head_weight"})
    embedded = tmp_path / "embedded" / "CALM-M"  # no tokenizer.json anywhere: the configs decide
    write_safetensors(embedded, official_calm_config(v, release["vocab"]), raw)
    notes = []
    for kwargs in ({}, {"ae_path": release["ae_dir"]}):
        model = load_official(embedded, **kwargs)
        assert (model.tokenizer is None) == (not kwargs)  # with ae_path, its tokenizer.json is found
        ae = model.autoencoder.config
        assert (ae.eot_id, ae.pad_id) == (eot, pad), kwargs
        assert (model.config.autoencoder["eot_id"], model.config.autoencoder["pad_id"]) == (eot, pad)
        notes += model.official_load_report.notes
    assert not any("no end-of-text id" in n for n in notes)
