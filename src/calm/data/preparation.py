"""`calm prepare`: documents -> tokenizer -> token shards, streaming with bounded memory.

1. **Documents** from every input (`calm.data.formats`), in order.
2. **Tokenizer**: a byte-level BPE trained on the training documents (streamed into the trainer;
   validation documents are left out), or an existing tokenizer.json / directory.
3. **Shards**: documents are tokenized in batches by worker processes (`calm.data.encode`); each
   document's ids followed by ``eot_id`` go to the training or the validation split
   (`calm.data.writer`: numbered shards of at most ``shard_bytes``). The directory is built as
   ``OUT.tmp-<pid>-<random>`` and renamed at the end (``meta.json`` written last), so a crash or
   a full disk never leaves something at ``OUT`` that looks like a complete data set, and an
   ``OUT`` being replaced (``overwrite``) is kept until the new one is complete.

Validation split: with ``val_inputs`` those inputs are the validation set. Otherwise document
``i`` (0-based, counted over all training inputs in order) goes to validation when
``floor((i+1)*f) > floor(i*f)`` for ``f = val_fraction``: every ``1/f``-th whole document, spread
evenly over the corpus, deterministic. If that picks none (fewer than ``1/f`` documents) the last
document is used, so the validation split is not empty unless the corpus has a single document.

``max_tokens``: reading the training inputs stops after the document that brings the training
split to ``max_tokens`` tokens (documents are kept whole); ``val_inputs`` are still read in full.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calm.data.encode import BATCH_CHARS, Encoder, default_workers, text_batches, token_dtype
from calm.data.errors import DataError, DataWarning, DiskFullError, is_disk_full, writing
from calm.data.formats import SourceStats, input_bytes, read_documents, resolve_inputs
from calm.data.routing import Router, training_docs
from calm.data.shards import DEFAULT_SHARD_BYTES, FORMAT_NAME, FORMAT_VERSION, META_FILE, SPLITS
from calm.data.text import DOC_SPLITS
from calm.data.writer import ShardWriter, write_bytes
from calm.tokenizer import Tokenizer, TokenizerError


@dataclass
class _ReadState:
    """Per-pass counters shared by the readers (bytes for the progress bar)."""

    on_bytes: Callable[[int], None] | None = None
    stats: list[SourceStats] = field(default_factory=list)


def _iter_sources(
    files: Sequence[Path],
    split: str,
    *,
    read_opts: dict[str, Any],
    state: _ReadState,
    warn: bool,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Documents of several inputs, recording a SourceStats per input (warnings if ``warn``);
    ``stop()`` ends the stream early (checked between documents)."""
    for path in files:
        if stop():
            return
        st = SourceStats(path=str(path), split=split)
        state.stats.append(st)
        for doc in read_documents(path, stats=st, on_bytes=state.on_bytes, **read_opts):
            st.documents += 1
            yield doc
            if stop():
                break
        if st.bytes == 0 or st.documents == 0:
            st.empty = True
            if warn:
                what = "empty" if st.bytes == 0 else "has no documents (only blank lines / empty texts)"
                warnings.warn(f"{path}: {what}; skipped", DataWarning, stacklevel=2)
        if st.invalid_utf8_replacements and warn:
            warnings.warn(
                f"{path}: {st.invalid_utf8_replacements} invalid UTF-8 sequence(s) replaced by U+FFFD",
                DataWarning,
                stacklevel=2,
            )


def _empty_message(files: Sequence[Path], stats: Sequence[SourceStats], what: str = "") -> str:
    names = ", ".join(str(p) for p in files[:5]) + (" ..." if len(files) > 5 else "")
    empty = sum(s.empty for s in stats)
    return f"empty {what}corpus: no documents (so no tokens) in {names}" + (
        f"; {empty} of {len(stats)} file(s) empty or blank" if stats else ""
    )


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an old ``out_dir`` is removed only afterwards."""
    if out_dir.exists():
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, out_dir)


def _version() -> str:
    try:
        from calm import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False
    )


class _Counter:
    def __init__(self, it: Iterable[str]):
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[str]:
        for x in self.it:
            self.n += 1
            yield x


def _get_tokenizer(
    tokenizer, train_files, *, vocab_size, val_fraction, tokenizer_train_bytes, read_opts, progress
):
    """(tokenizer, trained?, seconds): train a BPE on the training documents or load the given one."""
    t0 = time.perf_counter()
    if tokenizer is None:
        train_bytes = sum(input_bytes(p) for p in train_files)
        budget = train_bytes if tokenizer_train_bytes is None else min(train_bytes, tokenizer_train_bytes)
        with _bar(progress, budget, "train BPE") as bar:
            state = _ReadState(on_bytes=bar.update)
            docs = training_docs(
                _iter_sources(train_files, "train", read_opts=read_opts, state=state, warn=False),
                val_fraction,
                tokenizer_train_bytes,
            )
            counter = _Counter(docs)
            tok = Tokenizer.train_bpe(counter, vocab_size)
        if counter.n == 0:
            raise DataError(_empty_message(train_files, state.stats))
        tok.source = f"byte-level BPE trained by calm prepare on {counter.n} documents"
        return tok, True, time.perf_counter() - t0
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, False, 0.0
    try:
        return Tokenizer.load(tokenizer), False, time.perf_counter() - t0
    except TokenizerError as e:
        raise DataError(str(e)) from e


def prepare(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    vocab_size: int = 8192,
    val_inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    val_fraction: float = 0.01,
    workers: int | None = None,
    text_field: str = "text",
    doc_split: str = "auto",
    tokenizer_train_bytes: int | None = None,
    max_tokens: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_binary: bool = False,
    overwrite: bool = False,
    batch_chars: int = BATCH_CHARS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files/directories, any format of `calm.data.formats`) into a data set
    at ``out_dir``; return a summary.

    tokenizer: ``None`` trains a byte-level BPE of ``vocab_size`` entries on the training
        documents (at most ``tokenizer_train_bytes`` characters of them when given); a
        :class:`Tokenizer`, a ``tokenizer.json`` or a directory holding one is used as is.
    val_inputs / val_fraction: explicit validation inputs, or a deterministic fraction of the
        training documents (module docstring).
    workers: 0 tokenizes in this process with the tokenizer's Rust threads, N >= 1 uses N worker
        processes; ``None`` picks the default (:func:`default_workers`).
    max_tokens: stop reading training inputs once the training split has this many tokens.
    shard_bytes: largest size of one token shard file (1 GiB by default).
    allow_binary: read text inputs that look binary instead of refusing them.
    overwrite: replace an existing ``out_dir`` (only after the new one is complete).
    progress / log: the tqdm bars (bytes, on stderr) and where status lines go (default: stderr
        when ``progress``, else nowhere). Warnings are :class:`DataWarning` s.

    Raises :class:`DataError` for missing or bad inputs, an empty corpus, a full disk, or an
    ``out_dir`` that exists (without ``overwrite``).
    """
    t_start = time.perf_counter()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
    train_files = resolve_inputs(inputs, "train")
    val_files = resolve_inputs(val_inputs, "val") if val_inputs is not None else []
    both = {p.resolve() for p in train_files} & {p.resolve() for p in val_files}
    if both:
        raise DataError(
            f"file(s) given both as training and validation input: {', '.join(map(str, sorted(both)))}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output {out_dir} already exists; choose another --out or pass --overwrite")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    read_opts = {"text_field": text_field, "doc_split": doc_split, "allow_binary": allow_binary}
    total_bytes = sum(input_bytes(p) for p in train_files + val_files)
    use_val_fraction = val_fraction if not val_files else 0.0

    tok, trained, t_tok = _get_tokenizer(
        tokenizer,
        train_files,
        vocab_size=vocab_size,
        val_fraction=use_val_fraction,
        tokenizer_train_bytes=tokenizer_train_bytes,
        read_opts=read_opts,
        progress=progress,
    )
    dtype = token_dtype(tok.vocab_size)
    shard_tokens = max(1, int(shard_bytes) // dtype.itemsize)
    origin = (
        f"trained in {t_tok:.1f} s"
        if trained
        else "given"
        if isinstance(tokenizer, Tokenizer)
        else f"loaded from {tokenizer}"
    )
    log(
        f"tokenizer: vocab {tok.vocab_size:,} ({origin}); "
        f"tokenizing {len(train_files) + len(val_files)} input(s), {total_bytes / 1e6:.1f} MB on disk, "
        f"with {workers or 'in-process threads'} worker(s)"
    )

    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    t_enc = time.perf_counter()
    state = _ReadState()
    encoder = None
    writers: dict[str, ShardWriter] = {}
    try:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        encoder = Encoder(tok, dtype, workers)
        router = Router(writers, use_val_fraction, max_tokens)
        with _bar(progress, total_bytes, "tokenize") as bar:
            state.on_bytes = bar.update
            train_docs = _iter_sources(
                train_files, "train", read_opts=read_opts, state=state, warn=True, stop=lambda: router.full
            )
            val_docs = _iter_sources(val_files, "val", read_opts=read_opts, state=state, warn=True)
            docs = itertools.chain(((d, "train") for d in train_docs), ((d, "val") for d in val_docs))
            for flat, lengths, tags in encoder.map(text_batches(docs, batch_chars)):
                router.route(flat, lengths, tags)
            router.finish()
        encoder.close()
        encoder = None
        t_enc = time.perf_counter() - t_enc
        if writers["train"].documents == 0:
            raise DataError(_empty_message(train_files, [s for s in state.stats if s.split == "train"]))
        if val_files and writers["val"].documents == 0:
            raise DataError(
                _empty_message(val_files, [s for s in state.stats if s.split == "val"], "validation ")
            )
        split_meta = {split: w.close() for split, w in writers.items()}
        tok.save(tmp)
        bytes_read = sum(s.bytes for s in state.stats)
        elapsed = time.perf_counter() - t_start
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "pad_id": tok.pad_id,
            "mask_id": tok.mask_id,
            "shard_bytes": shard_tokens * dtype.itemsize,
            "splits": split_meta,
            "tokenizer": {
                **tok.meta(),
                "trained": trained,
                "files": ["tokenizer.json", "tokenizer_meta.json"],
            },
            "sources": [asdict(s) for s in state.stats],
            "files": len(state.stats),
            "bytes_read": bytes_read,
            "invalid_utf8_replacements": sum(s.invalid_utf8_replacements for s in state.stats),
            "skipped": {
                "empty_files": sum(s.empty for s in state.stats),
                "empty_documents": sum(s.skipped_empty_documents for s in state.stats),
            },
            "options": {
                "val_fraction": val_fraction if not val_files else None,
                "val_inputs": [str(p) for p in val_files] or None,
                "doc_split": doc_split,
                "text_field": text_field,
                "max_tokens": max_tokens,
                "stopped_at_max_tokens": router.full,
                "vocab_size_requested": vocab_size if trained else None,
                "tokenizer_train_bytes": tokenizer_train_bytes if trained else None,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "calm_version": _version(),
        }
        # meta.json last: a directory without it is never taken for a data set.
        with writing(tmp / META_FILE), open(tmp / META_FILE, "wb") as f:
            write_bytes(f, (json.dumps(meta, indent=2) + "\n").encode())
        _replace_dir(tmp, out_dir)
    except BaseException as err:
        if encoder is not None:
            encoder.close()
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, DiskFullError) or is_disk_full(err):
            what = (
                str(err)
                if isinstance(err, DiskFullError)
                else f"{err.filename or tmp}: no space left on device"
            )
            kept = " (the data set already there is unchanged)" if out_dir.exists() else ""
            raise DiskFullError(f"{what}; nothing was written to {out_dir}{kept}") from None
        raise

    tokens_total = sum(v["tokens"] for v in split_meta.values())
    return {
        "out_dir": str(out_dir),
        **{k: meta[k] for k in ("dtype", "vocab_size", "eot_id", "pad_id", "mask_id", "files", "bytes_read")},
        "splits": {
            s: {"tokens": v["tokens"], "documents": v["documents"], "shards": len(v["shards"])}
            for s, v in split_meta.items()
        },
        "shard_bytes": meta["shard_bytes"],
        "invalid_utf8_replacements": meta["invalid_utf8_replacements"],
        "skipped": meta["skipped"],
        "stopped_at_max_tokens": router.full,
        "tokenizer_trained": trained,
        "workers": workers,
        "seconds": round(elapsed, 3),
        "tokenizer_seconds": round(t_tok, 3),
        "tokenize_seconds": round(t_enc, 3),
        "mb_per_s": round(bytes_read / 1e6 / max(elapsed, 1e-9), 3),
        "tokenize_mb_per_s": round(bytes_read / 1e6 / max(t_enc, 1e-9), 3),
        "tokens_per_s": round(tokens_total / max(t_enc, 1e-9), 1),
    }
