"""Context lookup: a guess of the next token read from the sequence itself.

When the last few tokens of a sequence occurred earlier in it (the prompt or the output so
far), the token that followed them then is a strong guess for the next one: code repeats
identifiers, chat answers quote the question, and a small model repeats itself. This is
prompt-lookup decoding's draft, without a draft model. Here it only changes *which* early
token an exit head's item sends on: an item that carries a guess exits with it at the first
head it reaches, and the final layer verifies it like any early token (runtime/coordinator.py),
so the output is unchanged.

Measured on the bundled model's validation answers (docs/results.md, Context lookup): a match
of 3 tokens or more names the final token of about half the positions, right nine times in
ten, where the heads up to layer 16 are right a third of the time.

``ContextLookup`` keeps one sequence's index: every n-gram of ``min_len .. max_len`` tokens of
its committed tokens, mapped to where it last ended with a committed token after it. Committed
tokens never change, so the index only grows; the few unverified tokens after them (in flight,
and rolled back at will) are searched directly on each guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .draft_table import DraftTable

MAX_MATCH = 4  # the longest suffix looked up; longer matches change the guess rarely (docs/results.md)
MAX_DRAFT = 8  # drafts per request (coordinator.py): past 3 a chunk outgrows what one CPU call streams for free


class ContextLookup:
    def __init__(self, min_len: int, max_len: int = MAX_MATCH, table: DraftTable | None = None):
        """``table``: where the sequence has no match, the model's own answers to other prompts
        are looked up instead (runtime/draft_table.py)."""
        if not 1 <= min_len:
            raise ValueError(f"context lookup needs a match of at least 1 token, not {min_len}")
        self.min_len = min_len
        self.max_len = max(max_len, min_len)
        self.table = table
        self.from_table = False  # whether the latest ``match`` came from the table
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> the end of its latest occurrence
        self._indexed = 0  # n-grams ending before this index (with a committed token after them) are in

    def _extend(self, committed: Sequence[int]) -> None:
        end = len(committed) - 1  # an n-gram ending at j is a guess only once committed[j + 1] exists
        for j in range(self._indexed, end):
            for k in range(self.min_len, min(self.max_len, j + 1) + 1):
                self._last_end[tuple(committed[j - k + 1 : j + 1])] = j
        self._indexed = max(self._indexed, end)

    def guess(self, committed: Sequence[int], tail: Sequence[int] = ()) -> int | None:
        """The token after ``committed + tail`` that followed the latest earlier occurrence of its
        longest suffix of ``min_len .. max_len`` tokens, or None. ``committed`` must only ever grow
        between calls (verified tokens); ``tail`` (unverified ones) may change freely."""
        return self.match(committed, tail)[0]

    def match(self, committed: Sequence[int], tail: Sequence[int] = ()) -> tuple[int | None, int]:
        """``guess`` and the length of the match it continues (0: none); ``from_table`` says whether
        the table gave it."""
        self.from_table = False
        self._extend(committed)
        n = len(committed)
        history = list(committed[-(self.max_len + 1) :]) + list(tail)  # enough for the tail's own matches
        offset = n + len(tail) - len(history)  # index of history[0] in the whole sequence
        length = n + len(tail)
        for k in range(min(self.max_len, length - 1), self.min_len - 1, -1):
            key = tuple(history[-k:])
            # an occurrence ending in the unverified stretch (or the last committed token) is the latest
            for j in range(length - 2, max(n - 1, k - 1) - 1, -1):
                if j - k + 1 >= offset and tuple(history[j - k + 1 - offset : j + 1 - offset]) == key:
                    return history[j + 1 - offset], k
            j = self._last_end.get(key)
            if j is not None:
                return committed[j + 1], k
        if self.table is not None:
            guess, k = self.table.match(history)
            self.from_table = guess is not None
            return guess, k
        return None, 0


def lookup_outcomes(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    max_len: int = MAX_MATCH) -> tuple[list[int], list[bool]]:
    """For every answer token in order (the order of a heads' validation outcomes): the length of
    the longest match the lookup finds before it (0: none; a lookup of shortest match k guesses
    exactly where it is >= k, the same token) and whether the guess is that token."""
    lengths: list[int] = []
    agrees: list[bool] = []
    for prompt, answer in zip(prompts, answers):
        lookup, history = ContextLookup(1, max_len), list(prompt)
        for token in answer:
            guess, k = lookup.match(history)
            lengths.append(k)
            agrees.append(guess == token)
            history.append(token)
    return lengths, agrees
