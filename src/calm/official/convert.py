"""Public entry points: `load_official` (a release directory -> our model) and `convert_official`
(-> a checkpoint directory of ours)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.config import CALMConfig
from calm.official.build import _load_autoencoder, _load_calm
from calm.official.layout import TOKENIZER_FILE, OfficialFormatError, open_official
from calm.official.tokenizer import _find_tokenizer, load_official_tokenizer

# =============================================================================================
# Public entry points


@dataclass
class LoadReport:
    """What `load_official` did: sources, sizes, notes (printed by the converter)."""

    kind: str
    source: str
    autoencoder_source: str | None
    tokenizer_source: str | None
    files: list[str]
    format: str
    source_bytes: int
    num_tensors: int
    params: int
    dtype: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _load(path, ae_path, tokenizer_path, dtype) -> tuple[nn.Module, LoadReport]:
    path = Path(path)
    ae_path = Path(ae_path) if ae_path is not None else None
    ck = open_official(path)
    notes: list[str] = list(ck.notes)
    if ck.kind == "autoencoder" and ae_path is not None and ae_path.resolve() != path.resolve():
        raise OfficialFormatError(
            f"{path} is itself an autoencoder checkpoint; ae_path is only for CALM models"
        )
    tok_file = Path(tokenizer_path) if tokenizer_path is not None else _find_tokenizer(path, ae_path)
    if tok_file is not None and tok_file.is_dir():
        tok_file = tok_file / TOKENIZER_FILE
    tokenizer = load_official_tokenizer(tok_file) if tok_file is not None else None
    if tokenizer is None:
        notes.append(
            f"no {TOKENIZER_FILE} found: the model has no tokenizer (pass the Llama-3 tokenizer directory)"
        )
    ae_ck = None
    if ck.kind == "autoencoder":
        model = _load_autoencoder(ck, tokenizer, dtype, notes)
        vocab = model.config.vocab_size
    else:
        model, ae_ck = _load_calm(ck, ae_path, tokenizer, dtype, notes)
        vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise OfficialFormatError(
            f"{tok_file} has {tokenizer.vocab_size} entries but the model's vocabulary has {vocab}: "
            "this tokenizer does not belong to the checkpoint"
        )
    model.tokenizer = tokenizer
    first = next(iter(model.parameters()))
    sources = [ck] + ([ae_ck] if ae_ck is not None else [])
    report = LoadReport(
        kind=ck.kind,
        source=str(ck.path),
        autoencoder_source=str(ae_ck.path) if ae_ck is not None else None,
        tokenizer_source=str(tok_file) if tok_file is not None else None,
        files=[str(f) for c in sources for f in c.files],
        format=ck.format,
        source_bytes=sum(c.nbytes for c in sources),
        num_tensors=len(model.state_dict()),
        params=sum(p.numel() for p in model.parameters()),
        dtype=str(first.dtype).replace("torch.", ""),
        notes=notes,
    )
    return model, report


def load_official(
    path: str | Path,
    *,
    ae_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device=None,
    dtype=None,
) -> nn.Module:
    """Our model (a `CALM` with its autoencoder inside, or a `ChunkAutoencoder`) for a release directory.

    ``ae_path``: the autoencoder directory for a CALM checkpoint; by default the checkpoint's own
    ``ae_model.`` copy, or an autoencoder directory beside it named like the config's ``ae_path``
    (or ``CALM-Autoencoder``). ``tokenizer_path``: a ``tokenizer.json`` or its directory; by default
    the one in ``path`` (or in ``ae_path``). The tokenizer is attached as ``model.tokenizer``.
    The weights stay memory-mapped (copy-on-write) unless ``device``/``dtype`` move them.
    """
    model, report = _load(path, ae_path, tokenizer_path, dtype)
    if device is not None:
        model.to(device)
    model.official_load_report = report
    return model.eval()


def convert_official(
    calm_dir: str | Path | None,
    ae_dir: str | Path | None,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Convert a release (CALM + autoencoder, or an autoencoder alone) to a checkpoint of ours.

    Writes ``out_dir`` with `calm.checkpoint.save_checkpoint` (config.json, de-duplicated
    model.safetensors with the autoencoder tie restored, tokenizer files) and returns a summary.
    """
    from calm.checkpoint import save_checkpoint

    log = log or (lambda _msg: None)
    if calm_dir is None and ae_dir is None:
        raise OfficialFormatError(
            "nothing to convert: give a CALM directory, an autoencoder directory, or both"
        )
    source = Path(calm_dir if calm_dir is not None else ae_dir)
    out = Path(out_dir)
    for src in (calm_dir, ae_dir):
        if src is not None and out.resolve() == Path(src).resolve():
            raise OfficialFormatError(f"--out {out} is the source directory; choose a new directory")
    t0 = time.perf_counter()
    log(f"reading {source}" + (f" (autoencoder: {ae_dir})" if calm_dir is not None and ae_dir else ""))
    model, report = _load(source, ae_dir if calm_dir is not None else None, tokenizer_dir, dtype)
    t_load = time.perf_counter() - t0
    log(
        f"mapped {report.num_tensors} tensors, {report.params / 1e6:.1f}M parameters ({report.dtype}) "
        f"from {len(report.files)} file(s), {report.source_bytes / 1e9:.2f} GB"
    )
    for note in report.notes:
        log(f"  note: {note}")
    log(f"writing {out}")
    save_checkpoint(out, model, tokenizer=model.tokenizer)
    elapsed = time.perf_counter() - t0
    out_bytes = (out / "model.safetensors").stat().st_size
    summary = {
        **report.to_dict(),
        "out": str(out),
        "out_bytes": out_bytes,
        "seconds": round(elapsed, 3),
        "seconds_load": round(t_load, 3),
    }
    if isinstance(model.config, CALMConfig):
        summary["autoencoder_params"] = sum(p.numel() for p in model.autoencoder.parameters())
    log(f"done in {elapsed:.1f} s: {out} ({out_bytes / 1e9:.2f} GB); load it with calm.load({str(out)!r})")
    return summary
