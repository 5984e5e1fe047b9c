"""Tokenizers for CALM: train a byte-level BPE, or load any Hugging Face ``tokenizer.json``.

Every tokenizer used by the library carries three special ids (see ``docs/ARCHITECTURE.md``):

- ``eot_id``  end of text; separates documents in the token shards;
- ``pad_id``  left padding in generation (never attended);
- ``mask_id`` the autoencoder's token-dropout mask. It is a *dedicated* token: the reference
  code reuses id 0, which is an ordinary token there, so masked inputs look like real text.

A freshly trained BPE gets ``<|endoftext|>`` = 0, ``<|pad|>`` = 1, ``<|mask|>`` = 2 inside the
requested vocabulary size. A loaded ``tokenizer.json`` keeps all its ids; the end-of-text token is
looked up among well-known names (:data:`EOT_NAMES`), and a pad and a mask token are **added at
the end of the vocabulary when the file has none**, so the vocabulary grows by up to two entries.
For the Llama-3 tokenizer (128,256 entries, ``<|end_of_text|>`` = 128001) that gives
``<|pad|>`` = 128256 (the id the CALM authors give their added ``[PAD]``) and ``<|mask|>`` =
128257, 128,258 entries in all; the authors' own tokenizer.json, which already has ``[PAD]`` =
128256, grows by the mask token only (128,258 entries).

Encoding never adds BOS/EOS through the tokenizer's post-processor (documents are separated by
``eot_id`` explicitly) and, by default, treats special-token strings that occur inside ordinary
text (say a literal ``"<|endoftext|>"`` in a web page) as text, so data can't fake a document
boundary. ``save(dir)`` writes ``tokenizer.json`` and ``tokenizer_meta.json``; ``load(dir)``
reads them back with the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN, MASK_TOKEN)

#: Names tried, in order, for the end-of-text token of a loaded tokenizer.
EOT_NAMES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<|eot_id|>",
    "<eos>",
    "[EOS]",
    "<|im_end|>",
    "<|end|>",
)
#: Names tried, in order, for an existing padding token.
PAD_NAMES = ("<|pad|>", "[PAD]", "<pad>", "<|padding|>", "<|finetune_right_pad_id|>")
#: Names tried, in order, for an existing mask token.
MASK_NAMES = ("<|mask|>", "[MASK]", "<mask>")

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


class TokenizerError(ValueError):
    """A tokenizer file that can't be used (missing, unreadable, no end-of-text token...)."""


class Tokenizer:
    """A thin wrapper over :class:`tokenizers.Tokenizer` that knows the special ids CALM needs.

    Build one with :meth:`train_bpe`, :meth:`from_file` (any ``tokenizer.json``) or :meth:`load`
    (a directory written by :meth:`save`).
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        eot_id: int,
        pad_id: int,
        mask_id: int,
        added_tokens: Sequence[str] = (),
        source: str | None = None,
    ):
        self.hf = hf
        self.eot_id = int(eot_id)
        self.pad_id = int(pad_id)
        self.mask_id = int(mask_id)
        #: special tokens this library added to a loaded vocabulary (documented growth).
        self.added_tokens = list(added_tokens)
        self.source = source
        # Literal special-token strings inside text are encoded as text (see module doc).
        self.hf.encode_special_tokens = True
        self._vocab_size = _vocab_size(hf)
        for name, i in (("eot_id", self.eot_id), ("pad_id", self.pad_id), ("mask_id", self.mask_id)):
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"{name}={i} is outside the vocabulary (size {self._vocab_size})")
        if len({self.eot_id, self.pad_id, self.mask_id}) != 3:
            raise TokenizerError(
                f"eot_id, pad_id and mask_id must differ (got {self.eot_id}, {self.pad_id}, {self.mask_id})"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def train_bpe(
        cls,
        files_or_iterator: str | os.PathLike | Iterable[str | os.PathLike] | Iterable[str],
        vocab_size: int = 8192,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
        batch_size: int = 1000,
        length: int | None = None,
    ) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style: no unknown tokens, exact round trip).

        ``files_or_iterator`` is a path, a list of paths (read by the Rust trainer, one line
        per sequence), or any iterable of text strings (documents; consumed once, in
        ``batch_size`` batches, so memory stays bounded by the trainer's word counts rather than
        the corpus). ``vocab_size`` counts the 256 byte symbols and the three special tokens
        ``<|endoftext|>`` = 0, ``<|pad|>`` = 1, ``<|mask|>`` = 2; a small corpus may give fewer
        entries than asked for.
        """
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + 3 special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        if isinstance(files_or_iterator, (str, os.PathLike)):
            files_or_iterator = [files_or_iterator]
        items = files_or_iterator
        if isinstance(items, (list, tuple)) and items and all(isinstance(p, os.PathLike) for p in items):
            files = [os.fspath(p) for p in items]
            _check_files(files)
            hf.train(files, trainer)
        elif isinstance(items, (list, tuple)) and items and all(_is_existing_file(p) for p in items):
            files = [os.fspath(p) for p in items]
            hf.train(files, trainer)
        else:
            hf.train_from_iterator(_batched(items, batch_size), trainer, length=length)
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        return cls(hf, eot_id=ids[0], pad_id=ids[1], mask_id=ids[2], source="trained byte-level BPE")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load any Hugging Face ``tokenizer.json`` (GPT-2, Llama-3, ...).

        The end-of-text token is found among :data:`EOT_NAMES`; a pad and a mask token are
        reused when present (:data:`PAD_NAMES`, :data:`MASK_NAMES`) and otherwise **added**
        (``<|pad|>``, ``<|mask|>``) at the end of the vocabulary, which then grows by those
        entries (listed in :attr:`added_tokens`).
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        eot = _find(hf, EOT_NAMES)
        if eot is None:
            raise TokenizerError(
                f"{path}: no end-of-text token found; looked for {', '.join(EOT_NAMES)}. "
                "Add one to the tokenizer's added_tokens."
            )
        added = []
        pad = _find(hf, PAD_NAMES)
        if pad is None:
            hf.add_special_tokens([PAD_TOKEN])
            pad = hf.token_to_id(PAD_TOKEN)
            added.append(PAD_TOKEN)
        mask = _find(hf, MASK_NAMES)
        if mask is None:
            hf.add_special_tokens([MASK_TOKEN])
            mask = hf.token_to_id(MASK_TOKEN)
            added.append(MASK_TOKEN)
        return cls(hf, eot_id=eot, pad_id=pad, mask_id=mask, added_tokens=added, source=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory written by :meth:`save` (or a bare ``tokenizer.json`` / its directory).

        With ``tokenizer_meta.json`` present the recorded special ids are used as they are, so a
        reloaded tokenizer has exactly the ids it was saved with.
        """
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer not found: {path}")
        directory = path if path.is_dir() else path.parent
        file = path if path.is_file() else path / TOKENIZER_FILE
        meta_path = directory / META_FILE
        if not file.is_file():
            raise TokenizerError(f"no {TOKENIZER_FILE} in {directory}")
        if not meta_path.is_file():
            return cls.from_file(file)
        try:
            meta = json.loads(meta_path.read_text())
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"{directory}: can't read the tokenizer ({e})") from e
        tok = cls(
            hf,
            eot_id=meta["eot_id"],
            pad_id=meta["pad_id"],
            mask_id=meta["mask_id"],
            added_tokens=meta.get("added_tokens", []),
            source=meta.get("source"),
        )
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise TokenizerError(
                f"{directory}: tokenizer_meta.json says vocab_size={meta['vocab_size']} "
                f"but tokenizer.json has {tok.vocab_size} entries"
            )
        return tok

    @classmethod
    def from_str(cls, hf_json: str, **special: Any) -> Tokenizer:
        """Rebuild from :meth:`to_str` output plus the special ids (used by worker processes)."""
        return cls(HFTokenizer.from_str(hf_json), **special)

    def to_str(self) -> str:
        return self.hf.to_str()

    def fingerprint(self) -> str:
        """SHA-256 of what decides the ids: the tokenizer JSON and the special ids.

        Two tokenizers with the same fingerprint turn every text into the same ids, so a model
        trained with one can be trained further, or evaluated, on data prepared with the other.
        """
        special = json.dumps([self.eot_id, self.pad_id, self.mask_id])
        return hashlib.sha256((self.to_str() + "\n" + special).encode()).hexdigest()

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1), added tokens included: the embedding table size."""
        return self._vocab_size

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added. ``allow_special=True`` lets special-token
        strings in the text become their special ids."""
        if allow_special:
            self.hf.encode_special_tokens = False
            try:
                return self.hf.encode(text, add_special_tokens=False).ids
            finally:
                self.hf.encode_special_tokens = True
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (multi-threaded in Rust; order preserved)."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``. ``skip_special=False`` keeps special tokens (e.g. ``<|endoftext|>``)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id}, "
            f"mask_id={self.mask_id}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict[str, Any]:
        """The facts recorded in ``tokenizer_meta.json`` (and in a data set's ``meta.json``)."""
        return {
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "eot_token": self.id_to_token(self.eot_id),
            "pad_token": self.id_to_token(self.pad_id),
            "mask_token": self.id_to_token(self.mask_id),
            "added_tokens": list(self.added_tokens),
            "model": type(self.hf.model).__name__,
            "source": self.source,
        }

    def special_ids(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`from_str`."""
        return {
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "added_tokens": self.added_tokens,
            "source": self.source,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_meta.json`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=2) + "\n")
        return directory


# ---------------------------------------------------------------------- helpers
def _vocab_size(hf: HFTokenizer) -> int:
    size = hf.get_vocab_size(with_added_tokens=True)
    added = hf.get_added_tokens_decoder()
    if added:
        size = max(size, max(added) + 1)
    return size


def _find(hf: HFTokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        i = hf.token_to_id(name)
        if i is not None:
            return i
    return None


def _is_existing_file(p: object) -> bool:
    return isinstance(p, (str, os.PathLike)) and len(os.fspath(p)) < 4096 and os.path.isfile(p)


def _check_files(files: Sequence[str]) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"tokenizer training file(s) not found: {', '.join(missing)}")


def _batched(items: Iterable[Any], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in items:
        batch.append(os.fspath(x) if isinstance(x, os.PathLike) else x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
