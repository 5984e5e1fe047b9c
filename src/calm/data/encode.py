"""Documents -> token ids: batches of texts through `tokenizers`' batch encoding, in worker processes.

One implementation for `calm prepare` (`Encoder`, N worker processes, results in order) and
`calm eval` on text files (`encode_documents`, in this process): every document's ids are
followed by the end-of-text id, and the ids come back as one flat array per batch plus the
per-document lengths.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from calm.tokenizer import Tokenizer

BATCH_CHARS = 1 << 19

_WORKER: dict[str, Any] = {}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_flat(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of ``texts`` each followed by eot, and the per-document lengths (eot included)."""
    ids = tok.encode_batch(texts)
    eot = (tok.eot_id,)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(zip(ids, itertools.repeat(eot)))),
        dtype=dtype,
        count=int(lengths.sum()),
    )
    return flat, lengths


def text_batches(
    docs: Iterable[tuple[str, Any]], batch_chars: int = BATCH_CHARS
) -> Iterator[tuple[list[str], list]]:
    """Group ``(text, tag)`` pairs into batches of about ``batch_chars`` characters."""
    texts: list[str] = []
    tags: list = []
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


def encode_documents(
    tok: Tokenizer, docs: Iterable[str], *, max_tokens: int | None = None, batch_chars: int = 1 << 18
) -> tuple[np.ndarray, int]:
    """All ``docs`` as one int64 token stream (eot after each) in this process, stopping once
    ``max_tokens`` are collected; returns (tokens, documents read)."""
    parts: list[np.ndarray] = []
    count = docs_read = 0
    for texts, _ in text_batches(((d, None) for d in docs), batch_chars):
        flat, _ = encode_flat(tok, texts, np.dtype(np.int64))
        parts.append(flat)
        count += flat.size
        docs_read += len(texts)
        if max_tokens is not None and count >= max_tokens:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return (tokens if max_tokens is None else tokens[: int(max_tokens)]), docs_read


def _worker_init(tok_json: str, special: dict[str, Any]) -> None:
    _WORKER["tok"] = Tokenizer.from_str(tok_json, **special)


def _worker_encode(texts: list[str], dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_flat(_WORKER["tok"], texts, np.dtype(dtype_name))


def default_workers() -> int:
    """Tokenization worker processes used when none are given: one per core but one (the main
    process reads and writes), at least 1, at most 8.

    Measured on a shared 2-core machine (benchmarks/bench_prepare.py, WikiText-2 standard split):
    1 worker process tokenized fastest and with the least CPU per MB; the in-process Rust thread
    pool (``workers=0``) used ~25% more CPU per MB (its idle threads spin) and 2 processes
    oversubscribed the two cores.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Encoder:
    """Tokenizes document batches in parallel, results in submission order, bounded in flight.

    ``workers == 0``: the Rust tokenizer's own thread pool (``encode_batch``) on a background
    thread, overlapping with reading. ``workers >= 1``: that many single-threaded processes.
    At most ``2 * workers`` batches (of ~``BATCH_CHARS`` characters) are in flight, so memory
    stays bounded whatever the corpus size.
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

    def _submit(self, texts: list[str]):
        if self.workers >= 1:
            return self.pool.apply_async(_worker_encode, (texts, self.dtype.name))
        return self.pool.submit(encode_flat, self.tok, texts, self.dtype)

    @staticmethod
    def _result(handle):
        return handle.get() if hasattr(handle, "get") else handle.result()

    def map(self, batches: Iterable[tuple[list[str], Any]]) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        """(flat ids, lengths, tag) of every ``(texts, tag)`` batch, in order."""
        queue: deque = deque()
        for texts, tag in batches:
            queue.append((self._submit(texts), tag))
            if len(queue) >= self.max_in_flight:
                handle, t = queue.popleft()
                yield (*self._result(handle), t)
        while queue:
            handle, t = queue.popleft()
            yield (*self._result(handle), t)

    def close(self) -> None:
        if self.workers >= 1:
            self.pool.terminate()
            self.pool.join()
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)
