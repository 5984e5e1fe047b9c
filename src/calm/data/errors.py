"""The data package's error and warning types, and the one rule for "disk full"."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager


class DataError(ValueError):
    """Bad input data or a directory that isn't a prepared data set; the message says what and where."""


class DataWarning(UserWarning):
    """Something in the input worth knowing (empty file, invalid UTF-8) that did not stop `prepare`."""


class DiskFullError(DataError):
    """The output did not fit on the disk (the message names the file being written)."""


# "No space left on device" and "disk quota exceeded": both mean the output does not fit.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _FULL


@contextmanager
def writing(path: str | os.PathLike):
    """Turn a disk-full ``OSError`` raised while writing ``path`` into a one-line `DataError`."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            why = (
                "no space left on device"
                if err.errno == errno.ENOSPC
                else "no space left (disk quota exceeded)"
            )
            raise DiskFullError(f"{path}: {why}") from None
        raise
