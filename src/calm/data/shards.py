"""Reading a prepared data set: the splits' token shards as one memory-mapped stream.

Layout of a directory written by `calm prepare` (format version 2):

- ``train-00000.bin``, ``train-00001.bin``, ... (and ``val-NNNNN.bin``): flat arrays of token ids,
  ``uint16`` when every id fits (vocabulary <= 65,536) else ``uint32``, native little-endian, no
  header; each at most ``shard_bytes`` (default 1 GiB). Their concatenation is the split's token
  stream (a document may continue in the next shard);
- ``train_docs.npy``, ``val_docs.npy``: int64 start offset (in tokens, in the whole stream) of
  every document;
- ``meta.json``: format version, dtype, per split the token and document counts and the list of
  shards with their token counts and largest id, the tokenizer's special ids and vocabulary size,
  the sources read and the options used;
- ``tokenizer.json`` + ``tokenizer_meta.json``.

Version 1 directories (one ``train.bin`` / ``val.bin`` per split, named by ``"file"``) load the
same way. Every file ``meta.json`` names must be a relative path inside the directory.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from calm.data.errors import DataError
from calm.data.paths import resolve_member
from calm.tokenizer import Tokenizer

FORMAT_NAME = "calm-tokens"
FORMAT_VERSION = 2
META_FILE = "meta.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_BYTES = 1 << 30
# Splits up to this size are scanned whole by `TokenShards.check_token_ids` (about 3 s on the
# 2-core development machine); larger ones rely on the per-shard largest id recorded at prepare
# time, and every training batch is checked as it is read.
FULL_SCAN_BYTES = 8 << 30
_OPEN_SHARDS = 64  # memory maps kept open at once (each holds a file descriptor)


def check_token_ids(tokens, vocab_size: int, where: str, *, offset: int = 0, chunk: int = 1 << 24) -> None:
    """Raise `DataError` unless every id of ``tokens`` (an array, memory map or tensor) is in
    ``[0, vocab_size)``; the message names ``where``, the first bad id and its position."""
    if getattr(tokens, "ndim", 1) > 1:
        tokens = tokens.reshape(-1)
    n = len(tokens)
    for lo in range(0, n, chunk):
        part = tokens[lo : lo + chunk]
        if hasattr(part, "numpy"):  # a torch tensor (on the CPU or moved there)
            part = part.detach().cpu().numpy()
        part = np.asarray(part)
        if not part.size:
            continue
        signed = part.dtype.kind == "i"
        if int(part.max()) < vocab_size and (not signed or int(part.min()) >= 0):
            continue
        bad_mask = (part >= vocab_size) | (part < 0) if signed else part >= vocab_size
        at = int(np.flatnonzero(bad_mask.reshape(-1))[0])
        bad = int(part.reshape(-1)[at])
        raise DataError(
            f"{where}: token id {bad} at position {offset + lo + at:,} is outside the vocabulary of "
            f"{vocab_size:,} entries (ids 0..{vocab_size - 1:,}); the data was tokenized with another "
            "tokenizer, or the file is damaged: prepare it again"
        )


class ShardedTokens:
    """Several shard files read as one flat read-only array (slicing, ``len``, ``np.asarray``).

    Shards are memory-mapped when first touched, so a process reads only the pages of the
    windows it takes; at most ``_OPEN_SHARDS`` maps are kept open.
    """

    ndim = 1

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype):
        self.files, self.counts, self.dtype = files, counts, np.dtype(dtype)
        self.bounds = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def shard(self, i: int) -> np.ndarray:
        """The memory map of shard ``i``."""
        m = self._maps.get(i)
        if m is None:
            m = np.memmap(self.files[i], dtype=self.dtype, mode="r", shape=(self.counts[i],))
            self._maps[i] = m
            if len(self._maps) > _OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return m

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a copy; pieces of consecutive shards joined)."""
        start, stop = max(0, start), min(len(self), stop)
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        parts = []
        i, pos = first, start
        while pos < stop:
            lo = pos - int(self.bounds[i])
            hi = min(stop, int(self.bounds[i + 1])) - int(self.bounds[i])
            if hi > lo:
                parts.append(self.shard(i)[lo:hi])
            pos = int(self.bounds[i + 1])
            i += 1
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self.read(start, stop) if stop > start else np.zeros(0, self.dtype)
            return out if step == 1 else out[::step]
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} is out of range for {len(self)} tokens")
        return self.read(i, i + 1)[0]

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)


class TokenShards:
    """One split of a prepared data set, memory-mapped.

    ``tokens`` is the split's flat token stream: a read-only ``np.memmap`` when the split has one
    shard (or is a version-1 ``train.bin``), else a `ShardedTokens` view over the shards; both
    support ``len``, slicing and ``np.asarray``. ``meta`` is ``meta.json``; ``doc_offsets`` the
    start of every document; ``files`` / ``shard_tokens`` the shard files and their token counts.
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
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT_NAME:
            got = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise DataError(f"{meta_path} is not a calm token data set (format={got!r})")
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.data_dir} has no split {split!r} (has: {', '.join(splits)})")
        self.info = info = splits[split]
        try:
            self.dtype = np.dtype(self.meta["dtype"])
        except (KeyError, TypeError) as e:
            raise DataError(f"{meta_path}: bad dtype ({e})") from None
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"{meta_path}: dtype {self.dtype.name} is not uint16 or uint32")
        entries = info.get("shards")
        if entries is None:  # format version 1: one file per split
            entries = [{"file": info.get("file"), "tokens": info.get("tokens", 0)}]
            names = [f"splits.{split}.file"]
        else:
            names = [f"splits.{split}.shards[{i}].file" for i in range(len(entries))]
        self.files: list[Path] = []
        self.shard_tokens: list[int] = []
        self.shard_max_ids: list[int | None] = []
        for entry, name in zip(entries, names):
            path = resolve_member(self.data_dir, entry.get("file"), f"{META_FILE} {name}")
            n = int(entry["tokens"])
            size = path.stat().st_size if path.is_file() else -1
            if size != n * self.dtype.itemsize:
                raise DataError(
                    f"{path}: expected {n} {self.dtype.name} tokens ({n * self.dtype.itemsize} bytes), "
                    f"found {'no file' if size < 0 else f'{size} bytes'}; the data set is damaged, prepare it again"
                )
            self.files.append(path)
            self.shard_tokens.append(n)
            self.shard_max_ids.append(entry.get("max_id"))
        total = sum(self.shard_tokens)
        if "tokens" in info and int(info["tokens"]) != total:
            raise DataError(
                f"{meta_path}: split {split!r} says {info['tokens']} tokens but its shards hold {total}; "
                "the data set is damaged, prepare it again"
            )
        self.path = self.files[0] if self.files else None
        nonempty = [(f, n) for f, n in zip(self.files, self.shard_tokens) if n]
        if not nonempty:
            self.tokens = np.zeros(0, self.dtype)
        elif len(nonempty) == 1:
            self.tokens = np.memmap(nonempty[0][0], dtype=self.dtype, mode="r", shape=(nonempty[0][1],))
        else:
            self.tokens = ShardedTokens([f for f, _ in nonempty], [n for _, n in nonempty], self.dtype)
        self._doc_offsets: np.ndarray | None = None
        self._perm_cache: dict[tuple, Any] = {}

    def __len__(self) -> int:
        return int(len(self.tokens))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. into DataLoader workers) as the path: the memmap is reopened, not copied.
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.data_dir)!r}, split={self.split!r}, tokens={len(self)}, "
            f"shards={len(self.files)}, dtype={self.dtype.name})"
        )

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def num_documents(self) -> int:
        return int(self.info["documents"])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split as an array (across shard boundaries)."""
        return np.asarray(self.tokens[start:stop])

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start offset (in tokens) of every document of this split."""
        if self._doc_offsets is None:
            name = self.info.get("doc_offsets")
            path = (
                resolve_member(self.data_dir, name, f"{META_FILE} splits.{self.split}.doc_offsets")
                if name
                else None
            )
            if path is None or not path.is_file():
                raise DataError(f"{self.data_dir}: document offsets for {self.split!r} are missing")
            self._doc_offsets = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._doc_offsets

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (its trailing eot included)."""
        offsets = self.doc_offsets
        end = int(offsets[i + 1]) if i + 1 < len(offsets) else len(self)
        return self.read(int(offsets[i]), end)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer stored with the data set."""
        return Tokenizer.load(self.data_dir)

    def check_token_ids(self, vocab_size: int | None = None) -> None:
        """Raise `DataError` naming the shard if an id is outside ``[0, vocab_size)`` (default:
        the data set's own vocabulary). The recorded largest id of each shard is checked first;
        splits up to `FULL_SCAN_BYTES` are then scanned whole (training batches are checked as
        they are read in any case, see `calm.data.batches.batch_for_step`)."""
        vocab = self.vocab_size if vocab_size is None else int(vocab_size)
        for path, max_id in zip(self.files, self.shard_max_ids):
            if max_id is not None and int(max_id) >= vocab:
                raise DataError(
                    f"{path}: token ids up to {int(max_id):,} (recorded in {META_FILE}) are outside the "
                    f"vocabulary of {vocab:,} entries; the data was tokenized with another tokenizer: "
                    "prepare it again"
                )
        scan = len(self) * self.dtype.itemsize <= FULL_SCAN_BYTES or None in self.shard_max_ids
        if scan:
            for path, n in zip(self.files, self.shard_tokens):
                if n:
                    check_token_ids(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)), vocab, str(path))
