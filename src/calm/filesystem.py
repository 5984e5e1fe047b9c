"""File-system safety shared by checkpoints, training runs and the release loader.

One job: touch files so that nothing is read from outside the directory a user named, nothing
written is silently wrong, and two writers never share a run directory.

* `file_digest`: the SHA-256 of a file, streamed (``sha256sum`` gives the same hex string).
  SHA-256 was measured faster than BLAKE2b on our CPUs (``benchmarks/bench_verify.py``), is in
  the standard library, and can be checked by hand.
* `contained_path`: a file name read from inside a directory (a shard index, a marker) as a path
  inside that directory, or an error naming the entry. The check is on the *name* (relative, no
  ``..``), not on where symlinks lead: a Hugging Face cache snapshot is a directory of symlinks
  into ``../../blobs`` and must keep loading.
* `RunDirectoryLock`: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` with the holder's pid
  written inside. The kernel drops the lock when the holder exits, however it exits (even
  SIGKILL), so a stale lock from a dead process never blocks a new run.
* `is_disk_full`: whether a failed write failed for lack of space (the messages of Python,
  safetensors and torch differ), so callers can say so in one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path, PurePosixPath

HASH_ALGORITHM = "sha256"
_CHUNK = 8 << 20  # bytes per read; large enough that the hash, not the syscalls, sets the pace
LOCK_FILE = ".lock"


def file_digest(path: str | os.PathLike, algorithm: str = HASH_ALGORITHM) -> str:
    """Hex digest of the bytes of `path` (read in 8 MiB blocks; the GIL is released while hashing)."""
    h = hashlib.new(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class UnsafePathError(ValueError):
    """A file name inside a checkpoint or data set that points outside its directory."""


def contained_path(root: str | os.PathLike, name: object, what: str) -> Path:
    """``root / name`` for a `name` read from a file inside `root`, refusing names that escape it.

    `what` says where the name was read (e.g. ``"model.safetensors.index.json weight_map entry
    'lm_head.weight'"``) and starts the error message. Refused: non-strings, empty names,
    absolute paths, and names with a ``..`` component. Symlinks inside `root` are followed as
    usual (the check is on the name).
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"{what}: {name!r} is not a file name")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(
            f"{what}: {name!r} is an absolute path; files named inside {root} must lie inside it"
        )
    if ".." in posix.parts:
        raise UnsafePathError(
            f"{what}: {name!r} leads out of {root} (it contains '..'); files named inside a directory "
            "must lie inside it"
        )
    return Path(root) / Path(*posix.parts)


def is_disk_full(err: BaseException, where: str | os.PathLike | None = None) -> bool:
    """True if `err` (from a write under `where`) means the file system ran out of space.

    Python raises ``OSError(ENOSPC)``; safetensors' Rust error says "No space left on device (os
    error 28)"; torch.save only reports a failed zip-writer check ("unexpected pos ..."), so for
    other errors the free space left under `where` (under 1 MiB) decides.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "os error 28" in str(e) or "StorageFull" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if where is None:
        return False
    try:
        return shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The run-directory lock


class RunDirectoryInUse(ValueError):
    """Another live process holds the run directory's lock (the message names it)."""


class RunDirectoryLock:
    """Exclusive lock on a run directory for as long as one training writes into it.

    ``with RunDirectoryLock(run_dir): ...`` or `acquire` / `release`. A second holder, in this
    process or another, gets `RunDirectoryInUse` naming the holder's pid, host and start time.
    The lock file is left in place on release (deleting it would let two processes lock two
    different inodes under one name).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirectoryLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; say so once and go on
            print(f"warning: no file locking on this platform; {self.run_dir} is not locked", file=sys.stderr)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirectoryInUse(
                f"{self.run_dir} is in use by another training run ({holder}); two runs writing one "
                f"directory would mix their metrics and race for the checkpoint. Wait for it to finish, "
                "stop it, or choose another --out"
            ) from None
        except OSError as err:  # e.g. a file system without flock support
            os.close(fd)
            print(
                f"warning: cannot lock {self.path} ({err}); the run directory is not protected",
                file=sys.stderr,
            )
            return self
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "a process that is just starting"
    where = f" on {info['host']}" if info.get("host") else ""
    since = f", since {info['started']}" if info.get("started") else ""
    return f"pid {info['pid']}{where}{since}"
