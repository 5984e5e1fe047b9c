"""``key=value`` overrides of a config: ``["d_model=256", "lr=1e-3"]`` -> a new config.

`apply_overrides` casts each string to its field's type and names an unknown field;
`split_overrides` routes a mixed list to the model or the training config. Re-exported by
`calm.config`, the public entry point.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from calm.config import ConfigError


def _cast(value: str, annotation: Any, name: str):
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(
            annotation.split("|")[0].strip(), str
        )
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return int(float(value)) if "e" in value.lower() else int(value)
        if annotation is float:
            return float(value)
        if annotation is dict:
            return json.loads(value)
        return annotation(value)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"cannot read {name}={value!r} as {getattr(annotation, '__name__', annotation)}"
        ) from err


def apply_overrides(cfg, overrides: list[str] | None):
    """Return a copy of `cfg` with ``key=value`` strings applied (values cast to the field type)."""
    if not overrides:
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"{type(cfg).__name__} has no field {key!r}; fields: {', '.join(sorted(fields))}"
            )
        changes[key] = _cast(value.strip(), fields[key].type, key)
    return dataclasses.replace(cfg, **changes)


def split_overrides(cfg_a, cfg_b, overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Route each ``key=value`` to whichever of two configs has that field (model vs training)."""
    a_names = {f.name for f in dataclasses.fields(cfg_a)}
    b_names = {f.name for f in dataclasses.fields(cfg_b)}
    to_a, to_b = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip().replace("-", "_")
        if key in a_names:
            to_a.append(item)
        elif key in b_names:
            to_b.append(item)
        else:
            raise ConfigError(
                f"no config field named {key!r}; model fields: {', '.join(sorted(a_names))}; "
                f"training fields: {', '.join(sorted(b_names))}"
            )
    return to_a, to_b
