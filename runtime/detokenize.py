"""Incremental detokenisation: the text of a growing list of token ids, a few ids per step.

Decoding the whole output at every verified token costs O(n) per token, O(n^2) in all.
``IncrementalDetokenizer`` decodes only a short window instead, as text-generation-inference
and vLLM do: the ids since the last emitted text (``read``) plus the group before them
(``prefix``) as context, so that tokenizers which drop a word's leading space at the start
of a decode (SentencePiece) or spell a character over several byte-level tokens still give
the text a whole decode would. Text is held back while it ends in an incomplete UTF-8
character (U+FFFD); ``pending`` shows it anyway, for stop strings.

``TextStream`` turns verified token ids into text chunks for the user, holding back what
may still be the start of a stop string and cutting at the first one (with ``min_tokens``:
the first that ends past the text of the first ``min_tokens - 1`` tokens, the one
runtime/stopping.py stops at).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    def __init__(self, decode: Decode):
        """``decode``: the tokenizer's decode of a list of ids (special tokens skipped or not)."""
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to the context of the next window
        self.read = 0  # ids before this are in the text handed out
        self.pending = ""  # text of ids[read:] that is not final yet (ends in U+FFFD)

    def push(self, ids: Sequence[int]) -> str:
        """Append ``ids``; return the text they complete (maybe "", when it is not final yet)."""
        self.ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest of the text, incomplete characters included (the end of the output)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        context = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        new = text[len(context) :]
        if not final and (not new or new.endswith("\ufffd")):
            self.pending = new
            return ""
        self.prefix, self.read, self.pending = self.read, len(self.ids), ""
        return new


class TextStream:
    """Verified token ids in, text chunks out (``on_text``), never showing a stop string."""

    def __init__(self, decode: Decode, stop: Sequence[str], on_text: Callable[[str], None] | None,
                 min_tokens: int = 0):
        """``min_tokens``: stop strings in the text of the first ``min_tokens - 1`` tokens are
        output (``StopCriteria.min_new_tokens``)."""
        self.on_text = on_text
        self.stop = tuple(stop)
        self.detok = IncrementalDetokenizer(decode)
        # A stop string may begin in text already decoded: hold back all but its last character.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.held = ""
        self.stopped = False
        self.min_tokens = min_tokens
        self.count = 0  # tokens pushed
        self.emitted = 0  # characters handed to on_text
        self.boundary = 0  # characters of text before min_tokens: no stop string ends in them

    def push(self, ids: Sequence[int]) -> None:
        if self.on_text is None or self.stopped:
            return
        # Before min_tokens, one token at a time as the stop checker sees them, so that the
        # boundary falls where its boundary falls.
        while ids and self.count + 1 < self.min_tokens:
            self.count += 1
            self._emit(self.detok.push(ids[:1]), final=False, may_stop=False)
            ids = ids[1:]
        if ids:
            self.count += len(ids)
            self._emit(self.detok.push(ids), final=False)

    def flush(self) -> None:
        if self.on_text is not None and not self.stopped:
            self._emit(self.detok.flush(), final=True)

    def _emit(self, new: str, final: bool, may_stop: bool = True) -> None:
        text = self.held + new
        cut = -1
        if may_stop:
            cut = first_stop_string(text, self.stop, self.boundary - self.emitted)
        else:
            self.boundary = self.emitted + len(text)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        upto = len(text) if final else max(0, len(text) - self.hold)
        if upto:
            self.on_text(text[:upto])
        self.emitted += upto
        self.held = text[upto:]


def first_stop_string(text: str, stop_strings: Sequence[str], after: int = 0) -> int:
    """Where the first stop string in ``text`` that ends past ``text[:after]`` starts, or -1."""
    found = (text.find(s, max(0, after - len(s) + 1)) for s in stop_strings)
    return min((i for i in found if i >= 0), default=-1)
