"""Graphs and graph breaks of each tiny model's loss under `torch._dynamo.explain` (issue 15).

    python benchmarks/compile_graphs.py

One graph and no break means `torch.compile(model.loss, fullgraph=True)` compiles the whole
loss (tests/test_compile.py holds that). Measured: before the compile-clean change (c98958d)
calm-tiny 7 graphs / 6 breaks and transformer-tiny 8 / 7; after, 1 / 0 for all three.
"""

from __future__ import annotations

import torch
import torch._dynamo as dynamo

from calm.config import preset
from calm.models import build_model
from calm.train import build_calm_from_autoencoder


def main() -> int:
    torch.manual_seed(0)
    ae = build_model(preset("ae-tiny"))
    calm_cfg = preset("calm-tiny").replace(
        vocab_size=ae.config.vocab_size,
        chunk_size=ae.config.chunk_size,
        latent_dim=ae.config.latent_dim,
        autoencoder=ae.config.to_dict(),
    )
    models = {
        "ae-tiny": ae,
        "calm-tiny": build_calm_from_autoencoder(calm_cfg, ae),
        "transformer-tiny": build_model(preset("transformer-tiny")),
    }
    for name, model in models.items():
        tokens = torch.randint(0, model.config.vocab_size, (2, 64))
        report = dynamo.explain(model.loss)(tokens)
        print(f"{name}: {report.graph_count} graph(s), {report.graph_break_count} break(s)")
        dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
