"""The fused kernel's cache (`calm.kernel_cache`): nothing is loaded that this user did not build.

The kernel built once per machine in the default cache is copied into a private cache per test. The two tests that need a real rebuild run it
in a fresh process, as a planted or damaged file is met in real life, and are marked slow (a
build compiles PyTorch headers).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from calm import fused_decode, kernel_cache
from calm.config import preset
from calm.generation import GenerationError, generate
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM

needs_kernel = pytest.mark.skipif(
    not fused_decode.available(), reason=f"the fused kernel is not available: {fused_decode._load()[1]}"
)
C_COMPILER = shutil.which(os.environ.get("CC", "cc"))
needs_cc = pytest.mark.skipif(C_COMPILER is None, reason="no C compiler to build the test libraries")

PLANTED_C = r"""
#include <stdio.h>
/* runs inside dlopen, before any symbol is looked up */
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int unrelated(void) { return 1; }
"""

# a Python extension module that imports fine but is not the kernel
EMPTY_MODULE_C = r"""
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "%s", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&def); }
"""


def _compile_c(source: str, out: Path, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(
        [C_COMPILER, "-shared", "-fPIC", *flags, str(src), "-o", str(out)], check=True, timeout=300
    )
    return out


def _model() -> CALM:
    torch.manual_seed(0)
    model = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=0.5)
    return model.eval()


def _kernel_works() -> bool:
    model = _model()
    out, stats = generate(model, [[1, 2, 3]], max_new_tokens=8, seed=0, eos_id=None, return_stats=True)
    plain = generate(model, [[1, 2, 3]], max_new_tokens=8, seed=0, eos_id=None, fused_kernel=False)
    return stats.fused_draws == stats.draws > 0 and out == plain


# the user's cache, where the kernel is built once per machine (read at import, before any
# test points $CALM_CACHE_DIR elsewhere)
DEFAULT_CACHE = kernel_cache.cache_dir()


@pytest.fixture(scope="module")
def pristine() -> Path:
    """The verified entry of the default cache that this process loads."""
    fused_decode._load.cache_clear()
    entry = kernel_cache.entry_of(fused_decode._library())
    assert entry is not None and entry.parent == DEFAULT_CACHE.resolve() and not kernel_cache._verify(entry)
    return entry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty private cache ($CALM_CACHE_DIR/kernels) and a forgotten library."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CALM_CACHE_DIR", str(root))
    fused_decode._load.cache_clear()
    yield root / "kernels"
    fused_decode._load.cache_clear()


@pytest.fixture
def copied(cache, pristine) -> Path:
    """The private cache as a copy of the default one (a copy verifies: the record is a content
    hash); returns the copy of the entry this process loads."""
    shutil.copytree(DEFAULT_CACHE, cache, ignore=shutil.ignore_patterns(".build-*"))
    os.chmod(cache, 0o700)
    return cache / pristine.name


def _rebuilt(copied: Path) -> Path:
    """The one entry of the key of `copied` in its cache, which must differ from it and verify."""
    (entry,) = copied.parent.glob(copied.name[:-8] + "*")
    assert entry.name != copied.name and not kernel_cache._verify(entry)
    return entry


def _forbid_builds(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernel_cache, "_build", no_build)


@needs_kernel
def test_a_verified_cached_kernel_is_loaded_without_compiling(copied, monkeypatch):
    _forbid_builds(monkeypatch)
    assert fused_decode.available(), fused_decode._load()[1]
    assert kernel_cache.entry_of(fused_decode._library()) == copied.resolve()
    assert _kernel_works()
    assert stat.S_IMODE(copied.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_cache_others_can_write_is_refused(cache, mode):
    cache.mkdir(parents=True)
    os.chmod(cache, mode)
    assert not fused_decode.available()
    reason = fused_decode._load()[1]
    assert "writable by group or others" in reason and str(cache) in reason and "\n" not in reason
    with pytest.raises(GenerationError, match="writable by group or others"):
        generate(_model(), [[1, 2, 3]], max_new_tokens=8, seed=0, fused_kernel=True)
    _, stats = generate(_model(), [[1, 2, 3]], max_new_tokens=8, seed=0, return_stats=True)
    assert stats.fused_draws == 0  # the PyTorch path
    assert stat.S_IMODE(cache.stat().st_mode) == mode  # refused, not "repaired"


def test_a_cache_owned_by_another_user_is_refused(cache, monkeypatch):
    cache.mkdir(parents=True, mode=0o700)
    if os.getuid() == 0:
        os.chown(cache, 65534, 65534)  # nobody
    else:  # cannot give it away: be someone else instead
        uid = os.getuid()
        monkeypatch.setattr(kernel_cache.os, "getuid", lambda: uid + 1)
    assert not fused_decode.available()
    reason = fused_decode._load()[1]
    assert "owned by uid" in reason and "not by this user" in reason


def test_a_cache_below_a_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may rename kernels/ away and put their own in its place
    with pytest.raises(kernel_cache.KernelUnavailable, match="above it is writable"):
        kernel_cache.secure_cache_dir(shared / "kernels")
    os.chmod(shared, 0o1777)  # sticky, like /tmp: only the owner may rename it
    root = kernel_cache.secure_cache_dir(shared / "kernels")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@needs_kernel
@needs_cc
def test_an_unrecorded_library_in_the_cache_is_not_loaded(copied, tmp_path, monkeypatch):
    # a library under a valid-looking name beside the real one, newer, without a matching record
    marker = tmp_path / "marker"
    name = copied.name[:-8] + "00000000"
    planted = copied.parent / name
    planted.mkdir(mode=0o700)
    _compile_c(PLANTED_C % marker, planted / (name + ".so"))
    (planted / (name + ".so.sha256")).write_text("0" * 64 + f"  {name}.so\n")
    os.utime(planted, (time.time() + 60, time.time() + 60))
    _forbid_builds(monkeypatch)
    assert fused_decode.available(), fused_decode._load()[1]
    assert not marker.exists()
    assert not planted.exists()  # discarded unread
    assert kernel_cache.entry_of(fused_decode._library()) == copied.resolve()


@needs_kernel
@needs_cc
def test_a_library_without_the_kernel_is_discarded(copied, monkeypatch):
    # recorded correctly, imports fine, but has no head_decode: it is loaded (and stays mapped),
    # so the kernel must come from another name, never from this path again
    name = copied.name[:-8] + "11111111"
    fake = copied.parent / name
    fake.mkdir(mode=0o700)
    lib = _compile_c(
        EMPTY_MODULE_C % (name, name), fake / (name + ".so"), f"-I{sysconfig.get_paths()['include']}"
    )
    (fake / (name + ".so.sha256")).write_text(f"{kernel_cache._sha256(lib)}  {lib.name}\n")
    os.utime(fake, (time.time() + 60, time.time() + 60))
    _forbid_builds(monkeypatch)
    assert fused_decode.available(), fused_decode._load()[1]
    assert not fake.exists()
    assert kernel_cache.entry_of(fused_decode._library()) == copied.resolve()
    assert _kernel_works()


def _fresh_process(cache: Path, *argv: str) -> subprocess.CompletedProcess:
    """`argv` in a new interpreter that uses `cache` (a rebuild: minutes on a busy machine)."""
    env = {**os.environ, "CALM_CACHE_DIR": str(cache.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=3600)


@pytest.mark.slow
@needs_kernel
@needs_cc
def test_a_library_planted_in_the_cache_never_runs(copied, tmp_path):
    # Every library file in the cache is replaced by one whose constructor writes a marker (it
    # has none of the kernel's symbols either); the records beside them are left as they were.
    from calm.checkpoint import save_checkpoint
    from calm.tokenizer import Tokenizer

    marker = tmp_path / "planted-code-ran"
    planted = _compile_c(PLANTED_C % marker, tmp_path / "planted.so")
    libs = list(copied.parent.rglob("*.so"))
    assert libs
    for lib in libs:
        shutil.copyfile(planted, lib)
    tok = Tokenizer.train_bpe(["the cat sat on the mat. a dog ran far away home."] * 50, vocab_size=300)
    ckpt = save_checkpoint(tmp_path / "calm", _model(), tokenizer=tok)
    res = _fresh_process(copied.parent, "-m", "calm", "generate", str(ckpt), "-p", "the cat", "-n", "8")
    assert not marker.exists(), "the planted library was loaded"
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    _rebuilt(copied)  # under a new name, recorded and verified; the planted entry is gone


@pytest.mark.slow
@needs_kernel
def test_a_damaged_cached_library_is_built_again(copied, tmp_path):
    # one byte flipped in the middle of every library file (bit rot, a bad copy): it still loads
    # as a shared library, so only the recorded hash can tell
    damaged = []
    for lib in copied.parent.rglob("*.so"):
        data = bytearray(lib.read_bytes())
        data[len(data) // 2] ^= 0xFF
        lib.unlink()  # (this process has the original mapped: replace the file, do not overwrite it)
        lib.write_bytes(bytes(data))
        damaged.append(str(lib))
    assert damaged
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_kernel_cache as t\n"
        "from calm import fused_decode\n"
        "ok = fused_decode.available() and t._kernel_works()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('ok' if ok else fused_decode._load()[1])\n"
        f"print('\\n'.join(p for p in {damaged!r} if p in maps))\n"
    )
    res = _fresh_process(copied.parent, "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "ok" and not any(lines[1:]), res.stdout  # works, and no damaged file is mapped
    _rebuilt(copied)
