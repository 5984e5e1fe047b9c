"""`calm prepare`: text/JSONL documents -> tokenizer -> flat token shards, and reading them back.

Pipeline (everything streams: files are read line by line, documents are tokenized in bounded
batches and appended to the output files, so memory does not grow with the corpus):

1. **Documents.** Plain text files are split into documents by ``doc_split``:
   ``blank`` (a run of blank lines ends a document), ``file`` (one document per file),
   ``wikitext`` (a top-level title line `` = Title = `` with a blank line just before and after
   starts a new article; this gives WikiText-2's 600 training / 60 validation articles, while
   section headings `` = = ... = = `` and legend lines do not split), or ``auto`` (``wikitext``
   for files that look like WikiText, else ``blank``). JSONL files (``.jsonl``/``.json``) hold one
   JSON object per line with the document in a ``text`` field. Directories are searched
   recursively for ``.txt``, ``.jsonl`` and ``.json`` files in sorted order. Line ends are
   normalised to ``\\n``, a UTF-8 BOM is dropped, and a document never ends in a newline.
   Invalid UTF-8 is replaced by U+FFFD and counted (a warning, not an error).
2. **Tokenizer.** Either a byte-level BPE trained on the training documents (streamed into the
   trainer; validation documents are left out) or an existing tokenizer.json / directory.
3. **Shards.** Each document's ids followed by ``eot_id`` are appended to ``train.bin`` or
   ``val.bin``. Output layout of ``OUT/``:

   - ``train.bin``, ``val.bin``: flat arrays of token ids, ``uint16`` when every id fits
     (vocabulary <= 65,536) else ``uint32``, native little-endian, no header (``np.memmap``);
   - ``train_docs.npy``, ``val_docs.npy``: int64 start offset (in tokens) of every document;
   - ``meta.json``: format version, dtype, per-split token and document counts, the tokenizer's
     special ids and vocabulary size, the source files with their bytes, documents, invalid
     UTF-8 replacements and skips, and the options used;
   - ``tokenizer.json`` + ``tokenizer_meta.json`` (:meth:`calm.tokenizer.Tokenizer.save`).

   The directory is built as ``OUT.tmp-<pid>-<random>`` and renamed at the end, so a crash never
   leaves something at ``OUT`` that looks like a complete data set.

Validation split: with ``val_inputs`` those files are the validation set. Otherwise document
``i`` (0-based, counted over all training inputs in order) goes to validation when
``floor((i+1)*f) > floor(i*f)`` for ``f = val_fraction``: every ``1/f``-th document, spread evenly
over the corpus, deterministic. If that picks none (fewer than ``1/f`` documents) the last
document is used, so ``val.bin`` is not empty unless the corpus has a single document.

Training batches (:func:`batch_for_step`) are a pure function of ``(seed, step)``: resuming needs
only the step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calm.tokenizer import Tokenizer, TokenizerError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "calm-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
DOC_SPLITS = ("auto", "blank", "file", "wikitext")

# A WikiText top-level title: " = Title = " (one '=' each side; sections have "= =").
_WIKITEXT_TITLE = re.compile(r"^ = [^=](?:.*[^=])? = $")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()
_NO_ARRAYS = "JSON arrays are not supported; write one JSON object per line (JSONL)"


class DataError(ValueError):
    """Bad input data or a directory that isn't a prepared data set; the message says what and where."""


class DataWarning(UserWarning):
    """Something in the input worth knowing (empty file, invalid UTF-8) that did not stop `prepare`."""


# =============================================================================== reading documents
@dataclass
class SourceStats:
    """What was read from one input file (reported per file in meta.json)."""

    path: str
    split: str
    format: str = "text"
    doc_split: str | None = None
    bytes: int = 0
    documents: int = 0
    invalid_utf8_replacements: int = 0
    skipped_empty_documents: int = 0
    empty: bool = False


@dataclass
class _ReadState:
    """Per-pass counters shared by the readers (bytes for the progress bar)."""

    on_bytes: Callable[[int], None] | None = None
    stats: list[SourceStats] = field(default_factory=list)


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, sorted; .txt/.jsonl/.json) into a file list."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES and not _hidden(p, path)
            )
            if not found:
                raise DataError(f"directory {path} has no .txt, .jsonl or .json files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"input {path} is neither a file nor a directory")
        else:
            raise DataError(f"input not found: {path}")
    if not files:
        raise DataError("no input files given")
    return files


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSON_SUFFIXES


def _read_lines(path: Path, stats: SourceStats, on_bytes: Callable[[int], None] | None) -> Iterator[str]:
    """Decoded lines of ``path`` with ``\\n`` line ends; invalid UTF-8 replaced and counted."""
    pending = 0
    with open(path, "rb") as f:
        first = True
        for raw in f:
            stats.bytes += len(raw)
            pending += len(raw)
            if on_bytes is not None and pending >= 1 << 18:
                on_bytes(pending)
                pending = 0
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                # Genuine U+FFFD characters are the bytes EF BF BD, which always decode as such.
                stats.invalid_utf8_replacements += line.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
            if first:
                first = False
                if line.startswith("\ufeff"):
                    line = line[1:]
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
            elif line.endswith("\r"):
                line = line[:-1] + "\n"
            yield line
    if on_bytes is not None and pending:
        on_bytes(pending)


def _is_blank(line: str) -> bool:
    return not line.strip()


def _finish(lines: list[str]) -> str | None:
    """Join a document's lines: surrounding blank lines dropped, no trailing newline."""
    lo, hi = 0, len(lines)
    while lo < hi and _is_blank(lines[lo]):
        lo += 1
    while hi > lo and _is_blank(lines[hi - 1]):
        hi -= 1
    if lo == hi:
        return None
    text = "".join(lines[lo:hi])
    return text[:-1] if text.endswith("\n") else text


def _split_blank(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if _is_blank(line):
            if buf:
                yield _finish(buf)
                buf = []
        else:
            buf.append(line)
    if buf:
        yield _finish(buf)


def _split_file(lines: Iterable[str]) -> Iterator[str]:
    doc = _finish(list(lines))
    if doc is not None:
        yield doc


def is_wikitext_title(prev: str | None, line: str, nxt: str | None) -> bool:
    """The WikiText article rule: `` = Title = `` with a blank line just before and just after
    (the start of the file counts as blank before; the end of the file does not count after)."""
    return (
        (prev is None or _is_blank(prev))
        and nxt is not None
        and _is_blank(nxt)
        and _WIKITEXT_TITLE.match(line.rstrip("\n")) is not None
    )


def _split_wikitext(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    prev: str | None = None
    it = iter(lines)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        if is_wikitext_title(prev, cur, nxt) and buf:
            doc = _finish(buf)
            if doc is not None:
                yield doc
            buf = []
        buf.append(cur)
        prev, cur = cur, nxt
    doc = _finish(buf)
    if doc is not None:
        yield doc


def looks_like_wikitext(path: Path, max_lines: int = 200) -> bool:
    """WikiText layout: lines start with a space (blank lines are " "), and a top-level title
    with blank lines around it appears near the top."""
    lines: list[str] = []
    with open(path, "rb") as f:
        for raw in itertools.islice(f, max_lines):
            lines.append(raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n"))
    nonempty = [line for line in lines if line]
    if not nonempty:
        return False
    spaced = sum(line.startswith(" ") for line in nonempty) / len(nonempty)
    padded = [None, *lines, None]
    titles = sum(is_wikitext_title(padded[i - 1], padded[i], padded[i + 1]) for i in range(1, len(lines)))
    return spaced >= 0.95 and titles >= 1


def _json_documents(path: Path, lines: Iterable[str], text_field: str, stats: SourceStats) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if _is_blank(line):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == 1 and line.lstrip().startswith("["):
                raise DataError(f"{path}:1: {_NO_ARRAYS}") from None
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            hint = f" ({_NO_ARRAYS})" if isinstance(obj, list) else ""
            raise DataError(
                f"{path}:{lineno}: expected a JSON object with a {text_field!r} field, "
                f"got a JSON {type(obj).__name__}{hint}"
            )
        if text_field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise DataError(
                f"{path}:{lineno}: no {text_field!r} field (keys: {keys}); "
                "choose the field with --text-field / text_field="
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
        if not text.strip():
            stats.skipped_empty_documents += 1
            continue
        yield text


def read_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    doc_split: str = "auto",
    stats: SourceStats | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Stream the documents of one file (see the module docstring for the rules)."""
    path = Path(path)
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}")
    if not path.is_file():
        raise DataError(f"input not found: {path}")
    if stats is None:
        stats = SourceStats(path=str(path), split="train")
    if is_jsonl(path):
        stats.format = "jsonl"
        yield from _json_documents(path, _read_lines(path, stats, on_bytes), text_field, stats)
        return
    mode = doc_split
    if mode == "auto":
        mode = "wikitext" if looks_like_wikitext(path) else "blank"
    stats.doc_split = mode
    splitter = {"blank": _split_blank, "file": _split_file, "wikitext": _split_wikitext}[mode]
    yield from splitter(_read_lines(path, stats, on_bytes))


def _iter_sources(
    files: Sequence[Path],
    split: str,
    *,
    text_field: str,
    doc_split: str,
    state: _ReadState,
    warn: bool,
) -> Iterator[str]:
    """Documents of several files, recording a SourceStats per file (warnings if ``warn``)."""
    for path in files:
        st = SourceStats(path=str(path), split=split)
        state.stats.append(st)
        for doc in read_documents(
            path, text_field=text_field, doc_split=doc_split, stats=st, on_bytes=state.on_bytes
        ):
            st.documents += 1
            yield doc
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


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic validation pick: every 1/f-th document (see module docstring)."""
    if val_fraction <= 0:
        return False
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


# =============================================================================== tokenizing
_WORKER: dict[str, Any] = {}


def _worker_init(tok_json: str, special: dict[str, Any]) -> None:
    _WORKER["tok"] = Tokenizer.from_str(tok_json, **special)


def _encode_docs(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of ``texts`` each followed by eot, and the per-document lengths (eot included)."""
    ids = tok.encode_batch(texts)
    eot = [tok.eot_id]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(zip(ids, itertools.repeat(eot)))),
        dtype=dtype,
        count=int(lengths.sum()),
    )
    return flat, lengths


def _worker_encode(texts: list[str], dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    return _encode_docs(_WORKER["tok"], texts, np.dtype(dtype_name))


class _Encoder:
    """Tokenizes document batches in parallel, results in submission order, bounded in flight.

    ``workers == 0``: the Rust tokenizer's own thread pool (``encode_batch``) on a background
    thread, overlapping with reading. ``workers >= 1``: that many single-threaded processes.
    """

    def __init__(self, tok: Tokenizer, dtype: np.dtype, workers: int):
        self.tok, self.dtype, self.workers = tok, dtype, workers
        self.max_in_flight = max(2, 2 * workers)
        if workers >= 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # Children must not inherit the Rust thread pool (and its fork warning): one thread each.
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about fork() next to native threads (the tokenizer's
                    # pool); the children never use those threads (parallelism is off in them).
                    warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks")
                    self.pool = ctx.Pool(
                        workers, initializer=_worker_init, initargs=(tok.to_str(), tok.special_ids())
                    )
            finally:
                if old is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = old
        else:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1)

    def submit(self, texts: list[str]):
        if self.workers >= 1:
            return self.pool.apply_async(_worker_encode, (texts, self.dtype.name))
        return self.pool.submit(_encode_docs, self.tok, texts, self.dtype)

    @staticmethod
    def result(handle):
        return handle.get() if hasattr(handle, "get") else handle.result()

    def map(self, batches: Iterable[tuple[list[str], Any]]) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        queue: deque = deque()
        for texts, tag in batches:
            queue.append((self.submit(texts), tag))
            if len(queue) >= self.max_in_flight:
                handle, t = queue.popleft()
                yield (*self.result(handle), t)
        while queue:
            handle, t = queue.popleft()
            yield (*self.result(handle), t)

    def close(self) -> None:
        if self.workers >= 1:
            self.pool.terminate()
            self.pool.join()
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _SplitWriter:
    """Appends token chunks to ``<split>.bin`` and records document start offsets."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        self.path = directory / f"{split}.bin"
        self.file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self.dtype = dtype
        self.tokens = 0
        self.offsets = array("q")

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        starts = self.tokens + np.concatenate(([0], np.cumsum(lengths[:-1])))
        self.offsets.extend(starts.tolist())
        flat.astype(self.dtype, copy=False).tofile(self.file)
        self.tokens += int(flat.size)

    @property
    def documents(self) -> int:
        return len(self.offsets)

    def close(self, directory: Path, split: str) -> str:
        self.file.close()
        name = f"{split}_docs.npy"
        np.save(
            directory / name,
            np.frombuffer(self.offsets, dtype=np.int64) if self.offsets else np.zeros(0, np.int64),
        )
        return name


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# =============================================================================== prepare
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
    overwrite: bool = False,
    batch_chars: int = 1 << 19,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files/directories) into a data set at ``out_dir``; return a summary.

    tokenizer: ``None`` trains a byte-level BPE of ``vocab_size`` entries on the training
        documents (at most ``tokenizer_train_bytes`` characters of them when given); a
        :class:`Tokenizer`, a ``tokenizer.json`` or a directory holding one is used as is.
    val_inputs / val_fraction: explicit validation files, or a deterministic fraction of the
        training documents (module docstring).
    workers: 0 tokenizes in this process with the tokenizer's Rust threads, N >= 1 uses N worker
        processes; ``None`` picks the default (:func:`default_workers`).
    overwrite: replace an existing ``out_dir`` (only after the new one is complete).
    progress / log: the tqdm bars (bytes, on stderr) and where status lines go (default: stderr
        when ``progress``, else nowhere). Warnings are :class:`DataWarning` s.

    Raises :class:`DataError` for missing inputs, malformed JSONL, an empty corpus, or an
    ``out_dir`` that exists (without ``overwrite``).
    """
    t_start = time.perf_counter()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_files = resolve_inputs(inputs)
    val_files = resolve_inputs(val_inputs) if val_inputs is not None else []
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
    read_opts = {"text_field": text_field, "doc_split": doc_split}
    total_bytes = sum(p.stat().st_size for p in train_files + val_files)
    train_bytes = sum(p.stat().st_size for p in train_files)

    # ---- 1. tokenizer
    t_tok = time.perf_counter()
    trained = tokenizer is None
    if trained:
        budget = train_bytes if tokenizer_train_bytes is None else min(train_bytes, tokenizer_train_bytes)
        with _bar(progress, budget, "train BPE") as bar:
            state = _ReadState(on_bytes=bar.update)
            use_val_fraction = val_fraction if not val_files else 0.0
            docs = _training_docs(
                _iter_sources(train_files, "train", state=state, warn=False, **read_opts),
                use_val_fraction,
                tokenizer_train_bytes,
            )
            counter = _Counter(docs)
            tok = Tokenizer.train_bpe(counter, vocab_size)
        if counter.n == 0:
            raise DataError(_empty_message(train_files, state.stats))
        tok.source = f"byte-level BPE trained by calm prepare on {counter.n} documents"
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        try:
            tok = Tokenizer.load(tokenizer)
        except TokenizerError as e:
            raise DataError(str(e)) from e
    t_tok = time.perf_counter() - t_tok
    dtype = token_dtype(tok.vocab_size)
    origin = (
        f"trained in {t_tok:.1f} s"
        if trained
        else "given"
        if isinstance(tokenizer, Tokenizer)
        else f"loaded from {tokenizer}"
    )
    log(
        f"tokenizer: vocab {tok.vocab_size:,} ({origin}); "
        f"tokenizing {len(train_files) + len(val_files)} file(s), {total_bytes / 1e6:.1f} MB, "
        f"with {workers or 'in-process threads'} worker(s)"
    )

    # ---- 2. tokenize into a temporary directory
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    t_enc = time.perf_counter()
    state = _ReadState()
    encoder = None
    writers: dict[str, _SplitWriter] = {}
    try:
        writers = {s: _SplitWriter(tmp, s, dtype) for s in SPLITS}
        encoder = _Encoder(tok, dtype, workers)
        with _bar(progress, total_bytes, "tokenize") as bar:
            state.on_bytes = bar.update
            router = _Router(writers, val_fraction if not val_files else 0.0)
            batches = _batches(
                itertools.chain(
                    (
                        (d, "train")
                        for d in _iter_sources(train_files, "train", state=state, warn=True, **read_opts)
                    ),
                    (
                        (d, "val")
                        for d in _iter_sources(val_files, "val", state=state, warn=True, **read_opts)
                    ),
                ),
                batch_chars,
            )
            for flat, lengths, tags in encoder.map(batches):
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
        split_meta = {}
        for split, w in writers.items():
            offsets_file = w.close(tmp, split)
            split_meta[split] = {
                "file": f"{split}.bin",
                "tokens": w.tokens,
                "documents": w.documents,
                "doc_offsets": offsets_file,
            }
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
                "vocab_size_requested": vocab_size if trained else None,
                "tokenizer_train_bytes": tokenizer_train_bytes if trained else None,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "calm_version": _version(),
        }
        # meta.json last: a directory without it is never taken for a data set.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        if encoder is not None:
            encoder.close()
        for w in writers.values():
            if not w.file.closed:
                w.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    summary = {
        "out_dir": str(out_dir),
        **{k: meta[k] for k in ("dtype", "vocab_size", "eot_id", "pad_id", "mask_id", "files", "bytes_read")},
        "splits": {s: {k: v[k] for k in ("tokens", "documents")} for s, v in split_meta.items()},
        "invalid_utf8_replacements": meta["invalid_utf8_replacements"],
        "skipped": meta["skipped"],
        "tokenizer_trained": trained,
        "workers": workers,
        "seconds": round(elapsed, 3),
        "tokenizer_seconds": round(t_tok, 3),
        "tokenize_seconds": round(t_enc, 3),
        "mb_per_s": round(bytes_read / 1e6 / max(elapsed, 1e-9), 3),
        "tokenize_mb_per_s": round(bytes_read / 1e6 / max(t_enc, 1e-9), 3),
    }
    return summary


def default_workers() -> int:
    """Tokenization worker processes used when none are given: one per core but one (the main
    process reads and writes), at least 1, at most 8.

    Measured on a shared 2-core machine (benchmarks/bench_prepare.py, WikiText-2 standard split):
    1 worker process tokenized fastest and with the least CPU per MB; the in-process Rust thread
    pool (``workers=0``) used ~25% more CPU per MB (its idle threads spin) and 2 processes
    oversubscribed the two cores.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary `calm prepare` prints at the end."""
    tr, va = summary["splits"]["train"], summary["splits"]["val"]
    lines = [
        f"prepared {summary['out_dir']}",
        f"  files     {summary['files']} ({summary['bytes_read'] / 1e6:.2f} MB read; "
        f"{summary['skipped']['empty_files']} empty skipped, "
        f"{summary['invalid_utf8_replacements']} invalid UTF-8 replaced)",
        f"  train     {tr['documents']:,} documents, {tr['tokens']:,} tokens",
        f"  val       {va['documents']:,} documents, {va['tokens']:,} tokens",
        f"  tokenizer vocab {summary['vocab_size']:,} ({'trained' if summary['tokenizer_trained'] else 'loaded'}); "
        f"eot={summary['eot_id']} pad={summary['pad_id']} mask={summary['mask_id']}; dtype {summary['dtype']}",
        f"  time      {summary['seconds']:.2f} s ({summary['mb_per_s']:.2f} MB/s overall; "
        f"tokenizer {summary['tokenizer_seconds']:.2f} s, tokenize {summary['tokenize_mb_per_s']:.2f} MB/s)",
    ]
    return "\n".join(lines)


class _Counter:
    def __init__(self, it: Iterable[str]):
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[str]:
        for x in self.it:
            self.n += 1
            yield x


def _training_docs(docs: Iterable[str], val_fraction: float, max_chars: int | None) -> Iterator[str]:
    used = 0
    for i, doc in enumerate(docs):
        if is_val_document(i, val_fraction):
            continue
        yield doc
        used += len(doc)
        if max_chars is not None and used >= max_chars:
            return


def _batches(docs: Iterable[tuple[str, str]], batch_chars: int) -> Iterator[tuple[list[str], list[str]]]:
    texts: list[str] = []
    tags: list[str] = []
    size = 0
    for text, tag in docs:
        texts.append(text)
        tags.append(tag)
        size += len(text)
        if size >= batch_chars:
            yield texts, tags
            texts, tags, size = [], [], 0
    if texts:
        yield texts, tags


class _Router:
    """Sends each tokenized document to its split.

    Training-input documents go to validation by :func:`is_val_document`. The last training
    document is held back until the next one arrives so that, if the fraction picked nothing,
    it can become the validation set instead.
    """

    def __init__(self, writers: dict[str, _SplitWriter], val_fraction: float):
        self.writers = writers
        self.val_fraction = val_fraction
        self.index = 0  # over training-input documents
        self.held: tuple[np.ndarray, np.ndarray] | None = None
        self.picked = 0

    def route(self, flat: np.ndarray, lengths: np.ndarray, tags: list[str]) -> None:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        dest = []
        for source in tags:  # "train": a training input document, "val": a --val document
            tag = source
            if source == "train":
                if is_val_document(self.index, self.val_fraction):
                    tag = "val"
                    self.picked += 1
                self.index += 1
            dest.append(tag)
        # Runs of consecutive documents with the same destination are written in one go.
        i = 0
        n = len(dest)
        while i < n:
            j = i
            while j < n and dest[j] == dest[i]:
                j += 1
            chunk = flat[starts[i] : ends[j - 1]]
            if dest[i] == "train":
                self._flush_held()
                # hold the run's last document back
                self.writers["train"].write(chunk[: starts[j - 1] - starts[i]], lengths[i : j - 1])
                self.held = (flat[starts[j - 1] : ends[j - 1]], lengths[j - 1 : j])
            else:
                self.writers["val"].write(chunk, lengths[i:j])
            i = j

    def _flush_held(self) -> None:
        if self.held is not None:
            self.writers["train"].write(*self.held)
            self.held = None

    def finish(self) -> None:
        if (
            self.held is not None
            and self.val_fraction > 0
            and self.picked == 0
            and self.writers["val"].documents == 0
            and self.writers["train"].documents >= 1
        ):
            self.writers["val"].write(*self.held)
            self.held = None
        self._flush_held()


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


# =============================================================================== reading shards
class TokenShards:
    """One split of a prepared data set, memory-mapped.

    ``tokens`` is a read-only ``np.memmap`` of the flat ids; ``len(shards)`` is the token count;
    ``meta`` is ``meta.json``; ``doc_offsets`` the start of every document.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        meta_path = self.data_dir / META_FILE
        if not self.data_dir.is_dir():
            raise DataError(f"data directory not found: {self.data_dir}")
        if not meta_path.is_file():
            raise DataError(
                f"{self.data_dir} is not a prepared data set (no {META_FILE}); "
                f"create one with `calm prepare FILES --out {self.data_dir}`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != FORMAT_NAME:
            raise DataError(f"{meta_path} is not a calm token data set (format={self.meta.get('format')!r})")
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.data_dir} has no split {split!r} (has: {', '.join(splits)})")
        info = splits[split]
        self.dtype = np.dtype(self.meta["dtype"])
        path = self.data_dir / info["file"]
        n = int(info["tokens"])
        size = path.stat().st_size if path.is_file() else -1
        if size != n * self.dtype.itemsize:
            raise DataError(
                f"{path}: expected {n} {self.dtype.name} tokens ({n * self.dtype.itemsize} bytes), "
                f"found {'no file' if size < 0 else f'{size} bytes'}; the data set is damaged, prepare it again"
            )
        self.path = path
        self.tokens: np.ndarray = (
            np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        )
        self._doc_offsets: np.ndarray | None = None
        self._perm_cache: dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. into DataLoader workers) as the path: the memmap is reopened, not copied.
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return f"TokenShards({str(self.data_dir)!r}, split={self.split!r}, tokens={len(self)}, dtype={self.dtype.name})"

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["splits"][self.split]["documents"])

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start offset (in tokens) of every document of this split."""
        if self._doc_offsets is None:
            name = self.meta["splits"][self.split].get("doc_offsets")
            if not name or not (self.data_dir / name).is_file():
                raise DataError(f"{self.data_dir}: document offsets for {self.split!r} are missing")
            self._doc_offsets = np.load(self.data_dir / name, mmap_mode="r")
        return self._doc_offsets

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (its trailing eot included)."""
        offsets = self.doc_offsets
        end = int(offsets[i + 1]) if i + 1 < len(offsets) else len(self)
        return np.asarray(self.tokens[int(offsets[i]) : end])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer stored with the data set."""
        return Tokenizer.load(self.data_dir)


# =============================================================================== batches
def windows_per_epoch(num_tokens: int, block_size: int, random_offset: bool = False) -> int:
    """Non-overlapping windows of ``block_size`` tokens in one epoch.

    With ``random_offset`` every epoch's windows are shifted by an offset in ``[0, block_size)``,
    so one window fewer fits whatever the offset: the count stays the same in every epoch.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if random_offset:
        return max(0, (num_tokens + 1) // block_size - 1)
    return num_tokens // block_size


def _epoch_order(shards: TokenShards, n: int, block_size: int, seed: int, epoch: int, random_offset: bool):
    key = (n, block_size, seed, epoch, random_offset)
    cache = shards._perm_cache
    hit = cache.get(key)
    if hit is None:
        rng = np.random.Generator(np.random.PCG64([seed, epoch]))
        perm = rng.permutation(n)
        offset = int(rng.integers(block_size)) if random_offset else 0
        hit = (perm, offset)
        if len(cache) >= 3:  # a batch may straddle two epochs; keep a couple
            cache.pop(next(iter(cache)))
        cache[key] = hit
    return hit


def window_starts(
    shards: TokenShards,
    indices: np.ndarray,
    block_size: int,
    seed: int,
    random_offset: bool = False,
) -> np.ndarray:
    """Token start of global window ``indices`` (positions in the concatenated epoch orders)."""
    n = windows_per_epoch(len(shards), block_size, random_offset)
    if n == 0:
        raise DataError(
            f"{shards.data_dir} [{shards.split}] has {len(shards)} tokens, fewer than one window of "
            f"block_size={block_size}{' (+ offset)' if random_offset else ''}; use a smaller block size or more data"
        )
    epochs, pos = np.divmod(np.asarray(indices, dtype=np.int64), n)
    starts = np.empty(len(pos), dtype=np.int64)
    for e in np.unique(epochs):
        perm, offset = _epoch_order(shards, n, block_size, seed, int(e), random_offset)
        sel = epochs == e
        starts[sel] = offset + perm[pos[sel]] * block_size
    return starts


def batch_for_step(
    shards: TokenShards,
    step: int,
    batch_size: int,
    block_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    random_offset: bool = False,
) -> torch.Tensor:
    """The training batch of global step ``step``: a LongTensor ``[batch_size // world_size, block_size]``.

    Epoch ``e`` visits the ``n`` non-overlapping windows (starts at multiples of ``block_size``,
    plus a per-epoch offset if ``random_offset``) in the order of a permutation seeded by
    ``(seed, e)``; the epochs' orders are concatenated and the global batch of step ``s`` is
    windows ``[s*B, (s+1)*B)`` of that sequence. Rank ``r`` of ``world_size`` takes rows
    ``r, r + world_size, ...`` (strided), so the ranks' rows together are exactly the global batch.
    A pure function of ``(seed, step)``: resuming needs only the step. Cost O(B): the current
    epoch's permutation is computed once and cached on ``shards``.
    """
    import torch

    if batch_size < 1 or step < 0:
        raise ValueError(f"need batch_size >= 1 and step >= 0 (got {batch_size}, {step})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    idx = step * batch_size + np.arange(rank, batch_size, world_size, dtype=np.int64)
    starts = window_starts(shards, idx, block_size, seed, random_offset)
    rows = np.stack([shards.tokens[s : s + block_size] for s in starts.tolist()])
    return torch.from_numpy(rows.astype(np.int64))


def eval_windows(
    shards: TokenShards,
    block_size: int,
    max_tokens: int | None = None,
    batch_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows ``[0, T), [T, 2T), ...`` of the split, in order.

    Yields LongTensors ``[block_size]`` (or ``[b, block_size]`` batches of up to ``batch_size``
    windows). ``max_tokens`` caps the tokens covered (the first ``max_tokens // block_size``
    windows); a trailing partial window is dropped.
    """
    import torch

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    total = len(shards) if max_tokens is None else min(len(shards), int(max_tokens))
    n = total // block_size
    step = batch_size or 1
    for i in range(0, n, step):
        j = min(n, i + step)
        arr = np.asarray(shards.tokens[i * block_size : j * block_size]).astype(np.int64)
        t = torch.from_numpy(arr.reshape(j - i, block_size))
        yield t if batch_size else t[0]


# =============================================================================== command line
def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `calm prepare`."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="training text: .txt files, .jsonl/.json files (one JSON object per line), or directories "
        "(searched recursively for those, in sorted order)",
    )
    parser.add_argument(
        "--out", required=True, help="output directory for the token shards, meta.json and tokenizer"
    )
    parser.add_argument(
        "--val",
        nargs="+",
        default=None,
        metavar="INPUT",
        help="explicit validation files/directories (then --val-fraction is not used)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of training documents set aside for validation when --val is not given "
        "(every 1/f-th document; deterministic)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.json, or a directory holding one, to use instead of training a BPE "
        "(e.g. Llama-3's; a pad and a mask token are added if missing)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size of the byte-level BPE to train"
    )
    parser.add_argument(
        "--tokenizer-train-bytes",
        type=int,
        default=None,
        metavar="N",
        help="train the BPE on at most about N characters of training documents (None: all of them)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    parser.add_argument(
        "--doc-split",
        choices=DOC_SPLITS,
        default="auto",
        help="how plain text files split into documents: blank = blank lines separate documents, "
        "file = one document per file, wikitext = WikiText top-level ' = Title = ' lines start articles, "
        "auto = wikitext for files that look like WikiText, else blank",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="tokenization workers: N >= 1 = N single-threaded worker processes (default: cores - 1, "
        "at most 8; measured fastest), 0 = the tokenizer's own Rust threads in this process",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (once the new one is done)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object on stdout (progress and messages go to stderr)",
    )


def run_prepare(args: argparse.Namespace) -> int:
    """`calm prepare`: returns the exit status (errors raise DataError with a readable message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        summary = prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_inputs=args.val,
            val_fraction=args.val_fraction,
            workers=args.workers,
            text_field=args.text_field,
            doc_split=args.doc_split,
            tokenizer_train_bytes=args.tokenizer_train_bytes,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    summary["warnings"] = messages
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0
