"""The one training loop, shared by the autoencoder, CALM and the token baseline.

The loop only knows that a model is an ``nn.Module`` with ``.config`` whose ``forward(tokens)``
returns ``(loss, metrics)`` (the same as its ``loss(tokens)``): it calls ``model(tokens)`` so
that a DDP/FSDP wrapper's hooks run. Everything else (optimizer groups, schedule, clipping,
accumulation, evaluation, logging, checkpoints, resume) lives here, in one readable function.

Determinism: the batch of step ``s`` is a pure function of ``(seed, s)`` (`calm.data`), every
random draw of a model comes from torch's global RNG, and checkpoints carry the optimizer,
scheduler and RNG states, so a resumed run continues bit for bit (on CPU) where it stopped.

Stopping: SIGINT (Ctrl-C) or SIGTERM lets the step in progress finish, saves a checkpoint of it,
and raises `TrainingInterrupted` (the CLI exits 130 / 143, after a line saying where the
checkpoint is); a second signal of the same kind stops at once without saving. Under torchrun
the ranks agree on the step to stop after: the stop request rides on the all-reduce that
already decides, once per step, whether every rank's loss and gradient are finite, so it costs
no extra collective and no extra host sync.

One writer per run directory: `train` holds an exclusive lock on ``out_dir/.lock``
(`calm.filesystem.RunDirectoryLock`) from before it reads a checkpoint until it returns.

Test hook: if the environment variable ``CALM_TEST_KILL_AT_STEP=N`` is set, the process
SIGKILLs itself right after finishing step N (after any checkpoint of that step): the resume
tests use it to simulate a crash at a known point.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from calm.checkpoint import (
    CheckpointError,
    is_complete,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from calm.config import ConfigError, TrainConfig
from calm.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_min,
    barrier,
    gradient_sync,
    init_distributed,
    is_fsdp,
    wrap_model,
)
from calm.filesystem import RunDirectoryInUse, RunDirectoryLock

KILL_AT_STEP_ENV = "CALM_TEST_KILL_AT_STEP"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint"
TRAIN_CONFIG_FILE = "train_config.json"  # in training checkpoints, beside train_state.pt (cheap to read)


class TrainingError(ValueError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving the checkpoint of the last finished step.

    ``signal_name``, ``step``, ``checkpoint`` (path) and ``exit_code`` (128 + signal number:
    130 for SIGINT, 143 for SIGTERM). ``str(err)`` is the line printed for the user.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint, self.exit_code = step, checkpoint, 128 + signum
        super().__init__(
            f"stopped by {self.signal_name} after step {step}: checkpoint saved in {checkpoint}; "
            "continue with --resume"
        )


class _StopRequest:
    """SIGINT/SIGTERM handlers that only record the signal, for the loop to act on at a step boundary.

    Installed only in the main thread (Python delivers signals there). A second signal of the
    kind already received restores the previous handlers and stops at once (KeyboardInterrupt);
    another kind is noted and ignored (Ctrl-C under torchrun sends SIGINT to the workers and the
    agent then SIGTERM: both mean "stop", and saving must go on).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:
            self.restore()
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            os.write(
                2,
                f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                f"(send it again to stop at once without saving)\n".encode(),
            )

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor applied to ``cfg.lr`` for optimizer update number `step` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` (full lr at update ``warmup_steps - 1``), then
    constant, or a half-cosine from lr down to ``min_lr_ratio * lr`` reached at ``cfg.steps``
    and held after.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: decay for matrices, none for vectors/scalars (norms, biases) and embeddings.

    Frozen parameters (``requires_grad=False``, e.g. CALM's autoencoder) are left out. Tied
    parameters appear once (under their first name). lr_scales ({module prefix: factor},
    `TrainConfig.lr_scales`) puts the parameters under each prefix into groups of their own
    with ``lr * factor`` (the schedule multiplies every group's lr alike).
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    scales = lr_scales or {}
    unknown = [p for p in scales if not any(n.startswith(p + ".") for n, _ in model.named_parameters())]
    if unknown:
        raise ConfigError(f"lr_scale names no parameters of {type(model).__name__}: {', '.join(unknown)}")
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or id(p) in embedding_params)
        factor = next((f for prefix, f in scales.items() if name.startswith(prefix + ".")), 1.0)
        groups.setdefault((decay, factor), []).append(p)
    out = []
    for (decay, factor), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if factor != 1.0:
            group["lr"] = lr * factor if lr is not None else None
        out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None):
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scales)
    if not groups:
        raise TrainingError(f"{type(model).__name__} has no trainable parameters")
    kwargs = {"fused": True} if device is not None and device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs)


def build_scheduler(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast for ``dtype="bf16"``, or ``"auto"`` on CUDA; nothing for fp32."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch CPU and CUDA), in a form torch.load(weights_only=True) reads


def capture_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Data


class DataSource(Protocol):
    """What the loop needs from a data set (`PreparedData` wraps `calm prepare` output)."""

    def train_batch(
        self, step: int, batch_size: int, block_size: int, seed: int, rank: int, world_size: int
    ) -> torch.Tensor: ...  # LongTensor [batch_size // world_size, block_size]

    def val_windows(
        self, block_size: int, count: int
    ) -> torch.Tensor: ...  # LongTensor [<= count, block_size]


class PreparedData:
    """A data set written by `calm prepare`: `batch_for_step` for training, the first
    consecutive windows of the validation split for evaluation."""

    def __init__(self, data_dir: str | os.PathLike):
        from calm.data import TokenShards

        self.data_dir = Path(data_dir)
        self.train = TokenShards(self.data_dir, "train")
        try:
            self.val = TokenShards(self.data_dir, "val")
        except ValueError:
            self.val = None

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        from calm.data import batch_for_step

        return batch_for_step(
            self.train, step, batch_size, block_size, seed, rank=rank, world_size=world_size
        )

    def val_windows(self, block_size, count):
        from calm.data import eval_windows

        if self.val is None or count < 1:
            return torch.zeros(0, block_size, dtype=torch.long)
        batches = list(eval_windows(self.val, block_size, max_tokens=count * block_size, batch_size=count))
        return torch.cat(batches) if batches else torch.zeros(0, block_size, dtype=torch.long)

    def tokenizer(self):
        return self.train.tokenizer()

    def check_token_ids(self, vocab_size: int) -> None:
        """A clear error before training if an id is outside the model's vocabulary (`calm.data`)."""
        for split in (self.train, self.val):
            if split is not None:
                split.check_token_ids(min(int(vocab_size), split.vocab_size))


# ---------------------------------------------------------------------------------------------
# The loop


def _loss_callable(wrapped: nn.Module, raw: nn.Module) -> Callable:
    """``model(tokens)`` when the model defines forward (so DDP/FSDP hooks run), else ``loss``."""
    if type(raw).forward is not nn.Module.forward:
        return wrapped
    if wrapped is not raw:
        raise TrainingError(
            f"{type(raw).__name__} must define forward(tokens) returning loss(tokens) to train under DDP/FSDP"
        )
    return raw.loss


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)


def _json_value(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class _Averager:
    """Running sums of scalars (kept as tensors: no device sync until `means`)."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, values: dict[str, Any], weight: float = 1.0) -> None:
        for k, v in values.items():
            v = v.detach().float().mean() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
        self.count += weight

    def lazy_means(self) -> dict[str, Any]:
        """Means as tensors (no device sync)."""
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}

    def means(self) -> dict[str, float]:
        return {k: _scalar(v) for k, v in self.lazy_means().items()}


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def train(
    model: nn.Module,
    cfg: TrainConfig,
    data: str | os.PathLike | DataSource,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    device: str | torch.device | None = None,
    strategy: str = "ddp",
    quiet: bool = False,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Train `model` for ``cfg.steps`` optimizer steps; checkpoints and logs go to `out_dir`.

    data: a `calm prepare` directory or any `DataSource`.
    tokenizer: saved into every checkpoint so one directory is enough to use the model.
    resume: continue exactly from ``out_dir/checkpoint`` (weights, optimizer, scheduler, step,
        RNG states, metrics log). Without it, an existing checkpoint in `out_dir` is an error.
    eval_fn: ``eval_fn(model, step) -> dict`` called (on every rank, model unwrapped, in eval
        mode, no grad) at each evaluation; its numbers are logged next to the validation loss.
    device: ``None``/"auto" picks this rank's GPU, else CPU. Under torchrun, the process group is
        joined here and the model wrapped with `strategy` ("ddp" or "fsdp").
    keep_checkpoints: also keep ``out_dir/checkpoint-<step>`` for every save.

    Returns a summary dict (final step, last train/val losses, tokens, time, checkpoint path).
    Raises `TrainingInterrupted` after saving when SIGINT/SIGTERM stopped the run early, and
    `RunDirectoryInUse` when another live process trains into `out_dir`.
    """
    info: DistInfo = init_distributed(device)
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by world_size x grad_accum "
            f"= {info.world_size} x {cfg.grad_accum}"
        )
    if isinstance(data, (str, os.PathLike)):
        data = PreparedData(data)  # bad data is an error before anything is created in out_dir
    if hasattr(data, "check_token_ids") and hasattr(model.config, "vocab_size"):
        data.check_token_ids(model.config.vocab_size)  # out-of-range ids: an error before training
    if resume:
        resolve_checkpoint(Path(out_dir) / CHECKPOINT_NAME)  # read again below, under the lock
    lock = RunDirectoryLock(out_dir)
    refusal = None
    if info.is_main:
        try:
            lock.acquire()
        except RunDirectoryInUse as err:
            refusal = str(err)
    refusal = all_gather_object(refusal)[0]  # every rank stops if rank 0 could not lock
    if refusal:
        raise RunDirectoryInUse(refusal)
    try:
        with _StopRequest() as stop:
            return _train(
                model, cfg, data, Path(out_dir), info, stop,
                tokenizer=tokenizer, resume=resume, eval_fn=eval_fn, strategy=strategy,
                quiet=quiet, keep_checkpoints=keep_checkpoints,
            )  # fmt: skip
    finally:
        lock.release()


def _train(
    model: nn.Module,
    cfg: TrainConfig,
    data,
    out_dir: Path,
    info: DistInfo,
    stop: _StopRequest,
    *,
    tokenizer,
    resume: bool,
    eval_fn,
    strategy: str,
    quiet: bool,
    keep_checkpoints: bool,
) -> dict[str, Any]:
    """The body of `train`, run with the run directory locked and the stop handlers installed."""
    device, main = info.device, info.is_main
    ckpt_path = out_dir / CHECKPOINT_NAME
    metrics_path = out_dir / METRICS_FILE
    micro = cfg.batch_size // (info.world_size * cfg.grad_accum)  # windows per micro-batch per rank
    raw = model

    # -- state: fresh or resumed ------------------------------------------------------------
    state = None
    if resume:
        found = resolve_checkpoint(ckpt_path)
        state = load_train_state(found)
        load_weights(raw, found)
    elif is_complete(ckpt_path):
        raise CheckpointError(
            f"{out_dir} already holds a checkpoint; pass --resume to continue it, "
            "or choose another output directory"
        )
    seed_everything(cfg.seed + 1000 * info.rank)  # replaced by the saved RNG state when resuming

    raw.to(device)
    raw.train()
    if cfg.compile:
        if type(raw).forward is nn.Module.forward:
            raw.loss = torch.compile(raw.loss)
        else:
            raw.compile()
    wrapped = wrap_model(raw, strategy, device)
    optimizer = build_optimizer(raw, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    loss_call = _loss_callable(wrapped, raw)
    params = [p for p in raw.parameters() if p.requires_grad]

    start_step, history, elapsed_before, bad_steps = 0, [], 0.0, 0
    if state is not None:
        if is_fsdp(raw):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = int(state["step"]), list(state.get("metrics", []))
        elapsed_before, bad_steps = float(state.get("elapsed_s", 0.0)), int(state.get("bad_steps", 0))
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng_state(rngs[info.rank])
        else:
            if main:
                _say(
                    f"note: checkpoint was written by {len(rngs)} process(es), now {info.world_size}: "
                    "RNG streams reseeded, the run will not match an uninterrupted one bit for bit"
                )
            seed_everything(cfg.seed + 1000 * info.rank + 7919 * start_step)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_metrics(metrics_path, history)  # on resume: drop lines logged after the checkpoint

    # -- validation: the first eval_batches x batch_size windows of the val split, fixed for the
    # whole run and independent of world size and accumulation; split across ranks -------------
    val_count = cfg.eval_batches * cfg.batch_size if cfg.eval_every > 0 else 0
    val = data.val_windows(cfg.block_size, val_count) if val_count else torch.zeros(0, cfg.block_size)
    val = val[: len(val) - len(val) % info.world_size][info.rank :: info.world_size]
    if val_count and not len(val) and main:
        _say(
            f"warning: the validation split has fewer than {info.world_size} window(s) of "
            f"{cfg.block_size} tokens (block_size; one per process); validation loss is not computed. "
            "Prepare more validation text (calm prepare --val-fraction) or lower --block-size"
        )

    tokens_per_step = cfg.batch_size * cfg.block_size
    amp = autocast_context(device, cfg.dtype)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    interval, last_train, last_val, skipped = _Averager(), {}, {}, 0
    t_start = t_interval = time.perf_counter()
    interval_tokens, paused = 0, 0.0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def log(record: dict[str, Any]) -> None:
        record = {k: _json_value(v) for k, v in record.items()}
        history.append(record)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step: int) -> dict[str, float]:
        """Mean loss (and model metrics) over the fixed validation windows, plus `eval_fn`."""
        raw.eval()
        avg = _Averager()
        out: dict[str, float] = {}
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)  # the same noise at every evaluation; training RNG untouched
            for batch in val.split(micro) if len(val) else ():
                with amp:
                    loss, metrics = loss_call(batch.to(device))
                avg.add({**metrics, "loss": loss}, weight=len(batch))
            if len(val):
                means = _global_means(avg)
                derived = getattr(raw, "derived_metrics", None)  # e.g. CALM's gap_closed
                means.update(derived(means) if derived is not None else {})
                out = {f"val_{k}": v for k, v in means.items()}
            if eval_fn is not None:
                out.update(eval_fn(raw, step) or {})
        raw.train()
        return out

    def save(step: int, announce: str | None = None) -> None:
        rngs = all_gather_object(capture_rng_state())
        full_sd = None
        if is_fsdp(raw):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_sd = get_model_state_dict(raw, options=opts)
            optim_sd = get_optimizer_state_dict(raw, optimizer, options=opts)
        else:
            optim_sd = optimizer.state_dict()
        if main:
            train_state = {
                "step": step,
                "optimizer": optim_sd,
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "train_config": cfg.to_dict(),
                "metrics": history,
                "elapsed_s": elapsed(),
                "bad_steps": bad_steps,
                "world_size": info.world_size,
            }
            extra = {TRAIN_CONFIG_FILE: cfg.to_json() + "\n"}
            for path in [ckpt_path] + ([out_dir / f"{CHECKPOINT_NAME}-{step}"] if keep_checkpoints else []):
                save_checkpoint(
                    path,
                    raw,
                    tokenizer=tokenizer,
                    train_state=train_state,
                    extra_files=extra,
                    state_dict=full_sd,
                )
            if announce:  # before the barrier: the line is out before any rank exits
                _say(announce)
        barrier()

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=quiet or not main,
        file=sys.stderr,
        dynamic_ncols=True,
        unit="step",
        desc=f"train {raw.config.kind}",
    )
    done, stopped_by = start_step, 0
    try:
        for step in range(start_step, cfg.steps):
            batch = data.train_batch(
                step, cfg.batch_size, cfg.block_size, cfg.seed, info.rank, info.world_size
            )
            batch = batch.to(device, non_blocking=True)
            step_avg, finite = _Averager(), torch.ones((), device=device)
            for i, tokens in enumerate(batch.split(micro)):
                with gradient_sync(wrapped, i == cfg.grad_accum - 1), amp:
                    loss, metrics = loss_call(tokens)
                (loss / cfg.grad_accum).backward()
                finite = finite * torch.isfinite(loss.detach()).float()
                step_avg.add({**metrics, "loss": loss})
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = finite * torch.isfinite(grad_norm).float()
            lr = optimizer.param_groups[0]["lr"]
            # Every rank agrees to step or to skip, and whether to stop after this step: one MIN
            # all-reduce of [finite, -signal number] and one host read, as for the finite flag alone.
            agreed = all_reduce_min(torch.stack([finite, finite.new_full((), -float(stop.signum))]))
            all_finite, stop_signum = agreed.tolist()
            stopping = int(-stop_signum)
            if all_finite > 0:
                optimizer.step()
                scheduler.step()
                bad_steps = 0
                interval.add({**step_avg.lazy_means(), "grad_norm": grad_norm})
            else:
                bad_steps += 1
                skipped += 1
                if main:
                    _say(
                        f"warning: non-finite loss or gradient at step {step + 1}; update skipped "
                        f"({bad_steps} in a row, limit {cfg.max_bad_steps})"
                    )
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{bad_steps} consecutive steps with a non-finite loss or gradient (last at step "
                        f"{step + 1}); aborting. Try a lower learning rate, a smaller grad_clip, or "
                        f"dtype=fp32. The last good checkpoint is in {ckpt_path}"
                    )
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            interval_tokens += tokens_per_step
            bar.update(1)

            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                means = _global_means(interval)
                last_train = {
                    "split": "train",
                    "step": done,
                    **means,
                    "lr": lr,
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": interval_tokens / max(now - t_interval - paused, 1e-9),
                    "elapsed_s": elapsed(),
                    "skipped": skipped,
                }
                log(last_train)
                if "loss" in means:
                    bar.set_postfix(loss=f"{means['loss']:.4g}", tok_s=f"{last_train['tokens_per_s']:.3g}")
                interval, skipped, interval_tokens, t_interval, paused = _Averager(), 0, 0, now, 0.0
            t_pause = time.perf_counter()  # evaluation and saving do not count towards tokens/s
            if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
                last_val = evaluate(done)
                if last_val:
                    log({"split": "val", "step": done, **last_val, "elapsed_s": elapsed()})
                    if main and not quiet:
                        _say(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_val.items()))
            stopped_by = stopping if done < cfg.steps else 0  # the last step: just finish
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == cfg.steps or stopped_by:
                note = str(TrainingInterrupted(stopped_by, done, ckpt_path)) if stopped_by else None
                save(done, announce=note)
            paused += time.perf_counter() - t_pause
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopped_by:
                break
    finally:
        bar.close()
    if stopped_by:
        raise TrainingInterrupted(stopped_by, done, ckpt_path)
    if start_step >= cfg.steps and main:
        _say(f"nothing to do: the checkpoint is already at step {start_step} of {cfg.steps}")
    return {
        "kind": raw.config.kind,
        "step": done,
        "steps": cfg.steps,
        "loss": last_train.get("loss"),
        **last_val,
        "tokens": done * tokens_per_step,
        "elapsed_s": elapsed(),
        "checkpoint": str(ckpt_path),
        "metrics_file": str(metrics_path),
        "world_size": info.world_size,
        "device": str(device),
    }


def _global_means(avg: _Averager) -> dict[str, float]:
    """Means of an averager's scalars over the interval and over all ranks (one all-reduce)."""
    import torch.distributed as dist

    keys = sorted(avg.sums)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return avg.means()
    vec = torch.stack(
        [torch.as_tensor(avg.sums[k]).detach().double().cpu().reshape(()) for k in keys]
        + [torch.tensor(float(avg.count), dtype=torch.float64)]
    )
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    vec = _all_reduce_sum(vec.to(dev)).cpu()
    count = float(vec[-1])
    return {k: float(vec[i]) / count for i, k in enumerate(keys)} if count else {}


def _all_reduce_sum(vec: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return vec


def _rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically replace the metrics log with `records` (empty for a fresh run)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` (train and val lines, in order)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_same_tokenizer(trained_with, data_tok, what: str, whose: str, data_dir) -> None:
    """Refuse data prepared with another tokenizer than the one a model was trained with.

    Compares `Tokenizer.fingerprint` (the tokenizer JSON and the special ids): two tokenizers
    of the same size can still map text to different ids. `what` names the model ("the
    autoencoder in DIR"), `whose` the tokenizer to use ("the autoencoder's").
    """
    if trained_with is None:
        return
    if trained_with.vocab_size != data_tok.vocab_size or trained_with.fingerprint() != data_tok.fingerprint():
        raise ConfigError(
            f"{what} was trained with a different tokenizer than the data in {data_dir}; "
            f"prepare the data with {whose} tokenizer"
        )


def build_calm_from_autoencoder(config, ae: nn.Module) -> nn.Module:
    """A CALM model around the frozen, trained autoencoder `ae`."""
    from calm.models.calm import CALM

    if hasattr(CALM, "from_autoencoder"):
        return CALM.from_autoencoder(config, ae)
    model = CALM(config)
    model.autoencoder.load_state_dict(ae.state_dict())
    model.autoencoder.requires_grad_(False)
    return model
