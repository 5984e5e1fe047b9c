"""Native extensions built by `torch.utils.cpp_extension`, kept in a cache that is safe to load from.

Loading a shared library runs its code at once (its constructors run inside ``dlopen``), so a
cache of compiled code is only as trustworthy as what can write to it. The rules:

* **Where.** ``$CALM_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/calm/kernels``, else
  ``~/.cache/calm/kernels``; created with mode 0700. It is refused — `KernelUnavailable` with
  a one-line reason, and the callers take their PyTorch path — when it is owned by another
  user or writable by group or others, or when a directory above it is owned by someone other
  than this user or root, or is writable by others without the sticky bit (/tmp is fine).
* **What.** An entry is a directory ``<name>/`` holding ``<name>.so`` and ``<name>.so.sha256``
  (the library's SHA-256 in ``sha256sum`` format, written by the process that built it).
  ``<name>`` is ``<prefix>_<key>_<8 random hex digits>``; the key binds the sources, the
  compiler (its path and ``--version``), the CPU (machine and instruction-set flags, as
  ``-march=native`` targets them), torch's version, the Python ABI and the build flags.
* **Before loading** a cached library its SHA-256 is computed and compared with the record; a
  library that does not match (planted, damaged, half written), has no record, or is not a
  plain file owned by this user is deleted unread. One that loads but lacks the expected
  interface is deleted too (it stays mapped: a loaded library cannot be unloaded).
* **Building** happens in a fresh private directory inside the cache, published by one atomic
  rename. Every build gets a new random name: dlopen and Python's import machinery return an
  already loaded library again for the same name or path, so a rebuild in the same process
  must not reuse either.

The first build compiles PyTorch headers and takes minutes on a slow or busy machine (see the
README); later processes only hash and load the cached library (milliseconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["KernelUnavailable", "cache_dir", "entry_of", "load_extension", "secure_cache_dir"]

# The build flags, tried in this order: this CPU's vector width, then plain -O3 for compilers
# that do not know -march=native. -ffp-contract=fast: fused multiply-adds, which the kernel's
# timings assume (ISO mode would forbid them).
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=fast"], ["-O3", "-ffp-contract=fast"])
_LIB_SUFFIX = ".so"
_FORMAT = b"calm-kernel-cache-1"  # bump when the cache's layout changes

# Libraries this process has imported, by path (a second import of the same path would return
# the same module anyway; this skips re-hashing it).
_imported: dict[str, ModuleType] = {}


class KernelUnavailable(RuntimeError):
    """A native kernel cannot be built or loaded here, or does not apply to this model."""


def cache_dir() -> Path:
    """Where the compiled kernels live (not created here)."""
    root = os.environ.get("CALM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "calm"
    )
    return Path(root) / "kernels"


def _refuse(path: Path, why: str) -> KernelUnavailable:
    return KernelUnavailable(f"refusing the kernel cache {path}: {why}; the PyTorch path is used")


def secure_cache_dir(path: Path | None = None) -> Path:
    """The kernel cache, created with mode 0700 if missing; raises KernelUnavailable if another
    user could write to it (see the module docstring). Returns the resolved path."""
    path = Path(path or cache_dir())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # the umask may have narrowed it further: never widen
        except FileExistsError:
            pass
        real = Path(os.path.realpath(path))
        st = os.stat(real)
    except OSError as e:
        raise KernelUnavailable(f"cannot create the kernel cache {path}: {e}") from e
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "it is not a directory")
    if st.st_uid != uid:
        raise _refuse(path, f"it is owned by uid {st.st_uid}, not by this user (uid {uid})")
    if st.st_mode & 0o022:
        raise _refuse(
            path, f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}; chmod 700 it)"
        )
    if st.st_mode & 0o077:  # readable by others (an older calm made it 0755): only this user's
        try:
            os.chmod(real, 0o700)
        except OSError:
            pass
    for parent in real.parents:  # whoever can rename the directory can replace it
        try:
            pst = os.stat(parent)
        except OSError as e:
            raise _refuse(path, f"cannot inspect {parent}: {e}") from e
        if pst.st_uid not in (uid, 0):
            raise _refuse(path, f"{parent} above it is owned by uid {pst.st_uid}")
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise _refuse(path, f"{parent} above it is writable by group or others without the sticky bit")
    return real


def _cpu_signature() -> str:
    """What -march=native code depends on: the machine and its instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{flags}"


def _compiler(what: str) -> tuple[str, str]:
    """(the C++ compiler cpp_extension will run, its identity for the cache key)."""
    cxx = os.environ.get("CXX") or "c++"  # as torch.utils.cpp_extension chooses it
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(f"could not compile the {what}: no C++ compiler {cxx!r} (set CXX)")
    try:
        res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"could not compile the {what}: {path} --version: {e}") from e
    if res.returncode != 0:
        raise KernelUnavailable(f"could not compile the {what}: {path} --version failed")
    return path, f"{os.path.realpath(path)}\n{res.stdout.strip()}"


def cache_key(files: Sequence[Path], compiler_identity: str) -> str:
    """20 hex digits binding the sources, compiler, CPU, torch, Python ABI and build flags."""
    h = hashlib.sha256(_FORMAT)
    for part in (
        *(f.name.encode() + b"\0" + f.read_bytes() for f in sorted(files)),
        compiler_identity.encode(),
        _cpu_signature().encode(),
        f"{torch.__version__}|{torch.version.git_version}".encode(),
        f"{sys.implementation.cache_tag}|{sysconfig.get_config_var('EXT_SUFFIX')}".encode(),
        repr(FLAG_SETS).encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _own_file(path: Path, kind: int) -> bool:
    """A plain file (kind S_IFREG) or directory (S_IFDIR) of this user that only it can write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _verify(entry: Path) -> str:
    """'' if the entry's library matches its recorded SHA-256, else why not."""
    lib = entry / (entry.name + _LIB_SUFFIX)
    record = entry / (lib.name + ".sha256")
    if not _own_file(entry, stat.S_IFDIR) or not _own_file(lib, stat.S_IFREG):
        return "not a plain file of this user"
    if not _own_file(record, stat.S_IFREG):
        return "no SHA-256 record"
    try:
        recorded = record.read_text().split()
        actual = _sha256(lib)
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable: {e}"
    if recorded[:2] != [actual, lib.name]:
        return "its SHA-256 does not match the record"
    return ""


def _import(name: str, lib: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, lib)
    if spec is None or spec.loader is None:
        raise ImportError(f"{lib} is not a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_of(module: ModuleType) -> Path | None:
    """The cache entry (directory) a module loaded by `load_extension` came from last.
    (Importing an extension whose name is already loaded from another path, as happens when
    $CALM_CACHE_DIR changes within a process, maps the new file but returns the first module
    object: the latest verified entry is the one reported.)"""
    for lib, m in reversed(_imported.items()):
        if m is module:
            return Path(lib).parent
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _discard(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True)


def _build(root: Path, stem: str, sources: Sequence[Path], what: str) -> tuple[ModuleType, Path]:
    """Compile `sources` in a private directory, import the result, publish it as a new entry."""
    try:
        from torch.utils import cpp_extension  # (~1 s to import: only when building)
    except ImportError as e:
        raise KernelUnavailable(f"could not compile the {what}: {e}") from e
    if shutil.which("ninja") is None:  # the pip package's binary, where only that is installed
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    print(
        f"calm: building the {what} with torch.utils.cpp_extension (once per machine, compiler and "
        f"torch version; a minute or more) into {root} ...",
        file=sys.stderr,
        flush=True,
    )
    errors = []
    for flags in FLAG_SETS:
        name = f"{stem}_{secrets.token_hex(4)}"
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))  # mode 0700
        start = time.perf_counter()
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=flags,
                build_directory=str(tmp),
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001  (a compiler error, ninja missing, ...: the reason is kept)
            errors.append(f"{' '.join(flags)}: {str(e).strip()[-800:]}")
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        lib = tmp / (name + _LIB_SUFFIX)
        (tmp / (lib.name + ".sha256")).write_text(f"{_sha256(lib)}  {lib.name}\n")
        for f in tmp.iterdir():  # object files, build.ninja, lock: not needed to load it
            if f.name not in (lib.name, lib.name + ".sha256"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        entry = root / name
        os.rename(tmp, entry)  # atomic; the name is fresh (a module keeps its mapping)
        _imported[str(entry / lib.name)] = module
        print(f"calm: built {entry} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return module, entry
    raise KernelUnavailable(f"could not compile the {what}:\n" + "\n".join(errors))


def load_extension(
    prefix: str,
    sources: Sequence[Path],
    *,
    hashed: Sequence[Path] = (),
    check: Callable[[ModuleType], str],
    what: str = "native kernel",
) -> ModuleType:
    """The extension compiled from `sources` (headers they include go in `hashed`), from the
    cache when a verified build is there, else built now. `check(module)` returns '' when the
    module has the expected interface, else why not. Raises KernelUnavailable with the reason."""
    root = secure_cache_dir()
    _, identity = _compiler(what)
    stem = f"{prefix}_{cache_key([*sources, *hashed], identity)}"
    pattern = re.compile(re.escape(stem) + r"_[0-9a-f]{8}")
    entries = [p for p in root.glob(stem + "_*") if pattern.fullmatch(p.name)]
    entries.sort(key=_mtime, reverse=True)  # the newest build first
    for entry in entries:
        lib = entry / (entry.name + _LIB_SUFFIX)
        module = _imported.get(str(lib))
        if module is None:
            why = _verify(entry)
            if why:
                print(f"calm: discarding {entry} ({why}); it is not loaded", file=sys.stderr)
                _discard(entry)
                continue
            try:
                module = _import(entry.name, lib)
            except (ImportError, OSError) as e:
                print(f"calm: discarding {entry} (does not import: {e})", file=sys.stderr)
                _discard(entry)
                continue
            _imported[str(lib)] = module
        why = check(module)
        if not why:
            return module
        print(f"calm: discarding {entry} ({why}); building afresh under a new name", file=sys.stderr)
        _imported.pop(str(lib), None)
        _discard(entry)
    module, entry = _build(root, stem, sources, what)
    why = check(module)
    if why:
        raise KernelUnavailable(f"the freshly built {what} {entry} {why}")
    return module
