"""File names written inside a data set's own JSON (meta.json, a datasets state.json) are
trusted only as relative paths that stay inside that directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calm.data.errors import DataError


def resolve_member(root: Path, name: Any, entry: str) -> Path:
    """``root / name`` for a file named inside a data set's own JSON; a name that is not a relative
    path staying inside ``root`` (absolute, ``..``, empty) is an error naming the entry."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{root}: {entry} names {name!r}, not a file name")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts or name.startswith(("/", "\\")):
        raise DataError(
            f"{root}: {entry} names {name!r}, which is outside the directory; every file a data set "
            "names must be a relative path inside it"
        )
    return root / rel
