"""Table inputs: Parquet files, Arrow IPC files / streams, and ``datasets`` ``save_to_disk``
directories (whose ``state.json`` lists the Arrow shards), read batch by batch (needs pyarrow)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from calm.data.errors import DataError
from calm.data.paths import resolve_member

HF_STATE = "state.json"
_TABLE_ROWS = 1024


def _pyarrow(path: Path):
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet / Arrow needs the pyarrow package: pip install 'calm[data]'"
        ) from None
    return pa


def _text_column(pa, schema, path: Path, text_field: str) -> None:
    if text_field not in schema.names:
        cols = ", ".join(repr(n) for n in schema.names[:12]) or "none"
        raise DataError(
            f"{path}: no {text_field!r} column (columns: {cols}); choose the column with --text-field / text_field="
        )
    t = schema.field(text_field).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _t: False)(t)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or is_view):
        raise DataError(f"{path}: column {text_field!r} holds {t}, not strings")


def _table_texts(path: Path, batches: Iterable, text_field: str, stats) -> Iterator[str]:
    """Documents of record batches holding the text column; null / empty cells are named by row."""
    row = 0
    for batch in batches:
        column = batch.column(batch.schema.get_field_index(text_field))
        if column.null_count:
            bad = row + column.is_null().to_pylist().index(True)
            raise DataError(f"{path}: row {bad} (0-based): {text_field!r} is null, not a string")
        for text in column.to_pylist():
            stats.bytes += len(text) if text.isascii() else len(text.encode("utf-8"))
            row += 1
            if not text.strip():
                stats.skipped_empty_documents += 1
                continue
            yield text


def parquet_documents(path: Path, text_field: str, stats, on_bytes) -> Iterator[str]:
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    _text_column(pa, pf.schema_arrow, path, text_field)
    total_rows, done, reported = max(1, pf.metadata.num_rows), 0, 0

    def batches():
        nonlocal done, reported
        it = pf.iter_batches(batch_size=_TABLE_ROWS, columns=[text_field])
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: corrupt Parquet data after row {done} ({e})") from None
            yield batch
            done += batch.num_rows
            if on_bytes is not None:
                now = stats.file_bytes * done // total_rows
                on_bytes(now - reported)
                reported = now

    yield from _table_texts(path, batches(), text_field, stats)


def arrow_documents(path: Path, text_field: str, stats, on_bytes) -> Iterator[str]:
    """An Arrow IPC stream (what ``datasets`` writes) or IPC file, batch by batch, memory-mapped."""
    pa = _pyarrow(path)
    source = pa.memory_map(str(path))
    try:
        try:
            reader = pa.ipc.open_stream(source)
            schema, stream = reader.schema, True
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            schema, stream = reader.schema, False
    except (pa.ArrowException, OSError) as e:
        source.close()
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    rows = 0

    def batches():
        nonlocal rows
        reported = 0
        indices = itertools.count() if stream else iter(range(reader.num_record_batches))
        for i in indices:
            try:
                batch = reader.read_next_batch() if stream else reader.get_batch(i)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: corrupt or truncated Arrow data after row {rows} ({e})") from None
            rows += batch.num_rows
            yield batch
            if on_bytes is not None:
                pos = source.tell()
                on_bytes(pos - reported)
                reported = pos

    try:
        _text_column(pa, schema, path, text_field)
        yield from _table_texts(path, batches(), text_field, stats)
    finally:
        source.close()


def hf_dataset_files(path: Path) -> list[Path]:
    """The ``.arrow`` shards of a ``save_to_disk`` directory, in the order ``state.json`` lists them."""
    try:
        state = json.loads((path / HF_STATE).read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / HF_STATE}: not a datasets state file ({type(e).__name__}: {e})") from None
    files = [resolve_member(path, n, f"{HF_STATE} _data_files[{i}]") for i, n in enumerate(names)]
    for f in files:
        if not f.is_file():
            raise DataError(f"{path}: {f.name} (listed in {HF_STATE}) is missing")
    return files
