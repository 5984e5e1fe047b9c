"""Building our models on top of a release's memory-mapped tensors (no second copy of the weights)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from calm.config import AutoencoderConfig
from calm.models.layers import reset_buffers, retie, tie_groups
from calm.official.configs import (
    _ID_KEYS,
    _int_or_none,
    autoencoder_config_from_official,
    calm_config_from_official,
)
from calm.official.keymaps import autoencoder_key_map, calm_key_map
from calm.official.layout import (
    _IGNORED_SUFFIXES,
    AE_PREFIX,
    CONFIG_FILE,
    HEAD_PREFIXES,
    OfficialCheckpoint,
    OfficialFormatError,
    _short_list,
    detect_layout,
    open_official,
)

# =============================================================================================
# Building our model on top of memory-mapped tensors


def _target_dtype(tensors: dict[str, torch.Tensor], dtype, notes: list[str]) -> torch.dtype | None:
    if dtype is not None:
        return dtype
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if len(counts) <= 1:
        return next(iter(counts), None)
    chosen = max(counts, key=counts.get)
    notes.append(
        f"mixed weight dtypes {sorted(str(d).replace('torch.', '') for d in counts)}: all cast to "
        f"{str(chosen).replace('torch.', '')}"
    )
    return chosen


def build_from_tensors(
    model_factory: Callable[[], nn.Module],
    state: dict[str, torch.Tensor],
    *,
    origin: dict[str, str],
    path: Path,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a model with `model_factory` on the meta device and assign `state` (our names) into it.

    Building under ``torch.device("meta")`` allocates nothing and draws no random numbers; the
    mapped tensors then become the parameters (``load_state_dict(assign=True)``) and the buffers
    that are functions of the config (rotary tables) are computed on the CPU.
    `origin` maps each of our names to the official name it came from, for error messages.
    Tied parameters stay tied; shapes are checked against the model built from the config.
    """
    with torch.device("meta"):
        model = model_factory()
    expected = model.state_dict(keep_vars=True)
    groups = tie_groups(model)
    state = dict(state)
    # tied names: one provided tensor serves the whole group
    for group in groups:
        provided = [n for n in group if n in state]
        if provided:
            for n in group:
                state.setdefault(n, state[provided[0]])
    unknown = sorted(set(state) - set(expected))
    if unknown:  # our key map names something the model does not have: a bug here, not in the file
        raise RuntimeError(f"calm.official key map out of date with the model: no parameter(s) {unknown}")
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in param_names if n not in state)
    if missing:
        named = [f"{origin[n]} (-> {n})" if n in origin else n for n in missing]
        raise OfficialFormatError(f"{path}: missing tensor(s): {_short_list(named)}")
    bad = []
    for name, t in state.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            bad.append(
                f"{origin.get(name, name)} (-> {name}): expected {want} from the config, found {tuple(t.shape)}"
            )
    if bad:
        raise OfficialFormatError(f"{path}: shape mismatch: " + "; ".join(bad[:12]))
    if dtype is not None:
        state = {
            k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in state.items()
        }
    model.load_state_dict(state, strict=False, assign=True)
    retie(model, groups)  # assign wraps each name in its own Parameter: make each group one again
    reset_buffers(model, "cpu")  # buffers are functions of the config: compute them for real
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise OfficialFormatError(f"{path}: no weights for: {_short_list(left)}")
    if dtype is not None:
        model.to(dtype=dtype)  # buffers (rotary tables) too, as calm.load does; parameters are not copied
    return model


# -- autoencoder -------------------------------------------------------------------------------


def _map_autoencoder(
    tensors: dict[str, torch.Tensor],
    config: AutoencoderConfig,
    *,
    path: Path,
    prefix: str,
    ours: str,
    notes: list[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """(our state, our name -> official name, official names used) for an autoencoder."""
    key_map = autoencoder_key_map(config.num_layers, prefix=prefix, ours=ours)
    emb_key, head_key = prefix + "encoder.embed_tokens.weight", prefix + "decoder.lm_head_weight"
    if head_key in tensors:
        emb, head = tensors[emb_key], tensors[head_key]
        if tuple(head.shape) != tuple(emb.shape):
            raise OfficialFormatError(
                f"{path}: shape mismatch: {head_key} has shape {tuple(head.shape)} but {emb_key} has "
                f"{tuple(emb.shape)}; the output matrix must be the (tied) input embedding"
            )
        same = head.data_ptr() == emb.data_ptr() and head.stride() == emb.stride()
        if not same and not torch.equal(head, emb):
            raise OfficialFormatError(
                f"{path}: {head_key} differs from {emb_key}. The authors' autoencoder ties its output matrix "
                "to the input embedding and so does ours: an untied output matrix cannot be represented, "
                "and converting would silently change the model"
            )
    else:
        notes.append(f"{head_key} absent (safetensors drops tied tensors): tie restored from {emb_key}")
    state, origin = {}, {}
    for src, dst in key_map.items():
        origin[dst] = src
        if src != head_key and src in tensors:  # lm_head.weight is embed.weight (the tie)
            state[dst] = tensors[src]
    return state, origin, set(key_map)


def _unexpected(keys, used: set[str], path: Path, *, ignore_prefixes: tuple[str, ...] = ()) -> None:
    extra = sorted(
        k
        for k in keys
        if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(ignore_prefixes)
    )
    if extra:
        raise OfficialFormatError(
            f"{path}: unexpected tensor(s) the key map does not know: {_short_list(extra)}"
        )


def _load_autoencoder(ck: OfficialCheckpoint, tokenizer, dtype, notes: list[str]) -> nn.Module:
    from calm.models.autoencoder import ChunkAutoencoder

    cfg = autoencoder_config_from_official(
        ck.config, ck.tensors, path=ck.path, tokenizer=tokenizer, notes=notes
    )
    state, origin, used = _map_autoencoder(ck.tensors, cfg, path=ck.path, prefix="", ours="", notes=notes)
    _unexpected(ck.tensors, used, ck.path)
    dtype = _target_dtype(state, dtype, notes)
    return build_from_tensors(lambda: ChunkAutoencoder(cfg), state, origin=origin, path=ck.path, dtype=dtype)


# -- CALM ------------------------------------------------------------------------------------


def _head_prefix(ck: OfficialCheckpoint, notes: list[str]) -> str:
    """The head copy to read; both copies, when present, must be identical."""
    present = [p for p in HEAD_PREFIXES if any(k.startswith(p) for k in ck.tensors)]
    if not present:
        raise OfficialFormatError(
            f"{ck.path}: no generative head: expected tensors under {' or '.join(HEAD_PREFIXES)}"
        )
    if len(present) == 2:
        a, b = HEAD_PREFIXES
        keys_a = {k[len(a) :] for k in ck.tensors if k.startswith(a)}
        keys_b = {k[len(b) :] for k in ck.tensors if k.startswith(b)}
        if keys_a != keys_b:
            diff = sorted(keys_a ^ keys_b)
            raise OfficialFormatError(
                f"{ck.path}: the two head copies {a} and {b} hold different tensors ({_short_list(diff)})"
            )
        for k in sorted(keys_a):
            ta, tb = ck.tensors[a + k], ck.tensors[b + k]
            if ta.shape != tb.shape:
                raise OfficialFormatError(
                    f"{ck.path}: shape mismatch between head copies: {a}{k} {tuple(ta.shape)} vs {b}{k} {tuple(tb.shape)}"
                )
            shared = ta.data_ptr() == tb.data_ptr() and ta.stride() == tb.stride()
            if not shared and not torch.equal(ta, tb):
                raise OfficialFormatError(
                    f"{ck.path}: {a}{k} and {b}{k} differ; in the authors' model they are one module, "
                    "so the checkpoint is inconsistent"
                )
        notes.append(f"head stored twice ({a}, {b}): identical, one copy kept")
    return present[0]


def _find_sibling_autoencoder(ck: OfficialCheckpoint) -> Path | None:
    """An autoencoder directory beside the release: the last part of the config's ``ae_path``,
    then ``CALM-Autoencoder``. Only a plain directory name is taken (never ``..``)."""
    names = []
    ae_path = ck.config.get("ae_path")
    if isinstance(ae_path, str) and ae_path.strip("/"):
        name = Path(ae_path.rstrip("/")).name
        if name in ("", ".", ".."):
            raise OfficialFormatError(
                f"{ck.path / CONFIG_FILE}: ae_path {ae_path!r} does not end in a directory name (its last "
                f"part is {name!r}), so it names no sibling of {ck.path}; pass the autoencoder directory "
                "with --ae AE_DIR (ae_path=AE_DIR)"
            )
        names.append(name)
    names.append("CALM-Autoencoder")
    for name in names:
        cand = ck.path.parent / name
        if cand.resolve() == ck.path.resolve() or not (cand / CONFIG_FILE).is_file():
            continue
        try:
            if detect_layout(cand) == "autoencoder":
                return cand
        except OfficialFormatError:
            continue
    from calm.hub import cached_sibling  # a release in the Hub cache: OWNER/<name> cached beside it

    for name in names:
        cand = cached_sibling(ck.path, name)
        try:
            if cand is not None and detect_layout(cand) == "autoencoder":
                return cand
        except OfficialFormatError:
            continue
    return None


def _load_calm(
    ck: OfficialCheckpoint, ae_path: Path | None, tokenizer, dtype, notes: list[str]
) -> tuple[nn.Module, OfficialCheckpoint | None]:
    from calm.models.calm import CALM

    has_copy = any(k.startswith(AE_PREFIX) for k in ck.tensors)
    if ae_path is None and not has_copy:
        ae_path = _find_sibling_autoencoder(ck)
        if ae_path is not None:
            notes.append(f"autoencoder found beside the checkpoint: {ae_path}")
    ae_ck = None
    if ae_path is not None:
        ae_ck = open_official(ae_path)
        if ae_ck.kind != "autoencoder":
            raise OfficialFormatError(
                f"{ae_path} is a CALM checkpoint, not an autoencoder (given as the autoencoder)"
            )
        ae_tensors, ae_raw, prefix, where = ae_ck.tensors, ae_ck.config, "", ae_ck.path
        if has_copy:
            notes.append(
                f"the checkpoint's own {AE_PREFIX} copy is ignored: using the autoencoder in {ae_path}"
            )
    elif has_copy:
        ae_tensors, ae_raw, prefix, where = ck.tensors, {}, AE_PREFIX, ck.path
        notes.append(f"autoencoder taken from the checkpoint's {AE_PREFIX} copy")
    else:
        raise OfficialFormatError(
            f"{ck.path} is a CALM checkpoint without its autoencoder (no {AE_PREFIX} tensors, and "
            f"ae_path={ck.config.get('ae_path')!r} in its config points to the authors' machine). Pass the "
            "autoencoder directory: `--ae AE_DIR` to calm generate / calm eval, "
            "`calm convert-official --calm DIR --ae AE_DIR --out OUT`, or "
            "calm.official.load_official(DIR, ae_path=AE_DIR)"
        )
    # The special ids the model generates with come from the release's configs whichever way
    # the autoencoder is found: the CALM config's, else the autoencoder config's.
    calm_ids = {k: ck.config[k] for k in _ID_KEYS if _int_or_none(ck.config.get(k)) is not None}
    differ = [
        f"{k} {ck.config[k]} (CALM config) vs {ae_raw[k]} (autoencoder config)"
        for k in calm_ids
        if _int_or_none(ae_raw.get(k)) is not None and _int_or_none(ae_raw[k]) != _int_or_none(calm_ids[k])
    ]
    if differ and tokenizer is None:
        notes.append("the configs disagree on " + "; ".join(differ) + ": the CALM config's ids are used")
    ae_cfg = autoencoder_config_from_official(
        ae_raw, ae_tensors, path=where, tokenizer=tokenizer, notes=notes, prefix=prefix, special_ids=calm_ids
    )
    head_prefix = _head_prefix(ck, notes)
    cfg = calm_config_from_official(ck.config, ck.tensors, ae_cfg, path=ck.path, head_prefix=head_prefix)
    key_map = calm_key_map(cfg.num_layers, cfg.num_head_layers, head_prefix=head_prefix)
    state, origin = {}, {}
    for src, dst in key_map.items():
        origin[dst] = src
        if src in ck.tensors:
            state[dst] = ck.tensors[src]
    ae_state, ae_origin, ae_used = _map_autoencoder(
        ae_tensors, ae_cfg, path=where, prefix=prefix, ours="autoencoder.", notes=notes
    )
    state.update(ae_state)
    origin.update(ae_origin)
    other_head = tuple(p for p in HEAD_PREFIXES if p != head_prefix)
    ignore = other_head + ((AE_PREFIX,) if prefix == "" else ())
    _unexpected(ck.tensors, set(key_map) | (ae_used if prefix else set()), ck.path, ignore_prefixes=ignore)
    if ae_ck is not None:
        _unexpected(ae_ck.tensors, ae_used, ae_ck.path)
    dtype = _target_dtype(state, dtype, notes)
    model = build_from_tensors(lambda: CALM(cfg), state, origin=origin, path=ck.path, dtype=dtype)
    return model, ae_ck
