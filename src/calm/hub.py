"""Model names that are Hugging Face Hub repo ids, resolved from the *local* Hub cache only.

``calm.load("cccczshao/CALM-M")``, ``calm eval cccczshao/CALM-M`` and ``calm generate`` accept a
repo id (``owner/name``, optionally ``owner/name@revision``) wherever they take a checkpoint
directory. It is looked up with `huggingface_hub.snapshot_download(..., local_files_only=True)`
in the cache that ``huggingface-cli download`` fills (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``; read at call time). This never makes a network call: a repo
that is not in the cache is an error saying how to download it. A local path that exists always
wins over a repo id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name: letters, digits, '-', '_', '.'; no leading '.', no '..' (huggingface_hub's rule).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?$")


class HubError(FileNotFoundError):
    """A repo id that is not in the local Hugging Face cache (the message says how to get it)."""


def hub_cache_dir() -> Path:
    """The Hub cache directory, from the environment as `huggingface_hub` reads it."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def parse_repo_id(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is spelled as a Hub repo id, else None."""
    text = os.fspath(name)
    m = _REPO_ID.match(text)
    if m is None or ".." in text:
        return None
    return m.group("repo"), m.group("rev")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` (at ``revision``, default ``main``); `HubError`
    if it is not in the cache. Offline by construction (``local_files_only=True``)."""
    cache = hub_cache_dir()
    how = (
        f"download it first with `huggingface-cli download {repo_id}` (or `hf download {repo_id}`; "
        "set HF_HOME / HF_HUB_CACHE if your cache is elsewhere), or give a local directory"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(
            f"{repo_id} looks like a Hugging Face repo id, but huggingface_hub is not installed "
            "(pip install huggingface_hub); or give a local directory"
        ) from None
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends: not (completely) in the cache
        at = f" at revision {revision!r}" if revision else ""
        raise HubError(
            f"{repo_id}{at} not found: no such directory, and it is not in the local Hugging Face "
            f"cache ({cache}); to use the Hub repo, {how}"
        ) from e
    return Path(path)


def is_hub_name(name: str | os.PathLike) -> bool:
    """``name`` is not an existing path and is spelled like a repo id (so it is looked up)."""
    return not Path(name).exists() and parse_repo_id(name) is not None


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A checkpoint directory: ``name`` itself when it exists (or is not spelled like a repo id),
    else the cached snapshot of the repo id ``name``."""
    path = Path(name)
    if path.exists():
        return path
    parsed = parse_repo_id(name)
    if parsed is None:
        return path
    return cached_snapshot(*parsed)


def cached_sibling(path: str | os.PathLike, name: str) -> Path | None:
    """For ``path`` inside a cached snapshot (``<cache>/models--OWNER--REPO/snapshots/<rev>``), the
    cached snapshot of ``OWNER/name`` (e.g. the ``CALM-Autoencoder`` of ``cccczshao/CALM-M``);
    None when ``path`` is not in a Hub cache or that repo is not cached."""
    p = Path(path).resolve()
    for snapshots in (p.parent, *p.parents):
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
            parts = snapshots.parent.name.split("--")
            repo_id = f"{parts[1]}/{name}" if len(parts) == 3 else None
            if repo_id is None or parse_repo_id(repo_id) is None:
                return None
            try:
                from huggingface_hub import snapshot_download

                found = snapshot_download(
                    repo_id, cache_dir=str(snapshots.parent.parent), local_files_only=True
                )
            except Exception:  # not cached (or huggingface_hub missing): no sibling
                return None
            return Path(found)
    return None
