"""Data: `calm prepare` (documents -> tokenizer -> token shards) and reading prepared data sets.

Modules, one job each:

- `calm.data.text`     decoding lines, splitting plain text into documents, binary detection
- `calm.data.streams`  plain / gzip / Zstandard byte streams with progress and corruption errors
- `calm.data.tables`   Parquet, Arrow and datasets `save_to_disk` directories (pyarrow)
- `calm.data.paths`    file names inside a data set must stay inside it
- `calm.data.formats`  input formats (txt / JSONL, .gz / .zst, Parquet, Arrow, datasets
                       directories), finding inputs, streaming their documents
- `calm.data.encode`   documents -> token ids (`tokenizers` batch encoding in worker processes)
- `calm.data.writer`   numbered token shards of bounded size + document offsets for one split
- `calm.data.routing`  which split each document goes to (validation rule, --max-tokens)
- `calm.data.preparation`  `prepare()`: the pipeline and its atomic output directory
- `calm.data.shards`   `TokenShards`: a split's shards as one memory-mapped stream; id checks
- `calm.data.batches`  seeded training batches (`batch_for_step`) and evaluation windows
- `calm.data.cli`      the `calm prepare` options and summary

Everything a caller needs is importable from `calm.data` itself.
"""

from calm.data.batches import batch_for_step, eval_windows, make_windows, window_starts, windows_per_epoch
from calm.data.cli import add_prepare_arguments, format_summary, parse_size, run_prepare
from calm.data.encode import Encoder, default_workers, encode_documents, encode_flat, token_dtype
from calm.data.errors import DataError, DataWarning, DiskFullError
from calm.data.formats import (
    SourceStats,
    input_format,
    looks_like_wikitext,
    read_documents,
    resolve_inputs,
)
from calm.data.paths import resolve_member
from calm.data.preparation import prepare
from calm.data.routing import is_val_document
from calm.data.shards import (
    DEFAULT_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    ShardedTokens,
    TokenShards,
    check_token_ids,
)
from calm.data.text import BINARY_THRESHOLD, DOC_SPLITS, SNIFF_BYTES, is_wikitext_title

__all__ = [
    "BINARY_THRESHOLD",
    "DEFAULT_SHARD_BYTES",
    "DOC_SPLITS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_FILE",
    "SNIFF_BYTES",
    "SPLITS",
    "DataError",
    "DataWarning",
    "DiskFullError",
    "Encoder",
    "ShardedTokens",
    "SourceStats",
    "TokenShards",
    "add_prepare_arguments",
    "batch_for_step",
    "check_token_ids",
    "default_workers",
    "encode_documents",
    "encode_flat",
    "eval_windows",
    "format_summary",
    "input_format",
    "is_val_document",
    "is_wikitext_title",
    "looks_like_wikitext",
    "make_windows",
    "parse_size",
    "prepare",
    "read_documents",
    "resolve_inputs",
    "resolve_member",
    "run_prepare",
    "token_dtype",
    "window_starts",
    "windows_per_epoch",
]
