"""Writing one split of a prepared data set: numbered token shards of bounded size + document offsets.

Tokens are appended to ``<split>-00000.bin`` until it holds ``shard_tokens`` tokens, then to the
next shard (a document may continue in the next shard: readers see one stream). Document start
offsets stream to a hidden scratch file and become ``<split>_docs.npy`` at the end, so memory
does not grow with the corpus. Every write goes through `write_bytes`, and a full disk becomes a
one-line `DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calm.data.errors import writing


def write_bytes(f, data) -> None:
    """Write a buffer to an open binary file (one place, so tests can simulate a full disk)."""
    f.write(data)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends token chunks of one split to its shards and records document start offsets."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory, self.split, self.dtype, self.shard_tokens = (
            directory,
            split,
            np.dtype(dtype),
            shard_tokens,
        )
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._path: Path | None = None
        self._offsets_path = directory / f".{split}_docs.i64"
        self._offsets = open(self._offsets_path, "wb")  # noqa: SIM115 - closed in close()/abort()

    def _next_shard(self) -> None:
        if self._file is not None:
            with writing(self._path):
                self._file.close()
        self._path = self.directory / shard_name(self.split, len(self.shards))
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed by the next shard or close()
        self.shards.append({"file": self._path.name, "tokens": 0, "max_id": -1})

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``flat`` holds their ids back to back, ``lengths`` their sizes."""
        if not len(lengths):
            return
        starts = self.tokens + np.concatenate(([0], np.cumsum(lengths[:-1])))
        with writing(self._offsets_path):
            write_bytes(self._offsets, starts.astype("<i8").data)
        self.documents += len(lengths)
        flat = np.ascontiguousarray(flat.astype(self.dtype, copy=False))
        pos = 0
        while pos < flat.size:
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            cur = self.shards[-1]
            take = min(self.shard_tokens - cur["tokens"], flat.size - pos)
            piece = flat[pos : pos + take]
            with writing(self._path):
                write_bytes(self._file, piece.data)
            cur["tokens"] += take
            cur["max_id"] = max(cur["max_id"], int(piece.max()))
            pos += take
        self.tokens += int(flat.size)

    def close(self) -> dict[str, Any]:
        """Finish the split; returns its ``meta.json`` entry."""
        if self._file is not None:
            with writing(self._path):
                self._file.close()
        with writing(self._offsets_path):
            self._offsets.close()
        name = f"{self.split}_docs.npy"
        out = self.directory / name
        with writing(out):
            if self.documents == 0:
                np.save(out, np.zeros(0, np.int64))
            else:
                raw = np.memmap(self._offsets_path, dtype="<i8", mode="r", shape=(self.documents,))
                dst = np.lib.format.open_memmap(out, mode="w+", dtype=np.int64, shape=(self.documents,))
                step = 1 << 22
                for lo in range(0, self.documents, step):
                    dst[lo : lo + step] = raw[lo : lo + step]
                dst.flush()
                del dst, raw
        self._offsets_path.unlink()
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "doc_offsets": name,
            "shards": self.shards,
        }

    def abort(self) -> None:
        """Close the files after an error (the caller removes the directory)."""
        for f in (self._file, self._offsets):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
