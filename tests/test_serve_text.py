"""calm.serve.text: incremental detokenization and stop sequences on a real byte-level BPE."""

from __future__ import annotations

import random

import pytest

from calm.serve.text import CompletionText
from calm.tokenizer import Tokenizer

TEXT = "naïve café — 日本語 the cat sat on the mat. " * 3


@pytest.fixture(scope="module")
def tok():
    rnd = random.Random(0)
    words = "the cat sat on mat naïve café 日本語 — dog ran".split()
    return Tokenizer.train_bpe(
        [" ".join(rnd.choice(words) for _ in range(20)) for _ in range(200)], vocab_size=300
    )


def _pieces(tok, ids, stops, step):
    t = CompletionText(tok, stops)
    out = [t.push(ids[i : i + step]) for i in range(0, len(ids), step) if not t.stopped]
    out.append(t.finish())
    return out, t


@pytest.mark.parametrize("step", [1, 3, 4])
def test_pieces_concatenate_to_the_decoded_text_and_never_split_a_character(tok, step):
    ids = tok.encode(TEXT)
    pieces, t = _pieces(tok, ids, [], step)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert t.stop_tokens is None and not t.stopped
    # byte-level tokens that split a multi-byte character: the character comes out whole
    byte_ids = [tok.encode(c) for c in "日本"]
    assert "".join(_pieces(tok, [i for ids in byte_ids for i in ids], [], 1)[0]) == "日本"


@pytest.mark.parametrize("step", [1, 4])
def test_a_stop_sequence_ends_the_text_before_it_and_is_never_sent(tok, step):
    ids = tok.encode(TEXT)
    stop = "the mat"
    pieces, t = _pieces(tok, ids, ["never there", stop], step)
    assert "".join(pieces) == TEXT[: TEXT.index(stop)] and t.stopped
    # the tokens counted are those up to the one that completed the stop sequence
    n = t.stop_tokens
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[: n - 1])
    # a partial stop sequence is held back, then released when it turns out not to be one
    ids = tok.encode("the cat sat")
    pieces, t = _pieces(tok, ids, ["the cats"], 1)
    assert "".join(pieces) == "the cat sat" and not t.stopped
    held = next(j for j in range(1, len(ids) + 1) if not "the cats".startswith(tok.decode(ids[:j])))
    assert held > 1 and "".join(pieces[: held - 1]) == ""  # "the", "the cat": maybe "the cats"
