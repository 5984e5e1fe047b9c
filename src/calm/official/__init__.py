"""Load and convert the checkpoints the CALM authors released (Hugging Face layout).

The authors publish an autoencoder (``cccczshao/CALM-Autoencoder``) and CALM models
(``cccczshao/CALM-M``, ``-L``, ``-XL``) as Hugging Face directories: a ``config.json`` with
``patch_size`` and ``latent_size``, and the weights as ``pytorch_model.bin``, sharded
``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``, or
``model.safetensors`` (optionally sharded with ``model.safetensors.index.json``).

This module maps them onto our modules with *explicit* key maps (`autoencoder_key_map`,
`calm_key_map`: every official name and the name it gets here), checks that the config and the
tensors agree, and builds the model without ever holding two copies of the weights:

* tensors are memory-mapped (``torch.load(..., mmap=True, weights_only=True)`` and safetensors'
  ``safe_open``), so nothing is read until it is used;
* the model is built under ``torch.device("meta")`` (no allocation, no random init), the
  mapped tensors are then assigned into it (``load_state_dict(assign=True)``) and the buffers
  that are functions of the config (rotary tables) are computed.

So a loaded model's weights are (copy-on-write) views of the files, and converting a checkpoint
(`convert_official`) touches each byte once on the way to the new ``model.safetensors``: peak
memory stays near one copy of the weights (``benchmarks/bench_convert.py`` measures it).

Things about the release worth knowing (all handled here):

* The autoencoder's output matrix ``decoder.lm_head_weight`` *is* the input embedding (tied).
  safetensors files drop it; it is restored from ``encoder.embed_tokens.weight``. When present it
  must equal the embedding: our autoencoder ties the two, so an *untied* head cannot be
  represented and is refused (`OfficialFormatError`) rather than silently replaced.
* The CALM head is stored twice, as ``generative_head.`` and ``mlp_generator.`` (one module under
  two names). One copy is taken; when both are present they must be identical.
* A CALM checkpoint saved by the authors' training code also holds the whole frozen autoencoder
  under ``ae_model.``; it is used when no separate autoencoder directory is given. Its config is
  not stored, so its sizes are read off the tensor shapes (its training-only settings — KL clamp
  and weight, dropout — get the paper's values).
* ``ae_path`` in the CALM config is an absolute path on the authors' machine and is ignored,
  except that its last component is looked for beside the CALM directory (e.g. a sibling
  ``CALM-Autoencoder`` download).
* The released autoencoder was trained with token id 0 as its token-drop "mask" (an ordinary
  token in Llama-3). The converted autoencoder keeps ``mask_id = 0`` so its embedding table keeps
  its 128,257 rows and its behaviour is the one it was trained with. The mask only matters for
  *training* (fine-tuning) the autoencoder; encoding, decoding, evaluation and generation never
  use it. The tokenizer attached to a converted model uses the same ids (end of text
  ``<|end_of_text|>`` = 128001, ``[PAD]`` = 128256, mask 0) so model and tokenizer agree.

The package is split by job: `calm.official.layout` (layout detection, reading files),
`calm.official.keymaps` (the key maps), `calm.official.configs` (config translation),
`calm.official.build` (building our models on the mapped tensors), `calm.official.tokenizer`,
`calm.official.convert` (`load_official`, `convert_official`); the command line is
`calm.official_cli` (outside the package, so that its ``--help`` imports no torch).

Command line: ``calm convert-official --calm DIR --ae DIR [--tokenizer DIR] --out DIR [--json]``
(``--ae`` alone converts just an autoencoder).
"""

from __future__ import annotations

from calm.official.build import build_from_tensors
from calm.official.configs import autoencoder_config_from_official, calm_config_from_official
from calm.official.convert import LoadReport, convert_official, load_official
from calm.official.keymaps import autoencoder_key_map, calm_key_map
from calm.official.layout import (
    OfficialCheckpoint,
    OfficialFormatError,
    detect_layout,
    open_official,
    read_official_config,
)
from calm.official.tokenizer import load_official_tokenizer

__all__ = [
    "OfficialFormatError",
    "OfficialCheckpoint",
    "LoadReport",
    "autoencoder_key_map",
    "calm_key_map",
    "detect_layout",
    "open_official",
    "read_official_config",
    "build_from_tensors",
    "autoencoder_config_from_official",
    "calm_config_from_official",
    "load_official_tokenizer",
    "load_official",
    "convert_official",
]
