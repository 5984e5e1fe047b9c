"""Sharded training checkpoints (FSDP2) with `torch.distributed.checkpoint`, and `calm export`.

Under FSDP2 every rank holds a shard of the weights and of the AdamW moments. A checkpoint
keeps them that way: each rank writes its own shard files with `torch.distributed.checkpoint`
(DCP), nothing is gathered onto one rank, and a resume on any number of ranks reads back only
what it needs (DCP reshards on load). The directory is otherwise an ordinary checkpoint
(`calm.checkpoint`)::

    config.json, tokenizer files, train_config.json
    train_state.pt     rank 0: step, schedule, every rank's RNG states, metrics (no optimizer)
    dcp/.metadata      DCP's index (rank 0)
    dcp/__<rank>_<k>.distcp   the shards written by each rank: model and optimizer state
    model.safetensors  only in the checkpoint of the last step: the consolidated model
    COMPLETE           size and SHA-256 of all of the above (each rank hashes its own shards)

The atomic-directory rules are those of `calm.checkpoint`: rank 0 creates the hidden temporary
directory, all ranks write into it, and rank 0 writes the marker and renames it into place
only after every rank has finished, so a half-written checkpoint never loads.

`export_checkpoint` (``calm export CHECKPOINT OUT``, `calm.export_cli`) turns any checkpoint into an inference
checkpoint in the ordinary format (config.json + model.safetensors + tokenizer), reading the
model's entries of the shards on one process; `calm.load` reads a sharded checkpoint directly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from calm.checkpoint import (
    COMPLETE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _verify_files,
    abort_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    load_config,
    load_tokenizer,
    resolve_checkpoint,
    save_checkpoint,
    write_model_files,
)
from calm.distributed import all_gather_object, barrier, get_rank, get_world_size
from calm.filesystem import file_digest

DCP_DIR = "dcp"


def is_sharded(path: str | os.PathLike | None) -> bool:
    """True for a checkpoint directory holding DCP shards."""
    return path is not None and (Path(path) / DCP_DIR / ".metadata").is_file()


def _records(tmp: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    return {f"{DCP_DIR}/{n}": ((tmp / DCP_DIR / n).stat().st_size, file_digest(tmp / DCP_DIR / n)) for n in names}


def save_sharded(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    train_state: dict[str, Any],
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    consolidate: bool = False,
) -> Path:
    """Write a sharded checkpoint of `model` and `optimizer` to `path` (all ranks call it).

    train_state: the host state rank 0 saves in train_state.pt. consolidate: rank 0 also writes
    model.safetensors (the full weights gathered to rank 0's CPU tensor by tensor: the one full
    copy, for the end of training; the optimizer state is never gathered).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    path, rank = Path(path), get_rank()
    tmp, refusal = None, None
    if rank == 0:
        try:
            tmp = begin_checkpoint(path, model)
        except CheckpointError as err:
            refusal = str(err)
    tmp_name, refusal = all_gather_object((str(tmp) if tmp is not None else None, refusal))[0]
    if refusal:  # every rank stops with rank 0's reason
        raise CheckpointError(refusal)
    tmp = Path(tmp_name)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
        mine = sorted(p.name for p in (tmp / DCP_DIR).glob(f"__{rank}_*.distcp"))
        records = {k: v for part in all_gather_object(_records(tmp, mine)) for k, v in part.items()}
        full = None
        if consolidate:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(model, options=options)  # full on rank 0, empty elsewhere
        if rank == 0:
            rest = sorted(p.name for p in (tmp / DCP_DIR).iterdir() if f"{DCP_DIR}/{p.name}" not in records)
            records.update(_records(tmp, rest))  # .metadata, and any file no rank claimed
            write_model_files(tmp, model, tokenizer=tokenizer, train_state=train_state, extra_files=extra_files)
            if full is not None:
                from safetensors.torch import save_file

                from calm.checkpoint import _dedup_state_dict

                save_file(_dedup_state_dict(full), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            commit_checkpoint(tmp, path, records)
    except BaseException as err:
        if rank == 0:
            abort_checkpoint(tmp, path, err)
        raise
    barrier()
    return path


def _verify_shards(path: Path, verify: bool, share: tuple[int, int] = (0, 1)) -> None:
    """Sizes of every file the COMPLETE marker names; SHA-256 (if `verify`) of the shard files
    in this process's `share` (rank, world): the ranks of a job split the hashing."""
    _verify_files(path, verify=False, names=())  # a corrupted marker is an error naming it
    sizes = json.loads((path / COMPLETE_FILE).read_text()).get("sizes") or {}
    names = sorted(n for n in sizes if n.startswith(DCP_DIR + "/"))
    if not names:
        raise CheckpointError(f"{path / COMPLETE_FILE} records no {DCP_DIR}/ files: not a sharded checkpoint")
    rank, world = share
    _verify_files(path, verify=False, names=tuple(names))  # every size
    _verify_files(path, verify=verify, names=tuple(names[rank::world]))  # this process's hashes


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *, verify=True) -> None:
    """Load a sharded checkpoint into `model` and `optimizer` in place (all ranks call it; any
    number of ranks, sharded or not: DCP reads the parts each rank needs). The optimizer's state
    must exist (`calm.train_step.init_optimizer_state`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = resolve_checkpoint(path)
    distributed = dist.is_available() and dist.is_initialized()
    try:
        _verify_shards(path, verify, (get_rank(), get_world_size()))
        error = None
    except CheckpointError as err:
        error = str(err)
    errors = [e for e in all_gather_object(error) if e]
    if errors:  # every rank stops with the same message
        raise CheckpointError(errors[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=not distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _model_from_shards(path: Path, *, verify: bool = True) -> nn.Module:
    """The full model of a sharded checkpoint, on the CPU of this one process (no collective)."""
    import torch.distributed.checkpoint as dcp

    from calm.checkpoint import _config_and_missing
    from calm.models import build_model

    if verify:
        _verify_shards(path, True)
    config, _ = _config_and_missing(path)
    model = build_model(config, device="cpu", init=False)  # every weight is read below
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, on purpose
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=True)  # in place, into the model's tensors
    return model


def load_sharded_model(path: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """The model stored in a sharded checkpoint (eval mode, tokenizer attached), on the CPU."""
    path = resolve_checkpoint(path)
    if not is_sharded(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {DCP_DIR}/.metadata)")
    load_config(path)  # warns about fields its config.json lacks
    model = _model_from_shards(path, verify=verify)
    model.tokenizer = load_tokenizer(path)
    return model.eval()


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Write an inference checkpoint (config.json, model.safetensors, tokenizer) of checkpoint
    `src` to `out`: from its shards if it is sharded, else its weights without the training
    state. Returns a summary (paths, parameters, bytes)."""
    from calm.checkpoint import load_model

    src = resolve_checkpoint(src)
    out = Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CheckpointError(f"the export target {out} must lie outside the checkpoint {src}")
    sharded = is_sharded(src)
    model = load_sharded_model(src, verify=verify) if sharded else load_model(src, verify=verify)
    save_checkpoint(out, model, tokenizer=model.tokenizer)
    return {
        "source": str(src),
        "sharded": sharded,
        "out": str(out),
        "kind": model.config.kind,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": (out / WEIGHTS_FILE).stat().st_size,
    }
