"""calm: Continuous Autoregressive Language Models (Shao et al., 2025) in PyTorch.

`calm.load(path)` returns the model stored in a checkpoint directory (autoencoder, CALM or
token baseline) with its tokenizer attached as `model.tokenizer`.
"""

__version__ = "0.1.0"


def load(path, device=None, dtype=None, *, verify: bool = True):
    """Load the model in checkpoint directory `path` (ours, or the authors' released layout), or of
    a Hugging Face repo id such as ``"cccczshao/CALM-M"`` taken from the local Hub cache (`calm.hub`).

    ``verify=False`` skips the SHA-256 check of the weights and the refusal of non-finite ones.
    """
    from calm.checkpoint import load_model

    return load_model(path, device=device, dtype=dtype, verify=verify)


__all__ = ["__version__", "load"]
