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


def build_model(config, device=None, *, init: bool = True):
    """Instantiate the model described by `config` (its `kind` picks the class).

    device: where to allocate it (default: the default device); ``"meta"`` allocates nothing
    (materialise later with `calm.models.layers.materialize` and call ``init_weights()``).
    init: False leaves the parameters uninitialised (allocated, not drawn): for a caller that
    loads every weight next, e.g. from a checkpoint. Buffers (rotary tables) are computed.
    """
    import torch

    from calm.models.layers import materialize, reset_buffers

    with torch.device("meta"):
        model = model_class(config.kind)(config)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        return model
    materialize(model, device)
    with torch.no_grad():
        if init:
            model.init_weights()
        else:
            reset_buffers(model)
    return model
