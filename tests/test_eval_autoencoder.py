import pytest
import torch

from calm.config import preset
from calm.eval_autoencoder import format_reconstruction, reconstruction_report
from calm.models.autoencoder import ChunkAutoencoder


class IdentityCoder(torch.nn.Module):
    """A fake autoencoder whose latent is the chunk itself and whose decoder rounds: exact answers known."""

    def __init__(self):
        super().__init__()
        self.config = preset("ae-tiny").replace(latent_dim=4)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode(self, chunks):
        mu = chunks.float()
        return mu, torch.full_like(mu, -100.0)  # σ ≈ 0

    def decode(self, z):
        return z.round().long()


def test_exact_accuracy_of_a_known_coder():
    tokens = torch.arange(3, 3 + 4 * 50)
    rep = reconstruction_report(IdentityCoder(), tokens, noise_levels=(0.1, 0.5), progress=False)
    assert rep["chunks"] == 50 and rep["tokens"] == 200
    assert rep["settings"]["mu"]["token_acc"] == 1.0
    assert rep["settings"]["posterior"]["chunk_acc"] == 1.0
    # Noise 0.1: a token flips when |N(0, .01)| > 0.5, i.e. 5 sigma: essentially never.
    assert rep["settings"]["noise_0.1"]["token_acc"] > 0.99
    # Noise 0.5: P(|N(0, .25)| < 0.5) = P(|Z| < 1) = 0.6827; 200 tokens -> se 0.033
    acc = rep["settings"]["noise_0.5"]["token_acc"]
    assert abs(acc - 0.6827) < 4 * 0.033
    assert "z = μ" in format_reconstruction(rep)


def test_real_autoencoder_runs_and_ragged_tail_is_dropped():
    torch.manual_seed(0)
    ae = ChunkAutoencoder(preset("ae-tiny"))
    rep = reconstruction_report(ae, torch.randint(3, 512, (42,)), progress=False)
    assert rep["chunks"] == 10
    for row in rep["settings"].values():
        assert 0.0 <= row["token_acc"] <= 1.0


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4 tokens"):
        reconstruction_report(IdentityCoder(), torch.arange(3), progress=False)
