"""Checkpoint directories: atomic writes, strict loads, resumable training state.

The public entry point: import checkpoint names from here. The work is done in three modules,
one job each:

* `calm.checkpoint_layout`: the directory format (file names, the COMPLETE marker, the hidden
  ``.tmp`` / ``.old`` siblings) and `CheckpointError`.
* `calm.checkpoint_writing`: atomic saves (`save_checkpoint` and its parts) and the repair of
  what a crash mid-save left behind.
* `calm.checkpoint_reading`: `resolve_checkpoint`, verification against the COMPLETE marker,
  and the loaders (`load_model`, `load_weights`, `load_config`, `load_train_state`, ...).

Sharded (FSDP2) checkpoints are the same directories with DCP shards: `calm.sharded_checkpoint`.
"""

from __future__ import annotations

# The private names are re-exported so that what could be imported from here before the split
# still can (calm.sharded_checkpoint imports _verify_files, _config_and_missing and
# _dedup_state_dict; benchmarks/bench_verify.py _nonfinite_tensors). To patch one (a test), patch
# it in the module that defines it: that is where the functions look it up.
from calm.checkpoint_layout import (  # noqa: F401
    _SIZED_FILES,
    _TMP_NAME,
    COMPLETE_FILE,
    CONFIG_FILE,
    FORMAT,
    TOKENIZER_FILES,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _is_checkpoint_like,
    _siblings,
    is_complete,
)
from calm.checkpoint_reading import (  # noqa: F401
    _MAX_LISTED,
    _config_and_missing,
    _looks_official,
    _missing_fields_note,
    _nonfinite_tensors,
    _read_meta,
    _shared_groups,
    _verify_files,
    checked_weights,
    latest_checkpoint,
    load_config,
    load_model,
    load_tokenizer,
    load_train_state,
    load_weights,
    resolve_checkpoint,
)
from calm.checkpoint_writing import (  # noqa: F401
    _dedup_state_dict,
    _fsync_path,
    _fsync_tree,
    _pid_alive,
    _recover,
    _unwrap,
    abort_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    save_checkpoint,
    write_model_files,
)

__all__ = [
    "COMPLETE_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "TOKENIZER_FILES",
    "TRAIN_STATE_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "abort_checkpoint",
    "begin_checkpoint",
    "checked_weights",
    "commit_checkpoint",
    "is_complete",
    "latest_checkpoint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "load_train_state",
    "load_weights",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_model_files",
]
