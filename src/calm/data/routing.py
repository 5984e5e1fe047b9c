"""Which split each document goes to: the validation rule, ``--max-tokens``, and the fallback
that makes the last document the validation set when the fraction picks none."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from calm.data.writer import ShardWriter


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic validation pick: every 1/f-th document (see module docstring)."""
    if val_fraction <= 0:
        return False
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


class Router:
    """Sends each tokenized document to its split, in order.

    Training-input documents go to validation by :func:`is_val_document`. The last training
    document is held back until the next one arrives so that, if the fraction picked nothing,
    it can become the validation set instead. Once the training split holds ``max_tokens``,
    further training-input documents are dropped (``full``).
    """

    def __init__(self, writers: dict[str, ShardWriter], val_fraction: float, max_tokens: int | None):
        self.writers = writers
        self.val_fraction = val_fraction
        self.max_tokens = max_tokens
        self.index = 0  # over training-input documents
        self.train_tokens = 0
        self.full = False
        self.held: tuple[np.ndarray, np.ndarray] | None = None
        self.picked = 0

    def route(self, flat: np.ndarray, lengths: np.ndarray, tags: list[str]) -> None:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        dest: list[str | None] = []
        for k, source in enumerate(tags):  # "train": a training input document, "val": a --val one
            if source != "train":
                dest.append("val")
                continue
            if self.full:
                dest.append(None)
                continue
            if is_val_document(self.index, self.val_fraction):
                dest.append("val")
                self.picked += 1
            else:
                dest.append("train")
                self.train_tokens += int(lengths[k])
                if self.max_tokens is not None and self.train_tokens >= self.max_tokens:
                    self.full = True
            self.index += 1
        # Runs of consecutive documents with the same destination are written in one go.
        i, n = 0, len(dest)
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
            elif dest[i] == "val":
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


def training_docs(docs: Iterable[str], val_fraction: float, max_chars: int | None) -> Iterator[str]:
    used = 0
    for i, doc in enumerate(docs):
        if is_val_document(i, val_fraction):
            continue
        yield doc
        used += len(doc)
        if max_chars is not None and used >= max_chars:
            return
