"""Evaluation input: a flat token stream read from a prepared data directory or from text/JSONL
files (`load_eval_tokens`), and the windows [N, T] of any input `calm.evaluate` is given
(`_as_windows`: a flat stream, `calm.data.TokenShards` or windows as they are).

Flat streams are cut by `calm.data.make_windows`, the one windowing rule (also training's
validation windows, `calm.data.eval_windows`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm.data import make_windows

DEFAULT_BLOCK_SIZE = 256


def _as_windows(
    data, block_size: int | None, max_tokens: int | None, default_block: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Windows [N, T] of `data`; a flat stream is cut at ``block_size or default_block``."""
    if hasattr(data, "tokens") and hasattr(data, "split"):  # calm.data.TokenShards: read only what is used
        return make_windows(data.tokens, block_size or default_block, max_tokens)
    if not torch.is_tensor(data) and not isinstance(data, np.ndarray):
        data = np.asarray(data)
    if data.ndim == 2:
        t = data if torch.is_tensor(data) else torch.from_numpy(np.asarray(data).astype(np.int64))
        if block_size is not None and block_size != t.shape[1]:
            raise ValueError(f"windows have {t.shape[1]} tokens but block_size={block_size} was asked for")
        if max_tokens is not None:
            t = t[: int(max_tokens) // t.shape[1]]
        if len(t) == 0:
            raise ValueError(
                "no windows to evaluate" + (f" within max_tokens={max_tokens}" if max_tokens else "")
            )
        return t.long()
    if data.ndim != 1:
        raise ValueError(f"expected a flat token stream or windows [N, T], got shape {tuple(data.shape)}")
    return make_windows(data, block_size or default_block, max_tokens)


def _is_prepared(path: Path) -> bool:
    from calm.data import META_FILE

    return path.is_dir() and (path / META_FILE).is_file()


def load_eval_tokens(
    paths: Iterable[str | os.PathLike],
    tokenizer=None,
    *,
    split: str = "val",
    max_tokens: int | None = None,
    text_field: str = "text",
    doc_split: str = "auto",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A flat token stream from a prepared data directory (its ``split``) or from text/JSONL
    files and directories (tokenized with ``tokenizer``, documents each followed by eot).

    Returns (LongTensor [N], description). Stops reading once ``max_tokens`` are collected.
    """
    from calm.data import DataError, TokenShards, encode_documents, read_documents, resolve_inputs

    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no evaluation data given (--data PATH)")
    for p in paths:
        if not p.exists():
            raise DataError(f"evaluation data not found: {p}")
    prepared = [p for p in paths if _is_prepared(p)]
    if prepared:
        if len(paths) > 1:
            raise DataError("give either one prepared data directory or text/JSONL files, not both / several")
        shards = TokenShards(prepared[0], split)
        n = len(shards) if max_tokens is None else min(len(shards), int(max_tokens))
        tokens = torch.from_numpy(shards.read(0, n).astype(np.int64))
        desc = {
            "source": str(prepared[0]),
            "format": "prepared",
            "split": split,
            "data_vocab_size": shards.vocab_size,
        }
        if tokenizer is not None:
            try:
                same = shards.tokenizer().to_str() == tokenizer.to_str()
            except Exception:  # noqa: BLE001 - a data set without a readable tokenizer: cannot compare
                same = None
            desc["same_tokenizer"] = same
            if same is False:
                warnings.warn(
                    f"{prepared[0]} was tokenized with a different tokenizer than the model's; "
                    "the scores are only meaningful if the ids mean the same tokens",
                    stacklevel=2,
                )
    else:
        if tokenizer is None:
            raise DataError(
                "this checkpoint has no tokenizer, so text files cannot be tokenized; "
                "give a prepared data directory (calm prepare) instead"
            )
        files = resolve_inputs(paths, "val")
        docs_read = [0]

        def documents():
            for f in files:
                for doc in read_documents(f, text_field=text_field, doc_split=doc_split):
                    docs_read[0] += 1
                    yield doc

        ids, _ = encode_documents(tokenizer, documents(), max_tokens=max_tokens)
        tokens = torch.from_numpy(ids)
        docs = docs_read[0]
        desc = {
            "source": ", ".join(map(str, paths)),
            "format": "text",
            "files": len(files),
            "documents": docs,
        }
    if tokens.numel() == 0:
        raise DataError(f"no tokens to evaluate in {', '.join(map(str, paths))}")
    desc["tokens_read"] = int(tokens.numel())
    return tokens, desc


__all__ = ["DEFAULT_BLOCK_SIZE", "load_eval_tokens"]
