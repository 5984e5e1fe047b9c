"""Plain-text rules: decoding lines, splitting text into documents, telling text from binary.

* Lines are decoded as UTF-8 with ``\\n`` line ends (``\\r\\n`` and ``\\r`` normalised), a UTF-8 BOM
  at the start dropped; invalid UTF-8 is replaced by U+FFFD and counted.
* ``doc_split``: ``blank`` (a run of blank lines ends a document), ``file`` (the whole file is one
  document), ``wikitext`` (a top-level title line `` = Title = `` with a blank line just before and
  after starts a new article: WikiText-2's 600 training / 60 validation articles; section headings
  `` = = ... = = `` and legend lines do not split), ``auto`` (``wikitext`` for files that look like
  WikiText, else ``blank``). A document never starts or ends with blank lines, nor ends in a newline.
* Binary input: a file whose first :data:`SNIFF_BYTES` bytes (after decompression) are more than
  :data:`BINARY_THRESHOLD` NUL bytes or invalid UTF-8 is refused unless ``allow_binary`` (an ELF
  executable scores about 0.6, a PNG about 0.4, Latin-1 French prose about 0.13).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

DOC_SPLITS = ("auto", "blank", "file", "wikitext")
SNIFF_BYTES = 1 << 16
BINARY_THRESHOLD = 0.30

# A WikiText top-level title: " = Title = " (one '=' each side; sections have "= =").
_WIKITEXT_TITLE = re.compile(r"^ = [^=](?:.*[^=])? = $")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()


def count_invalid_utf8(raw: bytes, text: str) -> int:
    """U+FFFD characters in ``text`` that replaced invalid bytes of ``raw`` (genuine ones excluded:
    a real U+FFFD is the bytes EF BF BD, which always decode as such)."""
    return text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)


def binary_fraction(sample: bytes) -> float:
    """Share of ``sample`` that is NUL bytes or invalid UTF-8 (one per replaced sequence)."""
    if not sample:
        return 0.0
    text = sample.decode("utf-8", errors="replace")
    invalid = count_invalid_utf8(sample, text)
    if invalid and text.endswith(_REPLACEMENT) and len(sample) >= SNIFF_BYTES:
        invalid -= 1  # the sample may cut a multi-byte character in two
    return (invalid + sample.count(b"\0")) / len(sample)


def decode_lines(
    raw_lines: Iterable[bytes], stats, on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Decoded lines with ``\\n`` ends; ``stats.bytes`` and ``stats.invalid_utf8_replacements``
    are updated as lines go by, and ``on_bytes`` (if given) gets the decoded byte counts."""
    pending = 0
    first = True
    for raw in raw_lines:
        stats.bytes += len(raw)
        if on_bytes is not None:
            pending += len(raw)
            if pending >= 1 << 18:
                on_bytes(pending)
                pending = 0
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            stats.invalid_utf8_replacements += count_invalid_utf8(raw, line)
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


def is_blank(line: str) -> bool:
    return not line.strip()


def _finish(lines: list[str]) -> str | None:
    """Join a document's lines: surrounding blank lines dropped, no trailing newline."""
    lo, hi = 0, len(lines)
    while lo < hi and is_blank(lines[lo]):
        lo += 1
    while hi > lo and is_blank(lines[hi - 1]):
        hi -= 1
    if lo == hi:
        return None
    text = "".join(lines[lo:hi])
    return text[:-1] if text.endswith("\n") else text


def split_blank(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if is_blank(line):
            if buf:
                yield _finish(buf)
                buf = []
        else:
            buf.append(line)
    if buf:
        yield _finish(buf)


def split_file(lines: Iterable[str]) -> Iterator[str]:
    doc = _finish(list(lines))
    if doc is not None:
        yield doc


def is_wikitext_title(prev: str | None, line: str, nxt: str | None) -> bool:
    """The WikiText article rule: `` = Title = `` with a blank line just before and just after
    (the start of the file counts as blank before; the end of the file does not count after)."""
    return (
        (prev is None or is_blank(prev))
        and nxt is not None
        and is_blank(nxt)
        and _WIKITEXT_TITLE.match(line.rstrip("\n")) is not None
    )


def split_wikitext(lines: Iterable[str]) -> Iterator[str]:
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


SPLITTERS = {"blank": split_blank, "file": split_file, "wikitext": split_wikitext}


def wikitext_layout(raw_lines: Iterable[bytes]) -> bool:
    """WikiText layout: lines start with a space (blank lines are " "), and a top-level title
    with blank lines around it appears among the lines given (the first ~200 of a file)."""
    lines = [raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n") for raw in raw_lines]
    nonempty = [line for line in lines if line]
    if not nonempty:
        return False
    spaced = sum(line.startswith(" ") for line in nonempty) / len(nonempty)
    padded = [None, *lines, None]
    titles = sum(is_wikitext_title(padded[i - 1], padded[i], padded[i + 1]) for i in range(1, len(lines)))
    return spaced >= 0.95 and titles >= 1
