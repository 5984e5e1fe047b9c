"""Byte streams of input files: plain, gzip or Zstandard, counted for the progress bar.

A Zstandard frame cut short is an error here (``zstandard``'s own stream reader ends silently
there), and every decompression error names the file and the last line read.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from calm.data.errors import DataError
from calm.data.text import SNIFF_BYTES, binary_fraction

_READ_CHUNK = 1 << 20


class _CountingReader(io.RawIOBase):
    """A raw reader that reports the bytes it reads from the file (for the progress bar)."""

    def __init__(self, f, on_bytes: Callable[[int], None] | None):
        self.f, self.on_bytes = f, on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n and self.on_bytes is not None:
            self.on_bytes(n)
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Zstandard decompression of every frame in turn; a frame cut short is an error
    (``zstandard``'s own stream reader ends silently there)."""

    def __init__(self, raw, path: Path):
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst files needs the zstandard package: pip install 'calm[data]'"
            ) from None
        self._dctx, self._error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._raw, self._path = raw, path
        self._obj = None
        self._buf, self._pos, self._eof = b"", 0, False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while self._pos >= len(self._buf) and not self._eof:
            chunk = self._raw.read(_READ_CHUNK)
            if not chunk:
                self._eof = True
                if self._obj is not None:
                    raise EOFError("the compressed data ends inside a frame (truncated)")
                return
            out = []
            while chunk:
                if self._obj is None:
                    self._obj = self._dctx.decompressobj()
                out.append(self._obj.decompress(chunk))
                if self._obj.eof:
                    chunk, self._obj = self._obj.unused_data, None
                else:
                    chunk = b""
            self._buf, self._pos = b"".join(out), 0

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def open_binary(path: Path, compression: str | None, on_bytes: Callable[[int], None] | None = None):
    """The decompressed bytes of ``path`` as a buffered binary stream."""
    raw = io.BufferedReader(_CountingReader(open(path, "rb", buffering=0), on_bytes), _READ_CHUNK)
    try:
        if compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == "zstd":
            stream = io.BufferedReader(_ZstdReader(raw, path), _READ_CHUNK)
        else:
            stream = raw
        yield stream
    finally:
        raw.close()


_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile)


def corrupt_types() -> tuple[type[BaseException], ...]:
    try:
        import zstandard

        return (*_CORRUPT, zstandard.ZstdError)
    except ImportError:
        return _CORRUPT


def raw_lines(path: Path, compression: str | None, on_bytes, counter: list[int]) -> Iterator[bytes]:
    """Raw lines of a (possibly compressed) file; decompression errors name the file and line."""
    corrupt = corrupt_types()
    with open_binary(path, compression, on_bytes) as stream:
        try:
            for line in stream:
                counter[0] += 1
                yield line
        except corrupt as e:
            raise DataError(
                f"{path}: corrupt or truncated {compression} data after line {counter[0]} ({e})"
            ) from None


def sniff_binary(path: Path, compression: str | None) -> float:
    """`binary_fraction` of the first `SNIFF_BYTES` (decompressed) bytes of a file (a decompression
    error ends the sample early: reading the file for real reports it with its line)."""
    parts: list[bytes] = []
    size = 0
    with contextlib.suppress(*corrupt_types()), open_binary(path, compression) as stream:
        while size < SNIFF_BYTES:
            piece = stream.read(min(1 << 12, SNIFF_BYTES - size))
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
    return binary_fraction(b"".join(parts))
