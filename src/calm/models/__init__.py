"""Model classes, one per config kind. `build_model(config)` makes the right one."""

from __future__ import annotations

import importlib

# kind -> (module, class name); imported lazily so that each model file stays independent.
MODEL_CLASSES = {
    "autoencoder": ("calm.models.autoencoder", "ChunkAutoencoder"),
    "calm": ("calm.models.calm", "CALM"),
    "ar": ("calm.models.ar", "TokenTransformer"),
}


def model_class(kind: str):
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def build_model(config):
    """Instantiate the model described by `config` (its `kind` picks the class)."""
    return model_class(config.kind)(config)
