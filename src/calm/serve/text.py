"""A completion's text as its tokens arrive: incremental decoding and stop sequences.

`CompletionText.push(tokens)` returns the text that can be sent now. Text is held back while
it ends in an incomplete UTF-8 character (U+FFFD) or in a prefix of a stop sequence (it may
turn out to be the start of one, and a stop sequence is never sent). When a stop sequence
appears, the text before it is released and the completion ends; the tokens it took are
counted up to the one that completed the stop sequence. Streamed pieces concatenate to the
non-streamed text, because both are these pieces.
"""

from __future__ import annotations

__all__ = ["CompletionText"]


class CompletionText:
    """The text of one completion (`push` per decoding step, `finish` at the end).

    Decoding is incremental (the usual offsets scheme of streaming detokenizers): each step
    decodes only the tokens since the last complete character, with the few tokens before
    them as context (a decoder may render a token differently after another), so a long
    completion costs O(new tokens) per step, not O(all tokens).
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.text = ""  # the tokens' text, complete characters only
        self._prefix = self._read = 0  # token offsets: context start, end of the decoded part
        self.sent = ""  # text released so far
        self.stopped = False  # a stop sequence ended the completion
        self.stop_tokens: int | None = None  # with a stop: tokens up to the one completing it

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _detokenize(self, final: bool = False) -> None:
        if final:  # once: the whole text, incomplete characters included
            whole = self._decode(self.tokens)
            if whole.startswith(self.text):
                self.text = whole
            return
        context = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        if len(full) > len(context) and not full.endswith("\ufffd") and full.startswith(context):
            self.text += full[len(context) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def push(self, tokens: list[int]) -> str:
        """Add the step's tokens; return the text that may be sent now ("" if none)."""
        before, searched = len(self.tokens), len(self.text)
        self.tokens.extend(tokens)
        self._detokenize()
        text = self.text
        if self.stops:
            start = max(0, searched - self.longest_stop + 1)
            cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self.stop_tokens = self._tokens_until_stop(before)
                return self._release(text[:cut])
            text = text[: len(text) - self._held_back(text)]
        return self._release(text)

    def finish(self) -> str:
        """The end (end of text, max_tokens): the rest of the text, nothing held back."""
        if self.stopped:
            return ""
        self._detokenize(final=True)
        return self._release(self.text)

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        new = text[len(self.sent) :]
        self.sent = text
        return new

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _tokens_until_stop(self, before: int) -> int:
        # The stop was not in the text before this step (else the completion had ended), so it
        # was completed by one of this step's tokens.
        for n in range(before + 1, len(self.tokens)):
            text = self._decode(self.tokens[:n])
            if any(s in text for s in self.stops):
                return n
        return len(self.tokens)
