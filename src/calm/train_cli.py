"""`calm train-ae` and `calm train`: the command line of the training loop (`calm.train`).

Importing this module needs no torch (`calm --help` and `calm train --help` stay fast): the
options are defined here, and `run_train_ae` / `run_train` import the loop when they run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calm.cli import add_threads_argument
from calm.config import ConfigError, TrainConfig


def _add_common_arguments(parser, default_preset: str, presets_help: str) -> None:
    parser.add_argument(
        "--data", required=True, metavar="PREPARED_DIR", help="data set written by `calm prepare` (required)"
    )
    parser.add_argument(
        "--out", required=True, metavar="RUN_DIR", help="run directory: checkpoint/ (latest), metrics.jsonl"
    )
    parser.add_argument("--preset", default=default_preset, help=f"model preset ({presets_help})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a model or training config field, e.g. --set d_model=128 warmup_steps=10",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue exactly from RUN_DIR/checkpoint (configs come from the checkpoint; "
        "training fields such as --steps may still be changed)",
    )
    parser.add_argument(
        "--steps", type=int, help=f"optimizer steps (default: TrainConfig.steps = {TrainConfig.steps})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"global batch in windows (default: TrainConfig.batch_size = {TrainConfig.batch_size})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        help=f"tokens per window (default: TrainConfig.block_size = {TrainConfig.block_size})",
    )
    parser.add_argument(
        "--lr", type=float, help=f"peak learning rate (default: TrainConfig.lr = {TrainConfig.lr})"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile(fullgraph=True): in one process or under DDP the whole loss, forward and "
        "backward, as one graph (the largest scope for fusion; the models have no graph break; under DDP "
        "the backward is split at gradient buckets so all-reduces overlap it); under "
        "--strategy fsdp each Transformer block on its own, as torchtitan does, so that FSDP2's per-block "
        "all-gathers and reduce-scatters stay outside the graphs and overlap with compute. The first "
        "steps are slow (compilation, minutes on a small CPU)",
    )
    parser.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="data parallelism under torchrun: ddp (replicas), or fsdp (FSDP2: parameters, gradients and "
        "optimizer state sharded; bf16 mixed precision on CUDA; sharded DCP checkpoints, see `calm export`)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="T",
        help="peak dense bf16 TFLOP/s of one GPU, for the MFU in the progress bar and metrics.jsonl "
        "(default: known for A100, H100 SXM and H200 from the device name)",
    )
    add_threads_argument(parser)
    parser.add_argument("--keep-checkpoints", action="store_true", help="also keep RUN_DIR/checkpoint-<step>")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or evaluation lines")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def _train_config(args, train_overrides: list[str], base: TrainConfig | None = None) -> TrainConfig:
    from calm.config import apply_overrides

    cfg = apply_overrides(base or TrainConfig(), train_overrides)
    flags = {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size, "lr": args.lr}
    cfg = cfg.replace(**{k: v for k, v in flags.items() if v is not None})
    if args.compile:
        cfg = cfg.replace(compile=True)
    if getattr(args, "peak_tflops", None) is not None:
        cfg = cfg.replace(peak_tflops=args.peak_tflops)
    return cfg


def _resume_configs(args):
    """(model config, train config) of RUN_DIR/checkpoint; only training fields may change."""
    from calm.checkpoint import load_config, load_train_state, resolve_checkpoint
    from calm.config import apply_overrides, split_overrides
    from calm.train import CHECKPOINT_NAME, TRAIN_CONFIG_FILE

    ckpt = resolve_checkpoint(Path(args.out) / CHECKPOINT_NAME)
    model_cfg = load_config(ckpt)
    try:
        base = TrainConfig.from_dict(json.loads((ckpt / TRAIN_CONFIG_FILE).read_text()))
    except FileNotFoundError:
        base = TrainConfig.from_dict(load_train_state(ckpt)["train_config"])
    model_over, train_over = split_overrides(model_cfg, base, args.overrides)
    wanted = apply_overrides(model_cfg, model_over)  # repeating the original --set values is fine
    changed = [f"{k}={v!r}" for k, v in wanted.to_dict().items() if model_cfg.to_dict()[k] != v]
    if changed:
        raise ConfigError(
            f"cannot change the model config when resuming ({', '.join(changed)}); "
            "start a new run directory instead"
        )
    return model_cfg, _train_config(args, train_over, base)


def _fresh_configs(args, kind: str, tok):
    """(model config, train config) from --preset and --set, with the data's vocabulary and special ids."""
    from calm.config import apply_overrides, preset, split_overrides

    model_cfg = preset(args.preset)
    if model_cfg.kind != kind:
        raise ConfigError(f"preset {args.preset!r} is a {model_cfg.kind} config, not {kind}")
    model_over, train_over = split_overrides(model_cfg, TrainConfig(), args.overrides)
    model_cfg = apply_overrides(model_cfg, model_over)
    set_keys = {o.split("=", 1)[0].strip().replace("-", "_") for o in model_over}
    from_data = {"vocab_size": tok.vocab_size}
    if kind == "autoencoder":
        from_data.update(pad_id=tok.pad_id, mask_id=tok.mask_id, eot_id=tok.eot_id)
    for key, value in from_data.items():
        if key in set_keys and getattr(model_cfg, key) != value:
            raise ConfigError(
                f"--set {key}={getattr(model_cfg, key)} contradicts the data's tokenizer ({key}={value})"
            )
    return model_cfg.replace(**from_data), _train_config(args, train_over)


def _check_lengths(model_cfg, cfg: TrainConfig) -> None:
    chunk = getattr(model_cfg, "chunk_size", 1)
    if cfg.block_size % chunk:
        raise ConfigError(f"block_size {cfg.block_size} must be a multiple of chunk_size {chunk}")
    max_len = getattr(model_cfg, "max_seq_len", None)
    if max_len is not None and cfg.block_size // chunk > max_len:
        raise ConfigError(
            f"block_size {cfg.block_size} needs {cfg.block_size // chunk} positions but "
            f"max_seq_len is {max_len}; raise max_seq_len or lower block_size"
        )


def _finish(args, summary: dict[str, Any]) -> int:
    from calm.distributed import destroy_distributed, is_main_process

    if is_main_process():
        if args.json:
            print(json.dumps(summary))
        else:
            vals = ", ".join(
                f"{k} {v:.4g}"
                for k, v in summary.items()
                if k.startswith("val_") and isinstance(v, (int, float))
            )
            loss = summary.get("loss")
            print(
                f"trained {summary['kind']}: step {summary['step']}/{summary['steps']}, "
                f"{summary['tokens']:,} tokens in {summary['elapsed_s']:.1f}s"
                + (f", train loss {loss:.4g}" if loss is not None else "")
                + (f", {vals}" if vals else "")
            )
            print(f"checkpoint: {summary['checkpoint']}")
            print(f"metrics:    {summary['metrics_file']}")
    destroy_distributed()
    return 0


def _run(args, kind: str, build, initial_weights=None) -> int:
    """Shared body of the two commands: configs, model, train, summary.

    The model is built on the meta device: `train` materialises it (under FSDP2, shard by shard)
    and initialises it from ``cfg.seed``, then copies `initial_weights` in (CALM: its autoencoder).
    """
    import torch

    from calm.checkpoint import load_tokenizer, resolve_checkpoint
    from calm.models import build_model
    from calm.train import CHECKPOINT_NAME, PreparedData, TrainingInterrupted, check_same_tokenizer, train

    data = PreparedData(args.data)
    tok = data.tokenizer()
    if args.resume:
        model_cfg, cfg = _resume_configs(args)
        if getattr(model_cfg, "vocab_size", tok.vocab_size) != tok.vocab_size:
            raise ConfigError(
                f"the checkpoint's vocab_size {model_cfg.vocab_size} differs from the data's "
                f"tokenizer ({tok.vocab_size})"
            )
        ckpt = resolve_checkpoint(Path(args.out) / CHECKPOINT_NAME)
        check_same_tokenizer(
            load_tokenizer(ckpt), tok, f"the checkpoint in {ckpt}", "the checkpoint's", args.data
        )
        build = build_model
    else:
        model_cfg, cfg = _fresh_configs(args, kind, tok)
    _check_lengths(model_cfg, cfg)
    with torch.device("meta"):  # nothing allocated yet; the same initial weights on every rank
        model = build(model_cfg)
    eval_fn = None
    brier_tokens = getattr(args, "brier_tokens", 0)
    if kind in ("ar", "calm") and brier_tokens > 0:
        # BrierLM on the first of the validation-loss windows, logged next to the loss at every
        # evaluation (the same seed each time, so differences between steps are the model's).
        from calm.evaluate import brier_eval_fn

        windows = data.val_windows(cfg.block_size, max(1, brier_tokens // cfg.block_size))
        if len(windows):
            eval_fn = brier_eval_fn(windows, seed=cfg.seed)
    try:
        summary = train(
            model,
            cfg,
            data,
            args.out,
            tokenizer=tok,
            eval_fn=eval_fn,
            resume=args.resume,
            device=args.device,
            strategy=args.strategy,
            quiet=args.quiet,
            keep_checkpoints=args.keep_checkpoints,
            initial_weights=initial_weights,
        )
    except TrainingInterrupted:
        from calm.distributed import destroy_distributed

        destroy_distributed()
        raise
    return _finish(args, summary)


def add_train_ae_arguments(parser) -> None:
    """Options of `calm train-ae`."""
    _add_common_arguments(parser, "ae-cpu", "ae-tiny, ae-cpu, ae-paper")


def run_train_ae(args) -> int:
    from calm.models import build_model

    return _run(args, "autoencoder", build_model)


def add_train_arguments(parser) -> None:
    """Options of `calm train`."""
    parser.add_argument(
        "--model",
        choices=("calm", "ar"),
        default="calm",
        help="calm: CALM on a frozen autoencoder; ar: the token-level Transformer baseline",
    )
    parser.add_argument(
        "--ae",
        metavar="AE_CHECKPOINT_DIR",
        help="trained autoencoder checkpoint (required for --model calm unless --resume)",
    )
    _add_common_arguments(
        parser,
        "",
        "calm-tiny, calm-cpu, calm-m/l/xl; transformer-tiny, transformer-cpu, "
        "transformer-s/m/l; default: calm-cpu or transformer-cpu",
    )
    parser.add_argument(
        "--brier-tokens",
        type=int,
        default=16384,
        metavar="N",
        help="at every evaluation also log BrierLM (Brier-1..4) on the first N validation tokens, "
        "next to the validation loss; 0 turns it off",
    )


def run_train(args) -> int:
    from calm.models import build_model

    if args.model == "ar":
        args.preset = args.preset or "transformer-cpu"
        return _run(args, "ar", build_model)
    args.preset = args.preset or "calm-cpu"
    if args.resume:
        return _run(args, "calm", build_model)
    if not args.ae:
        raise ConfigError(
            "--model calm needs --ae AE_CHECKPOINT_DIR (a trained autoencoder; see `calm train-ae`)"
        )
    from calm.checkpoint import load_model
    from calm.train_data import PreparedData, check_same_tokenizer

    ae = load_model(args.ae)
    if ae.config.kind != "autoencoder":
        raise ConfigError(f"--ae {args.ae} holds a {ae.config.kind} model, not an autoencoder")
    data_tok = PreparedData(args.data).tokenizer()
    if ae.config.vocab_size != data_tok.vocab_size:
        raise ConfigError(
            f"the autoencoder in {args.ae} was trained with a different tokenizer than the data in "
            f"{args.data}; prepare the data with the autoencoder's tokenizer"
        )
    check_same_tokenizer(
        getattr(ae, "tokenizer", None),
        data_tok,
        f"the autoencoder in {args.ae}",
        "the autoencoder's",
        args.data,
    )

    def build(config):  # on the meta device: the trained autoencoder is copied in by `train`
        from calm.models.calm import CALM

        config = config.replace(
            vocab_size=ae.config.vocab_size,
            chunk_size=ae.config.chunk_size,
            latent_dim=ae.config.latent_dim,
            autoencoder=ae.config.to_dict(),
        )
        return CALM(config)

    trained_ae = {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}
    return _run(args, "calm", build, initial_weights=trained_ae)
