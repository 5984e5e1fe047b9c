import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread so tests don't oversubscribe.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora beside the clone (../shared/data)."""
    path = Path(os.environ.get("CALM_SHARED_DATA", SHARED_DATA))
    if not path.exists():
        pytest.skip(f"shared corpora not found at {path}")
    return path
