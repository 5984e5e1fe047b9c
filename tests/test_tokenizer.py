"""Tokenizer: byte-level BPE training, exact round trip, special ids, tokenizer.json loading."""

import json

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from calm.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln — naïve café, déjà vu.",
    "日本語のテキストと emoji 🙂🚀 mixed in.",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n",
    "Numbers 1234567 and symbols @-@ <unk> = = Title = =",
] * 20

# The Llama-3 pre-tokenizer regex (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama_style_tokenizer_json(path, *, bpe_size=None, with_pad=False):
    """A small tokenizer.json laid out like Llama-3's: byte-level BPE behind a regex Split,
    ``ignore_merges``, a BOS-adding post-processor, and special tokens added after the BPE
    vocabulary (``<|begin_of_text|>`` = V, ``<|end_of_text|>`` = V+1, reserved tokens, and the
    CALM authors' ``[PAD]`` when ``with_pad``). ``bpe_size`` pads the BPE vocabulary with
    unreachable filler entries (Llama-3 has 128,000)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(TEXTS, trainer)
    d = json.loads(hf.to_str())
    vocab = d["model"]["vocab"]
    if bpe_size is not None:
        for i in range(len(vocab), bpe_size):
            vocab[f"<filler{i}>"] = i
    v = len(vocab)
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
    ]
    if with_pad:
        names.append("[PAD]")
    d["added_tokens"] = [
        {
            "id": v + i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in enumerate(names)
    ]
    d["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    d["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    bos,
                    {"Sequence": {"id": "A", "type_id": 0}},
                    bos,
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {
                    "<|begin_of_text|>": {
                        "id": "<|begin_of_text|>",
                        "ids": [v],
                        "tokens": ["<|begin_of_text|>"],
                    }
                },
            },
        ],
    }
    path.write_text(json.dumps(d))
    return v


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(iter(TEXTS), vocab_size=320)


def test_train_bpe_special_ids(bpe):
    assert (bpe.eot_id, bpe.pad_id, bpe.mask_id) == (0, 1, 2)
    assert bpe.mask_id != 0  # dedicated mask, never id 0 (the reference code's bug)
    assert bpe.vocab_size <= 320
    assert bpe.id_to_token(bpe.eot_id) == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS[:5] + ["", "\u00a0\u2028 odd whitespace \ufffd", "x" * 1000])
def test_round_trip_non_ascii(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, text]) == [ids, ids]


def test_special_strings_in_text_are_text(bpe):
    text = "before <|endoftext|> after"
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids  # data can't fake a document boundary
    assert bpe.decode(ids) == text
    assert bpe.eot_id in bpe.encode(text, allow_special=True)
    assert bpe.decode([*bpe.encode("a"), bpe.eot_id], skip_special=False) == "a<|endoftext|>"
    assert bpe.decode([*bpe.encode("a"), bpe.eot_id]) == "a"


def test_train_from_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(TEXTS), encoding="utf-8")
    tok = Tokenizer.train_bpe([f], vocab_size=300)
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    with pytest.raises(FileNotFoundError):
        Tokenizer.train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train_bpe(iter(TEXTS), vocab_size=100)


def test_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer_meta.json").read_text())
    assert meta["eot_id"] == 0 and meta["pad_id"] == 1 and meta["mask_id"] == 2
    assert meta["vocab_size"] == bpe.vocab_size
    again = Tokenizer.load(tmp_path / "tok")
    assert (again.eot_id, again.pad_id, again.mask_id, again.vocab_size) == (0, 1, 2, bpe.vocab_size)
    for text in TEXTS[:5]:
        assert again.encode(text) == bpe.encode(text)
    # also loadable from the bare file
    assert Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json").eot_id == 0


def test_llama3_style_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    v = llama_style_tokenizer_json(path)
    tok = Tokenizer.from_file(path)
    assert tok.eot_id == v + 1  # <|end_of_text|>
    # no pad, no mask in the file: both added at the end, vocabulary grows by two
    assert (tok.pad_id, tok.mask_id) == (v + 4, v + 5)
    assert tok.added_tokens == ["<|pad|>", "<|mask|>"]
    assert tok.vocab_size == v + 6
    text = "Grüße, 日本語 🙂 it's 12345!\n\nnext"
    ids = tok.encode(text)
    assert v not in ids  # the post-processor's BOS is not added
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eot_id], skip_special=False) == text + "<|end_of_text|>"
    # save/load keeps the grown vocabulary and the ids
    tok.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert (again.eot_id, again.pad_id, again.mask_id, again.vocab_size) == (v + 1, v + 4, v + 5, v + 6)
    assert again.encode(text) == ids


def test_authors_style_tokenizer_with_pad(tmp_path):
    """The CALM authors' tokenizer: Llama-3 plus [PAD] right after the special tokens."""
    path = tmp_path / "tokenizer.json"
    v = llama_style_tokenizer_json(path, with_pad=True)
    tok = Tokenizer.from_file(path)
    assert tok.pad_id == v + 4 and tok.id_to_token(tok.pad_id) == "[PAD]"
    assert tok.mask_id == v + 5 and tok.added_tokens == ["<|mask|>"]
    assert tok.vocab_size == v + 6


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad)
    # a tokenizer without any known end-of-text token
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    hf.save(str(tmp_path / "noeot.json"))
    with pytest.raises(TokenizerError, match="end-of-text"):
        Tokenizer.from_file(tmp_path / "noeot.json")
