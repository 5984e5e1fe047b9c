"""The Llama-3 tokenizer of a release, with the special ids the released models use."""

from __future__ import annotations

from pathlib import Path

from calm.official.layout import (
    LLAMA3_EOT,
    LLAMA3_PAD,
    OFFICIAL_MASK_ID,
    TOKENIZER_FILE,
    OfficialFormatError,
)

# -- tokenizer -------------------------------------------------------------------------------


def load_official_tokenizer(path: str | Path, *, vocab_size: int | None = None):
    """The Llama-3 ``tokenizer.json`` of a release as our `Tokenizer`, with the ids the model uses.

    End of text is ``<|end_of_text|>``; pad is the authors' ``[PAD]`` (added, at the next id, when
    the file is Meta's original without it); the mask id is 0, the value the released autoencoder
    was trained with (see the module docstring), so nothing is added beyond ``[PAD]`` and the
    vocabulary matches the model's embedding table. Tokenizers without ``<|end_of_text|>`` fall back
    to `Tokenizer.from_file` (which adds its own pad and mask tokens).
    """
    from tokenizers import Tokenizer as HFTokenizer

    from calm.tokenizer import Tokenizer, TokenizerError

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise OfficialFormatError(f"no {TOKENIZER_FILE} at {path}")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as err:
        raise OfficialFormatError(f"{file}: not a valid tokenizer.json ({err})") from err
    eot = hf.token_to_id(LLAMA3_EOT)
    if eot is None:
        tok = Tokenizer.from_file(file)
    else:
        added = []
        pad = hf.token_to_id(LLAMA3_PAD)
        if pad is None:
            hf.add_special_tokens([LLAMA3_PAD])
            pad = hf.token_to_id(LLAMA3_PAD)
            added.append(LLAMA3_PAD)
        try:
            tok = Tokenizer(
                hf, eot_id=eot, pad_id=pad, mask_id=OFFICIAL_MASK_ID, added_tokens=added, source=str(file)
            )
        except TokenizerError as err:
            raise OfficialFormatError(f"{file}: {err}") from err
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise OfficialFormatError(
            f"{file} has {tok.vocab_size} entries but the model's vocabulary has {vocab_size}: "
            "this tokenizer does not belong to the checkpoint"
        )
    return tok


def _find_tokenizer(*dirs: Path | None) -> Path | None:
    for d in dirs:
        if d is not None and (Path(d) / TOKENIZER_FILE).is_file():
            return Path(d) / TOKENIZER_FILE
    return None
