"""The data the training loop reads: the `DataSource` protocol, `PreparedData` (a `calm prepare`
directory) and the check that data and model share a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

from calm.config import ConfigError


class DataSource(Protocol):
    """What the loop needs from a data set (`PreparedData` wraps `calm prepare` output)."""

    def train_batch(
        self, step: int, batch_size: int, block_size: int, seed: int, rank: int, world_size: int
    ) -> torch.Tensor: ...  # LongTensor [batch_size // world_size, block_size]

    def val_windows(
        self, block_size: int, count: int
    ) -> torch.Tensor: ...  # LongTensor [<= count, block_size]


class PreparedData:
    """A data set written by `calm prepare`: `batch_for_step` for training, the first
    consecutive windows of the validation split for evaluation."""

    def __init__(self, data_dir: str | os.PathLike):
        from calm.data import TokenShards

        self.data_dir = Path(data_dir)
        self.train = TokenShards(self.data_dir, "train")
        try:
            self.val = TokenShards(self.data_dir, "val")
        except ValueError:
            self.val = None

    def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
        from calm.data import batch_for_step

        return batch_for_step(
            self.train, step, batch_size, block_size, seed, rank=rank, world_size=world_size
        )

    def val_windows(self, block_size, count):
        from calm.data import eval_windows

        if self.val is None or count < 1:
            return torch.zeros(0, block_size, dtype=torch.long)
        batches = list(eval_windows(self.val, block_size, max_tokens=count * block_size, batch_size=count))
        return torch.cat(batches) if batches else torch.zeros(0, block_size, dtype=torch.long)

    def tokenizer(self):
        return self.train.tokenizer()

    def check_token_ids(self, vocab_size: int) -> None:
        """A clear error before training if an id is outside the model's vocabulary (`calm.data`)."""
        for split in (self.train, self.val):
            if split is not None:
                split.check_token_ids(min(int(vocab_size), split.vocab_size))


def check_same_tokenizer(trained_with, data_tok, what: str, whose: str, data_dir) -> None:
    """Refuse data prepared with another tokenizer than the one a model was trained with.

    Compares `Tokenizer.fingerprint` (the tokenizer JSON and the special ids): two tokenizers
    of the same size can still map text to different ids. `what` names the model ("the
    autoencoder in DIR"), `whose` the tokenizer to use ("the autoencoder's").
    """
    if trained_with is None:
        return
    if trained_with.vocab_size != data_tok.vocab_size or trained_with.fingerprint() != data_tok.fingerprint():
        raise ConfigError(
            f"{what} was trained with a different tokenizer than the data in {data_dir}; "
            f"prepare the data with {whose} tokenizer"
        )
