"""The `calm flops` command: parameters and FLOPs per token for a preset or checkpoint.

Options, loading the target (a preset name or a checkpoint directory), the text table of a
report and the preset listing. The accounting itself is `calm.flops`; like every command-line
module this one imports no torch, so `calm flops --help` answers without it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from calm.config import PRESETS, ConfigError, apply_overrides, config_from_dict, preset
from calm.flops import flops_report


def load_target(target: str):
    """A preset name or a checkpoint directory -> (config, label)."""
    path = Path(target)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json: not a checkpoint")
        try:
            data = json.loads(cfg_file.read_text())
            return config_from_dict(data["kind"], data["config"]), str(path)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{cfg_file}: expected {{'kind': ..., 'config': {{...}}}} ({err})") from err
    if target in PRESETS:
        return preset(target), target
    raise ConfigError(
        f"{target!r} is neither a checkpoint directory nor a preset; presets: {', '.join(sorted(PRESETS))}"
    )


def add_flops_arguments(parser) -> None:
    parser.add_argument("target", nargs="?", help="a checkpoint directory or a preset name")
    parser.add_argument("--preset", help="preset name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the presets with their sizes and exit")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field (repeatable)",
    )
    parser.add_argument(
        "--autoencoder",
        metavar="PRESET|DIR",
        help="autoencoder for a CALM model instead of the one its config names",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="attention context in backbone positions (tokens for AR, chunks for CALM); None = max_seq_len",
    )
    parser.add_argument("--no-attention", action="store_true", help="leave out attention-score FLOPs")
    parser.add_argument(
        "--samples", type=int, default=1, help="CALM head samples (decoded) per step at inference"
    )
    parser.add_argument(
        "--train-tokens", type=float, default=None, help="also give total training FLOPs for this many tokens"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


_LABELS = {
    "embeddings": "embeddings",
    "input_compression": "input compression",
    "backbone": "backbone",
    "lm_head": "LM head",
    "energy_head": "energy head",
    "aux_token_head": "aux token head (train)",
    "decoder_ce": "decoder CE (train)",
    "flow_head": "flow head",
    "diffusion_head": "diffusion head",
    "attention": "attention scores",
    "energy_loss": "energy score (N×M dists)",
    "ae_encoder": "AE encoder (targets)",
    "ae_decoder": "AE decoder",
    "encoder": "encoder",
    "decoder": "decoder",
    "autoencoder": "autoencoder (separate)",
    "total": "total",
    "total_with_autoencoder": "total incl. autoencoder",
}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report.get('name', '')}  ({report['kind']}, {report['tokens_per_step']} token(s) per step)"]
    if report.get("context"):
        lines[0] += f", context {report['context']} positions = {report['context_tokens']} tokens"
    lines.append("")
    lines.append("parameters")
    for key, value in report["params"].items():
        lines.append(f"  {_LABELS.get(key, key):<26}{_fmt_params(value):>12}")
    lines.append("")
    lines.append(f"FLOPs per text token        {'train':>12}{'inference':>12}")
    train, infer = report["flops_per_token"]["train"], report["flops_per_token"]["inference"]
    for key in dict.fromkeys([*train, *infer]):
        t = f"{train[key]:.3g}" if key in train else "-"
        i = f"{infer[key]:.3g}" if key in infer else "-"
        lines.append(f"  {_LABELS.get(key, key):<26}{t:>12}{i:>12}")
    lines.append(
        f"  {'total':<26}{report['train_flops_per_token']:>12.3g}{report['inference_flops_per_token']:>12.3g}"
    )
    if "train_flops_total" in report:
        lines.append(
            f"  training on {report['train_tokens']:.3g} tokens: {report['train_flops_total']:.3g} FLOPs"
        )
    lines.append("")
    lines.append("notes")
    lines += [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)


def _list_presets(as_json: bool) -> None:
    rows = {}
    for name in PRESETS:
        cfg = preset(name)
        rep = flops_report(cfg)
        rows[name] = {
            "kind": cfg.kind,
            "d_model": cfg.d_model,
            "num_layers": cfg.num_layers,
            "params": rep["params"]["total"],
            "inference_flops_per_token": rep["inference_flops_per_token"],
            "train_flops_per_token": rep["train_flops_per_token"],
        }
    if as_json:
        print(json.dumps(rows))
        return
    print(f"{'preset':<18}{'kind':<13}{'d':>6}{'layers':>8}{'params':>12}{'train/tok':>12}{'infer/tok':>12}")
    for name, r in rows.items():
        print(
            f"{name:<18}{r['kind']:<13}{r['d_model']:>6}{r['num_layers']:>8}{_fmt_params(r['params']):>12}"
            f"{r['train_flops_per_token']:>12.3g}{r['inference_flops_per_token']:>12.3g}"
        )


def run_flops(args) -> int:
    if args.list:
        _list_presets(args.json)
        return 0
    if bool(args.target) == bool(args.preset):
        raise ConfigError(
            "give exactly one of a checkpoint directory / preset name, or --preset NAME (or --list)"
        )
    cfg, label = load_target(args.preset or args.target)
    cfg = apply_overrides(cfg, args.overrides)
    ae = None
    if args.autoencoder:
        if cfg.kind != "calm":
            raise ConfigError("--autoencoder only applies to CALM models")
        ae, _ = load_target(args.autoencoder)
        if ae.kind != "autoencoder":
            raise ConfigError(f"--autoencoder {args.autoencoder!r} is a {ae.kind} config, not an autoencoder")
    report = flops_report(
        cfg,
        autoencoder_config=ae,
        context=args.context,
        include_attention=not args.no_attention,
        inference_samples=args.samples,
        train_tokens=args.train_tokens,
    )
    report = {"name": label, **report, "config": dataclasses.asdict(cfg)}
    print(json.dumps(report) if args.json else format_report(report))
    return 0
