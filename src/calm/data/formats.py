"""Input formats of `calm prepare` / `calm eval`: finding input files and streaming their documents.

Formats (recognised by name; a file named explicitly with another name is read as plain text):

* plain text ``.txt`` — split into documents by ``doc_split`` (`calm.data.text`);
* JSONL ``.jsonl`` / ``.json`` — one JSON object per line, the document in ``text_field``
  (other fields, e.g. the Pile's ``meta``, are ignored);
* either of them compressed: ``.gz`` (gzip, `gzip`), ``.zst`` / ``.zstd`` (Zstandard, the Pile's
  ``*.jsonl.zst``; needs ``zstandard``);
* ``.parquet`` — the ``text_field`` column, row group by row group (needs ``pyarrow``);
* ``.arrow`` — an Arrow IPC stream or file, e.g. one shard of a Hugging Face dataset (``pyarrow``);
* a Hugging Face ``datasets`` directory written by ``save_to_disk``: ``state.json`` names its
  ``.arrow`` shards in order. A ``DatasetDict`` directory (``dataset_dict.json``) gives its
  ``train`` split for training inputs and ``validation``/``valid``/``val`` for ``--val`` inputs
  (name a split's directory to choose another).

Directories are searched recursively (hidden entries skipped) for those files and dataset
directories, in sorted path order. Everything streams with bounded memory: compressed files are
decompressed in 1 MiB pieces, Parquet is read one batch of rows at a time, Arrow batches are
memory-mapped. Bad input (invalid JSON, a missing text field or column, a truncated or corrupt
archive, a binary file) raises `DataError` naming the file and the line or row.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from calm.data.errors import DataError
from calm.data.paths import resolve_member
from calm.data.streams import corrupt_types, open_binary, raw_lines, sniff_binary
from calm.data.tables import HF_STATE, arrow_documents, hf_dataset_files, parquet_documents
from calm.data.text import (
    BINARY_THRESHOLD,
    DOC_SPLITS,
    SNIFF_BYTES,
    SPLITTERS,
    decode_lines,
    is_blank,
    wikitext_layout,
)

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
HF_DICT = "dataset_dict.json"
VAL_SPLIT_NAMES = ("validation", "valid", "val")
_NO_ARRAYS = "JSON arrays are not supported; write one JSON object per line (JSONL)"


@dataclass
class SourceStats:
    """What was read from one input (reported per input in meta.json)."""

    path: str
    split: str
    format: str = "text"
    compression: str | None = None
    doc_split: str | None = None
    bytes: int = 0  # text bytes read (after decompression)
    file_bytes: int = 0  # size on disk
    documents: int = 0
    invalid_utf8_replacements: int = 0
    skipped_empty_documents: int = 0
    empty: bool = False


# ------------------------------------------------------------------------------- which format
def input_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) of an input: format is text, jsonl, parquet, arrow or hf-dataset."""
    if path.is_dir():
        if (path / HF_STATE).is_file():
            return "hf-dataset", None
        if (path / HF_DICT).is_file():
            return "hf-dataset-dict", None
        return "directory", None
    name = path.name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if compression is None:
        for suffix in TABLE_SUFFIXES:
            if name.endswith(suffix):
                return suffix[1:], None
    if name.endswith(JSON_SUFFIXES):
        return "jsonl", compression
    return "text", compression


def _recognised(path: Path) -> bool:
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            return name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)
    return name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES)


def _dict_split(path: Path, role: str) -> Path:
    """The split directory of a DatasetDict that serves as training (or validation) input."""
    try:
        splits = json.loads((path / HF_DICT).read_text()).get("splits") or []
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path / HF_DICT}: unreadable ({e})") from None
    wanted = ("train",) if role == "train" else VAL_SPLIT_NAMES
    for name in wanted:
        if name in splits:
            return resolve_member(path, name, f"{HF_DICT} split")
    raise DataError(
        f"{path} is a datasets DatasetDict with splits {', '.join(map(repr, splits)) or 'none'} but no "
        f"{' / '.join(map(repr, wanted))} split; give the split's directory ({path}/SPLIT) instead"
    )


def resolve_inputs(
    inputs: str | os.PathLike | Iterable[str | os.PathLike], role: str = "train"
) -> list[Path]:
    """Expand files and directories into the list of inputs to read, in order.

    A directory is searched recursively (sorted, hidden entries skipped) for the recognised
    formats; a ``datasets`` directory counts as one input (a DatasetDict as its ``role`` split).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input not found: {path}")
        kind = input_format(path)[0]
        if kind == "hf-dataset":
            files.append(path)
        elif kind == "hf-dataset-dict":
            files.append(_dict_split(path, role))
        elif kind == "directory":
            found = _search(path, role)
            if not found:
                raise DataError(
                    f"directory {path} has no .txt, .jsonl or .json files (plain, .gz or .zst), "
                    ".parquet / .arrow files or datasets directories"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} is neither a file nor a directory")
    if not files:
        raise DataError("no input files given")
    return files


def _search(root: Path, role: str) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if here != root:
            kind = input_format(here)[0]
            if kind in ("hf-dataset", "hf-dataset-dict"):
                found.append(here if kind == "hf-dataset" else _dict_split(here, role))
                dirnames[:] = []
                continue
        found.extend(
            here / f
            for f in filenames
            if not f.startswith(".") and _recognised(here / f) and (here / f).is_file()
        )
    return sorted(found)


def looks_like_wikitext(path: str | os.PathLike, max_lines: int = 200) -> bool:
    """Whether a text file (plain or compressed) has WikiText's layout (see `calm.data.text`)."""
    path = Path(path)
    with open_binary(path, input_format(path)[1]) as stream:
        try:
            return wikitext_layout(itertools.islice(stream, max_lines))
        except corrupt_types():
            return False  # reading it for real gives the error


# ------------------------------------------------------------------------------- documents
def _json_documents(path: Path, lines: Iterable[str], text_field: str, stats: SourceStats) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if is_blank(line):
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


def input_bytes(path: Path) -> int:
    """Bytes on disk of an input (all shards of a datasets directory)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in hf_dataset_files(path))
    return path.stat().st_size


def read_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    doc_split: str = "auto",
    stats: SourceStats | None = None,
    on_bytes: Callable[[int], None] | None = None,
    allow_binary: bool = False,
) -> Iterator[str]:
    """Stream the documents of one input (a file or a ``datasets`` directory; module docstring).

    ``on_bytes`` is called with the bytes read from disk (for a progress bar); ``allow_binary``
    reads text files that look binary (`calm.data.text.BINARY_THRESHOLD`) instead of refusing them.
    """
    path = Path(path)
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}")
    if not path.exists():
        raise DataError(f"input not found: {path}")
    fmt, compression = input_format(path)
    if stats is None:
        stats = SourceStats(path=str(path), split="train")
    stats.format, stats.compression = fmt, compression
    if fmt == "hf-dataset-dict":
        raise DataError(f"{path} is a datasets DatasetDict; give one split's directory ({path}/SPLIT)")
    if fmt == "directory":
        raise DataError(f"{path} is a directory; read its files with resolve_inputs()")
    if fmt == "hf-dataset":
        files = hf_dataset_files(path)
        stats.file_bytes = sum(f.stat().st_size for f in files)
        for f in files:
            yield from arrow_documents(f, text_field, stats, on_bytes)
        return
    stats.file_bytes = path.stat().st_size
    if fmt == "parquet":
        yield from parquet_documents(path, text_field, stats, on_bytes)
        return
    if fmt == "arrow":
        yield from arrow_documents(path, text_field, stats, on_bytes)
        return
    if not allow_binary and stats.file_bytes:
        share = sniff_binary(path, compression)
        if share > BINARY_THRESHOLD:
            raise DataError(
                f"{path}: looks like a binary file, not text ({share:.0%} of its first {SNIFF_BYTES // 1024} KiB "
                f"are NUL bytes or invalid UTF-8; the limit is {BINARY_THRESHOLD:.0%}); "
                "pass --allow-binary / allow_binary=True to read it anyway"
            )
    counter = [0]
    lines = decode_lines(raw_lines(path, compression, on_bytes, counter), stats)
    if fmt == "jsonl":
        yield from _json_documents(path, lines, text_field, stats)
        return
    mode = doc_split
    if mode == "auto":
        mode = "wikitext" if looks_like_wikitext(path) else "blank"
    stats.doc_split = mode
    yield from SPLITTERS[mode](lines)
