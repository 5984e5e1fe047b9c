"""Benchmark `calm convert-official` on a CALM-M-sized release: wall time and peak memory.

Writes a random checkpoint in the authors' exact layout into a scratch folder (default: a new
folder under /tmp, removed at the end unless ``--keep``):

- ``CALM-M/``: config.json + sharded ``pytorch_model-0000k-of-0000n.bin`` +
  ``pytorch_model.bin.index.json`` — d 1024, 16 layers, ffn 2752, 16 heads, vocabulary 128,257,
  4 head blocks, K = 4, l = 128 (about 372M parameters, 1.5 GB in fp32), the head stored under
  both ``mlp_generator.`` and ``generative_head.`` (one storage, as the authors' state dict has it);
- ``CALM-Autoencoder/``: config.json + ``pytorch_model.bin`` (d 512, ffn 1280, 2+2 layers,
  ~76M parameters, ``decoder.lm_head_weight`` sharing the embedding's storage).

Then each measured step runs in a fresh Python process, so its peak resident memory
(``ru_maxrss`` from ``os.wait4``) is its own:

- ``baseline``: importing torch and calm (the floor every step pays);
- ``convert``: ``python -m calm convert-official --calm ... --ae ... --out ... --json``;
- ``load+sample``: ``calm.official.load_official`` on the release directory plus one forward
  pass and one head sample (weights stay memory-mapped, so only what is used is read).

Memory is reported against the size of the weights (distinct tensor bytes of the release, and
the bytes of the converted ``model.safetensors``): the converter is designed to stay near one
copy. The files were just written, so they are read from the page cache (not disk-bound).

Usage::

    python benchmarks/bench_convert.py [--scratch /tmp] [--out bench_out/convert] [--shard-mb 400] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# CALM-M (paper Table 1) and the released autoencoder.
CALM_M = dict(
    d=1024, ffn=2752, layers=16, heads=16, kv=16, vocab=128_257, head_blocks=4, noise=64, K=4, latent=128
)
AE = dict(d=512, ffn=1280, layers=2, vocab=128_257, K=4, latent=128)


def calm_entries(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(official name, shape) of every CALM tensor, in the authors' state-dict order (head once)."""
    d, ffn, K = c["d"], c["ffn"], c["K"]
    e = [("transformer.embed_tokens.weight", (c["vocab"], d))]
    for i in range(c["layers"]):
        p = f"transformer.layers.{i}."
        e += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        e += [(p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d))]
        e += [(p + "mlp.down_proj.weight", (d, ffn))]
        e += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    e.append(("transformer.norm.weight", (d,)))
    h = "mlp_generator."
    e += [(h + "noise_embd.weight", (d, c["noise"])), (h + "noise_embd.bias", (d,))]
    e += [(h + "hidden_embd.weight", (d, d)), (h + "hidden_embd.bias", (d,))]
    for ln in ("norm_hidden", "norm_noise"):
        e += [(h + f"{ln}.weight", (d,)), (h + f"{ln}.bias", (d,))]
    for j in range(c["head_blocks"]):
        p = f"{h}mlp_blocks.{j}."
        e += [(p + "in_ln.weight", (d,)), (p + "in_ln.bias", (d,))]
        for k, (o, i) in {0: (d, 2 * d), 2: (d, d), 4: (2 * d, d)}.items():
            e += [(p + f"linears.{k}.weight", (o, i)), (p + f"linears.{k}.bias", (o,))]
        e += [(p + "down_proj.weight", (d, d)), (p + "down_proj.bias", (d,))]
    e += [(h + "final_layer.in_ln.weight", (d,)), (h + "final_layer.in_ln.bias", (d,))]
    e += [(h + "final_layer.linears.0.weight", (d, d)), (h + "final_layer.linears.0.bias", (d,))]
    e += [
        (h + "final_layer.linears.2.weight", (c["latent"], d)),
        (h + "final_layer.linears.2.bias", (c["latent"],)),
    ]
    e += [("embed_proj.0.weight", (2 * d, K * d)), ("embed_proj.0.bias", (2 * d,))]
    e += [("embed_proj.2.weight", (d, 2 * d)), ("embed_proj.2.bias", (d,))]
    e += [("embed_proj.3.weight", (d,)), ("embed_proj.3.bias", (d,))]
    return e


def ae_entries(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, ffn, K, lat = c["d"], c["ffn"], c["K"], c["latent"]
    e = [("encoder.embed_tokens.weight", (c["vocab"], d))]
    for side, stack in (("encoder", "encoder_layers"), ("decoder", "decoder_layers")):
        for i in range(c["layers"]):
            p = f"{side}.{stack}.{i}."
            e += [(p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d))]
            e += [(p + "mlp.down_proj.weight", (d, ffn)), (p + "layernorm.weight", (d,))]
    e += [("encoder.hidden_to_latent.weight", (2 * lat, d)), ("encoder.hidden_to_latent.bias", (2 * lat,))]
    e += [("encoder.squeeze_layer.weight", (d, K * d)), ("encoder.squeeze_layer.bias", (d,))]
    e += [("encoder.norm.weight", (d,))]
    e += [("decoder.latent_to_hidden.weight", (d, lat)), ("decoder.latent_to_hidden.bias", (d,))]
    e += [("decoder.expand_layer.weight", (K * d, d)), ("decoder.expand_layer.bias", (K * d,))]
    e += [("decoder.norm.weight", (d,))]
    return e


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor(shape, gen):
    import torch

    if len(shape) == 1:
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def _save(state, path: Path) -> None:
    import torch

    torch.save(state, path)


def write_calm(directory: Path, c: dict, shard_bytes: int, gen) -> tuple[int, int]:
    """Sharded pytorch_model-*.bin + index + config.json; returns (files, tensor bytes)."""
    directory.mkdir(parents=True)
    entries = calm_entries(c)
    shards, current, size = [], [], 0
    for name, shape in entries:
        n = 4 * _numel(shape)
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    total, weight_map = 0, {}
    for s, part in enumerate(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{len(shards):05d}.bin"
        state = {name: _tensor(shape, gen) for name, shape in part}
        for name in list(state):  # the head is one module under two names: same storage, same shard
            if name.startswith("mlp_generator."):
                state["generative_head." + name[len("mlp_generator.") :]] = state[name]
        _save(state, directory / fname)
        total += sum(4 * _numel(shape) for _, shape in part)
        weight_map.update(dict.fromkeys(state, fname))
        del state
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["EnergyTransformer"],
        "ae_path": "/path/on/the/authors/machine/CALM-Autoencoder",
        "hidden_size": c["d"],
        "intermediate_size": c["ffn"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": c["vocab"],
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "pad_token_id": 128256,
        "patch_size": c["K"],
        "latent_size": c["latent"],
        "num_mlp_layers": c["head_blocks"],
        "noise_size": c["noise"],
        "num_samples": 8,
        "beta": 1.0,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return len(shards), total


def write_ae(directory: Path, c: dict, gen) -> int:
    directory.mkdir(parents=True)
    state = {name: _tensor(shape, gen) for name, shape in ae_entries(c)}
    state["decoder.lm_head_weight"] = state["encoder.embed_tokens.weight"]  # tied: one storage
    _save(state, directory / "pytorch_model.bin")
    config = {
        "hidden_size": c["d"],
        "intermediate_size": c["ffn"],
        "num_encoder_layers": c["layers"],
        "num_decoder_layers": c["layers"],
        "patch_size": c["K"],
        "latent_size": c["latent"],
        "ae_dropout": 0.15,
        "kl_clamp": 0.5,
        "kl_weight": 1e-3,
        "vocab_size": c["vocab"],
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(4 * _numel(shape) for _, shape in ae_entries(c))


def run_measured(cmd: list[str], scratch: Path, tag: str) -> dict:
    """Run `cmd` in a fresh process: wall time, its own peak RSS (wait4), its stdout."""
    out_path, err_path = scratch / f"{tag}.stdout", scratch / f"{tag}.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{err_path.read_text()[-3000:]}")
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "stdout": out_path.read_text(),
        "stderr": err_path.read_text(),
    }


LOAD_SNIPPET = """
import json, sys, time, torch
from calm.official import load_official
t0 = time.perf_counter()
model = load_official(sys.argv[1], ae_path=sys.argv[2])
t1 = time.perf_counter()
with torch.no_grad():
    tokens = torch.randint(0, model.config.vocab_size, (1, 64))
    h = model.hidden(tokens)
    chunks = model.sample_chunks(h[:, -1], 2)
print(json.dumps({"load_s": t1 - t0, "forward_s": time.perf_counter() - t1, "chunks": chunks.shape[-1]}))
"""


def generate(work: Path, shard_mb: int) -> dict:
    """Write both release directories into `work` (run in a child process: see `main`)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    n_shards, calm_bytes = write_calm(work / "CALM-M", CALM_M, shard_mb * 10**6, gen)
    ae_bytes = write_ae(work / "CALM-Autoencoder", AE, gen)
    return {
        "calm_shards": n_shards,
        "calm_bytes": calm_bytes,
        "autoencoder_bytes": ae_bytes,
        "write_s": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="where the ~3.6 GB of temp files go")
    parser.add_argument("--out", default=str(REPO / "bench_out" / "convert"), help="results folder")
    parser.add_argument("--shard-mb", type=int, default=400, help="shard size of the CALM checkpoint (MB)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    parser.add_argument("--json", action="store_true", help="print the JSON results on stdout")
    parser.add_argument("--generate-into", metavar="DIR", help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()
    if args.generate_into:
        print(json.dumps(generate(Path(args.generate_into), args.shard_mb)))
        return 0

    # This process never imports torch and never holds tensors: a forked child's ru_maxrss
    # includes the parent image it was forked from, so the parent must stay small.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="calm-bench-convert-", dir=args.scratch))
    py = sys.executable
    try:
        gen_run = run_measured(
            [
                py,
                str(Path(__file__).resolve()),
                "--generate-into",
                str(work),
                "--shard-mb",
                str(args.shard_mb),
            ],
            work,
            "generate",
        )
        info = json.loads(gen_run["stdout"])
        n_shards, calm_bytes, ae_bytes = info["calm_shards"], info["calm_bytes"], info["autoencoder_bytes"]
        t_write = info["write_s"]
        calm_dir, ae_dir, conv_dir = work / "CALM-M", work / "CALM-Autoencoder", work / "converted"
        print(
            f"wrote the release layout in {t_write:.1f} s: CALM-M {calm_bytes / 1e9:.2f} GB in {n_shards} shards, "
            f"autoencoder {ae_bytes / 1e9:.2f} GB ({work})",
            file=sys.stderr,
        )
        baseline = run_measured(
            [py, "-c", "import torch, safetensors, calm.official, calm.checkpoint, calm.models.calm"],
            work,
            "baseline",
        )
        convert = run_measured(
            [py, "-m", "calm", "convert-official", "--calm", str(calm_dir), "--ae", str(ae_dir)]
            + ["--out", str(conv_dir), "--json"],
            work,
            "convert",
        )
        summary = json.loads(convert["stdout"])
        load = run_measured([py, "-c", LOAD_SNIPPET, str(calm_dir), str(ae_dir)], work, "load")
        load_info = json.loads(load["stdout"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    weights = summary["source_bytes"]
    out_bytes = summary["out_bytes"]
    mib = 2**20
    base = baseline["peak_rss_mib"]
    rows = []
    for name, r in (
        ("baseline (import torch + calm)", baseline),
        ("convert", convert),
        ("load+sample", load),
    ):
        rows.append(
            {
                "step": name,
                "wall_s": r["wall_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "peak_over_weights": round(r["peak_rss_mib"] * mib / weights, 3),
                "above_baseline_over_weights": round((r["peak_rss_mib"] - base) * mib / weights, 3),
            }
        )
    reproduce = "python benchmarks/bench_convert.py"
    if args.scratch != tempfile.gettempdir():
        reproduce += f" --scratch {args.scratch}"
    result = {
        "benchmark": "convert-official",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": info["torch"]},
        "checkpoint": {
            "calm": CALM_M,
            "autoencoder": AE,
            "calm_shards": n_shards,
            "calm_bytes": calm_bytes,
            "autoencoder_bytes": ae_bytes,
            "source_bytes_distinct": weights,
            "converted_safetensors_bytes": out_bytes,
            "params": summary["params"],
            "autoencoder_params": summary.get("autoencoder_params"),
            "write_s": t_write,
        },
        "rows": rows,
        "convert_summary": {k: v for k, v in summary.items() if k not in ("files",)},
        "load_sample": load_info,
        "reproduce": reproduce,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# calm convert-official: CALM-M-sized release (random weights)",
        "",
        f"CALM-M {summary['params'] / 1e6:.1f}M parameters in total (CALM {calm_bytes / 1e9:.2f} GB fp32 "
        f"in {n_shards} .bin shards + autoencoder {ae_bytes / 1e9:.2f} GB); weights = {weights / 1e9:.3f} GB "
        f"of distinct tensor data; converted model.safetensors {out_bytes / 1e9:.3f} GB. "
        f"{os.cpu_count()} CPUs, torch {info['torch']}. Each step in a fresh process; peak RSS = ru_maxrss.",
        "",
        "| step | wall (s) | peak RSS (MiB) | peak / weights | (peak − baseline) / weights |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_over_weights']:.2f} "
            f"| {r['above_baseline_over_weights']:.2f} |"
        )
    lines += [
        "",
        f"convert: {summary['seconds']:.2f} s inside the command, of which {summary['seconds_load']:.2f} s "
        "opening and mapping (memory-mapped, nothing read yet) and the rest reading the weights and writing "
        "the atomic safetensors checkpoint (fsynced); the remainder of the wall time is Python/torch start-up.",
        "",
        f"load+sample: load_official {load_info['load_s']:.2f} s (memory-mapped, lazy), one forward over 16 "
        f"chunks + 2 head samples {load_info['forward_s']:.2f} s.",
        "",
        f"Reproduce: `{reproduce}`",
    ]
    markdown = "\n".join(lines) + "\n"
    (out / "results.md").write_text(markdown)
    print(markdown, file=sys.stderr)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}", file=sys.stderr)
    print(f"reproduce: {reproduce}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
