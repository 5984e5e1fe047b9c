"""The one training loop, shared by the autoencoder, CALM and the token baseline.

The loop only knows that a model is an ``nn.Module`` with ``.config`` whose ``forward(tokens)``
returns ``(loss, metrics)`` (the same as its ``loss(tokens)``): it calls ``model(tokens)`` so
that a DDP/FSDP wrapper's hooks run. Everything else (optimizer groups, schedule, clipping,
accumulation, evaluation, logging, checkpoints, resume) is driven from here, in one readable
function, from parts with one job each (their names stay importable from here):
`calm.train_optim` (AdamW groups, lr schedule, autocast), `calm.train_state` (RNG states,
initial and resumed weights), `calm.train_data` (`DataSource`, `PreparedData`),
`calm.train_eval` (validation means), `calm.train_log` (metrics.jsonl, messages) and
`calm.train_stop` (errors, signals). The step itself is `calm.train_step.StepRunner`, which
queues it on the device and reads nothing back (non-finite steps are skipped on the device,
metrics accumulate there): the host reads device values only at log, evaluation and save points.

Determinism: the batch of step ``s`` is a pure function of ``(seed, s)`` (`calm.data`), every
random draw of a model comes from torch's global RNG, and checkpoints carry the optimizer,
scheduler and RNG states, so a resumed run continues bit for bit (on CPU) where it stopped.

Stopping: SIGINT (Ctrl-C) or SIGTERM lets the step in progress finish, saves a checkpoint of it,
Stopping (`calm.train_stop`): SIGINT (Ctrl-C) or SIGTERM lets the step in progress finish,
saves a checkpoint of it, and raises `TrainingInterrupted`. Under torchrun the ranks agree on
the step to stop after: once per step, after the step's device work is queued, a MAX all-reduce
of the signal number on a Gloo group (`calm.distributed.agree_max`, a CPU integer: it waits for
the other ranks' hosts, never for a device), so every rank stops after the step during which any
rank got the signal.

One writer per run directory: `train` holds an exclusive lock on ``out_dir/.lock``
(`calm.filesystem.RunDirectoryLock`) from before it reads a checkpoint until it returns.

Test hook: if the environment variable ``CALM_TEST_KILL_AT_STEP=N`` is set, the process
SIGKILLs itself right after finishing step N (after any checkpoint of that step): the resume
tests use it to simulate a crash at a known point.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.checkpoint import (
    CheckpointError,
    is_complete,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from calm.config import ConfigError, TrainConfig
from calm.distributed import DistInfo, agree_max, all_gather_object, barrier, init_distributed
from calm.filesystem import RunDirectoryInUse, RunDirectoryLock
from calm.flops import peak_flops
from calm.parallelize import prepare_model
from calm.train_data import DataSource, PreparedData, check_same_tokenizer  # noqa: F401 (re-exported)
from calm.train_eval import _Averager, _global_means
from calm.train_log import METRICS_FILE, _json_value, _rewrite_metrics, _say, read_metrics  # noqa: F401
from calm.train_optim import autocast_context, build_optimizer, lr_multiplier, param_groups  # noqa: F401
from calm.train_state import (  # noqa: F401 (build_calm_from_autoencoder: re-exported)
    _load_full_weights,
    _load_initial_weights,
    _restore_train_state,
    build_calm_from_autoencoder,
    capture_rng_state,
    restore_rng_state,
    seed_everything,
)
from calm.train_step import DeviceSchedule, StepRunner
from calm.train_stop import TrainingError, TrainingInterrupted, _check_skipped, _StopRequest

KILL_AT_STEP_ENV = "CALM_TEST_KILL_AT_STEP"
CHECKPOINT_NAME = "checkpoint"
TRAIN_CONFIG_FILE = "train_config.json"  # in training checkpoints, beside train_state.pt (cheap to read)


def _loss_callable(wrapped: nn.Module, raw: nn.Module) -> Callable:
    """``model(tokens)`` when the model defines forward (so DDP/FSDP hooks run), else ``loss``."""
    if type(raw).forward is not nn.Module.forward:
        return wrapped
    if wrapped is not raw:
        raise TrainingError(
            f"{type(raw).__name__} must define forward(tokens) returning loss(tokens) to train under DDP/FSDP"
        )
    return raw.loss


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
    initial_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train `model` for ``cfg.steps`` optimizer steps; checkpoints and logs go to `out_dir`.

    model: built as usual, or on the meta device (``with torch.device("meta")`` or
        ``build_model(config, "meta")``): it is then materialised on the device (under FSDP2 each
        rank allocates only its shards) and initialised by its ``init_weights()`` from
        ``cfg.seed``, which gives the weights eager construction after
        ``torch.manual_seed(cfg.seed)`` gives.

    data: a `calm prepare` directory or any `DataSource`.
    tokenizer: saved into every checkpoint so one directory is enough to use the model.
    resume: continue exactly from ``out_dir/checkpoint`` (weights, optimizer, scheduler, step,
        RNG states, metrics log). Without it, an existing checkpoint in `out_dir` is an error.
    eval_fn: ``eval_fn(model, step) -> dict`` called (on every rank, model unwrapped, in eval
        mode, no grad) at each evaluation; its numbers are logged next to the validation loss.
    device: ``None``/"auto" picks this rank's GPU, else CPU. Under torchrun, the process group is
        joined here and the model wrapped with `strategy` ("ddp" or "fsdp"). The group stays up
        (an FSDP2 model needs it for its forward); call `calm.distributed.destroy_distributed()`
        before the process exits, as `calm train` does: a Gloo group left to interpreter
        shutdown can abort a rank ("terminate called without an active exception").
    keep_checkpoints: also keep ``out_dir/checkpoint-<step>`` for every save.
    initial_weights: full tensors by state-dict name copied into the model after it is
        initialised, on a fresh run (e.g. CALM's trained autoencoder, ``autoencoder.*``).

    Under FSDP2 checkpoints are sharded (`calm.sharded_checkpoint`); the one of the last step
    also holds the consolidated model.safetensors.

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
                quiet=quiet, keep_checkpoints=keep_checkpoints, initial_weights=initial_weights,
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
    initial_weights: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """The body of `train`, run with the run directory locked and the stop handlers installed."""
    from calm.sharded_checkpoint import is_sharded, save_sharded

    device, main = info.device, info.is_main
    ckpt_path = out_dir / CHECKPOINT_NAME
    metrics_path = out_dir / METRICS_FILE
    micro = cfg.batch_size // (info.world_size * cfg.grad_accum)  # windows per micro-batch per rank
    raw = model

    # -- state: fresh or resumed ------------------------------------------------------------
    state, found = None, None
    if resume:
        found = resolve_checkpoint(ckpt_path)
        state = load_train_state(found)
    elif is_complete(ckpt_path):
        raise CheckpointError(
            f"{out_dir} already holds a checkpoint; pass --resume to continue it, "
            "or choose another output directory"
        )

    # -- the model on its device(s): checkpointing, compile, FSDP2, meta materialisation -------
    wrapped, sharded, mp_policy, checkpointed = prepare_model(raw, cfg, info, strategy)
    if cfg.activation_checkpointing and not checkpointed and main:
        _say(f"note: {type(raw).__name__} has no Transformer blocks; activation_checkpointing does nothing")
    if resume and not is_sharded(found):
        _load_full_weights(raw, found, sharded)
    elif not resume and initial_weights:
        _load_initial_weights(raw, initial_weights)
    raw.train()
    optimizer = build_optimizer(raw, cfg, device)
    schedule = DeviceSchedule(optimizer, cfg, device)
    loss_call = _loss_callable(wrapped, raw)
    if cfg.compile and not sharded:
        # The whole loss, forward and backward, as one graph. Under DDP the wrapper is compiled
        # (its own Python is not graph-clean under fullgraph, the model inside is): TorchDynamo's
        # DDPOptimizer then splits the backward at gradient buckets, so all-reduces overlap it.
        loss_call = torch.compile(loss_call, fullgraph=wrapped is raw)
    params = [p for p in raw.parameters() if p.requires_grad]
    amp = contextlib.nullcontext() if mp_policy is not None else autocast_context(device, cfg.dtype)
    runner = StepRunner(wrapped, loss_call, optimizer, schedule, params, cfg, device, amp)
    seed_everything(cfg.seed + 1000 * info.rank)  # replaced by the saved RNG state when resuming

    start_step, history, elapsed_before = 0, [], 0.0
    if state is not None:  # optimizer, schedule, skipped-step run, RNG states, step, metrics, time
        start_step, history, elapsed_before = _restore_train_state(
            state, found, raw, optimizer, schedule, runner, cfg, info, sharded
        )
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
    flops_per_token, peak = _train_flops_per_token(raw.config, cfg), peak_flops(device, cfg.peak_tflops)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    last_train, last_val = {}, {}
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
        train_state = {
            "step": step,
            "scheduler": schedule.state_dict(),
            "rng": rngs,
            "train_config": cfg.to_dict(),
            "metrics": history,
            "elapsed_s": elapsed(),
            "bad_steps": runner.streak(),
            "world_size": info.world_size,
        }
        extra = {TRAIN_CONFIG_FILE: cfg.to_json() + "\n"}
        paths = [ckpt_path] + ([out_dir / f"{CHECKPOINT_NAME}-{step}"] if keep_checkpoints else [])
        for path in paths:
            if sharded:  # each rank writes its shards; the last one is also consolidated
                save_sharded(
                    path, raw, optimizer, train_state=train_state, tokenizer=tokenizer,
                    extra_files=extra, consolidate=step == cfg.steps,
                )  # fmt: skip
            elif main:
                save_checkpoint(
                    path, raw, tokenizer=tokenizer, train_state={**train_state, "optimizer": optimizer.state_dict()},
                    extra_files=extra,
                )  # fmt: skip
        if announce and main:  # before the barrier: the line is out before any rank exits
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
            if device.type == "cuda":
                batch = batch.pin_memory()  # an asynchronous copy needs page-locked memory
            runner.run(step, batch.to(device, non_blocking=True))  # queued: nothing is read back
            # Whether any rank was asked to stop: a host-only agreement (Gloo), no device wait.
            stopping = agree_max(stop.signum)
            done = step + 1
            interval_tokens += tokens_per_step
            bar.update(1)

            if done % cfg.log_every == 0 or done == cfg.steps:
                stats = runner.read()  # the one host read of the interval
                now = time.perf_counter()
                _check_skipped(stats, done, cfg, ckpt_path, main)
                tokens_per_s = interval_tokens / max(now - t_interval - paused, 1e-9)
                last_train = {
                    "split": "train",
                    "step": done,
                    **stats.means,
                    "lr": stats.lr,
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": elapsed(),
                    "skipped": stats.skipped,
                }
                postfix = {"tok_s": f"{tokens_per_s:.3g}"}
                if flops_per_token and peak:
                    last_train["mfu"] = flops_per_token * tokens_per_s / (peak * info.world_size)
                    postfix["mfu"] = f"{100 * last_train['mfu']:.1f}%"
                log(last_train)
                if "loss" in stats.means:
                    bar.set_postfix(loss=f"{stats.means['loss']:.4g}", **postfix)
                interval_tokens, t_interval, paused = 0, now, 0.0
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


def _train_flops_per_token(config, cfg: TrainConfig) -> float | None:
    """Training FLOPs per text token (`calm.flops`, at the training window), None if not known."""
    from calm.flops import flops_report

    try:
        context = cfg.block_size // getattr(config, "chunk_size", 1)
        return flops_report(config, context=context)["train_flops_per_token"]
    except (ConfigError, AttributeError, TypeError):
        return None
