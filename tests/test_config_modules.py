"""`calm.config` re-exports the names of `calm.presets` and `calm.config_overrides`.

Each module imports in a fresh interpreter whichever is imported first (the presets and overrides
import the config classes, so an eager re-export would be a circular import), without torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import calm.config
import calm.config_overrides
import calm.presets

REEXPORTED = {
    calm.presets: ("PRESETS", "preset", "_paper_calm", "_paper_ar"),
    calm.config_overrides: ("apply_overrides", "split_overrides", "_cast"),
}


@pytest.mark.parametrize("first", ["calm.config", "calm.presets", "calm.config_overrides"])
def test_each_module_imports_first_without_torch(first):
    names = ", ".join(name for names in REEXPORTED.values() for name in names)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"import {first}\n"
        f"from calm.config import {names}\n"
        "assert preset('calm-tiny').kind == 'calm'\n"
        "assert apply_overrides(preset('ae-tiny'), ['latent_dim=8']).latent_dim == 8\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module,name", [(m, n) for m, names in REEXPORTED.items() for n in names])
def test_config_reexports_the_same_object(module, name):
    assert getattr(calm.config, name) is getattr(module, name)
    assert name in dir(calm.config)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        calm.config.no_such_name  # noqa: B018
    assert not hasattr(calm.config, "no_such_name")
