"""When a sequence stops: EOS, a stop string, or ``max_new_tokens``.

Checked by the Coordinator on verified tokens only, so an early (unverified)
token can never end a generation (docs/design.md, invariant 3). ``StopCriteria`` is
what the caller asks for; ``StopChecker`` follows one sequence as its verified
tokens come in, decoding each token once (runtime/detokenize.py), not the
whole output each time.

Two of vLLM's request options act here, so they too see verified tokens only:
``ignore_eos`` makes EOS an ordinary token, and ``min_new_tokens`` keeps EOS and stop
strings from ending the sequence before that many tokens. A stop string counts only
if it ends in text past the first ``min_new_tokens - 1`` tokens' text
(``boundary``); one that ends before is ordinary text, and ``TextStream`` keeps it in
the output by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .detokenize import IncrementalDetokenizer, first_stop_string


@dataclass(frozen=True)
class StopCriteria:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[Sequence[int]], str] | None = None
    min_new_tokens: int = 0
    """EOS and stop strings do not end the sequence before this many tokens (vLLM's ``min_tokens``)."""
    ignore_eos: bool = False
    """EOS tokens are ordinary tokens: the sequence runs to a stop string or ``max_new_tokens``."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (the tokenizer's)")

    def checker(self) -> StopChecker:
        """A checker for one sequence, fed its verified tokens as they come."""
        return StopChecker(self)

    def check(self, generated: Sequence[int]) -> str | None:
        """The reason to stop after all of ``generated``, or ``None`` to go on (one decode of it,
        two with ``min_new_tokens``: the tokens before it, whose text no stop string ends in, then the rest)."""
        checker, head = self.checker(), max(0, min(self.min_new_tokens - 1, len(generated)))
        if head:
            checker.push(generated[:head])
        return checker.push(generated[head:])


class StopChecker:
    """The stop conditions of one sequence, fed its verified tokens in order."""

    def __init__(self, criteria: StopCriteria):
        self.criteria = criteria
        self.count = 0
        self.detok = IncrementalDetokenizer(criteria.decode) if criteria.stop_strings and criteria.decode else None
        # Text already checked that a stop string completed by new text may still begin in.
        self.keep = max((len(s) for s in criteria.stop_strings), default=1) - 1
        self.tail = ""
        self.final_len = 0  # characters of final text so far; the tail is the last of them
        self.boundary = 0  # final text of the tokens before min_new_tokens: no stop string ends in it

    def push(self, tokens: Sequence[int]) -> str | None:
        """The reason to stop after these newly verified ``tokens``, or ``None`` to go on."""
        c = self.criteria
        self.count += len(tokens)
        may_stop = self.count >= c.min_new_tokens
        if may_stop and not c.ignore_eos and tokens and tokens[-1] in c.eos_token_ids:
            return "eos"
        if self.detok is not None and tokens:
            # A token may decode to nothing (a skipped special token) or to part of a character
            # (byte-level BPE): check the final text so far plus what is not final yet.
            new = self.detok.push(tokens)
            text, start = self.tail + new, self.final_len - len(self.tail)
            self.final_len += len(new)
            if not may_stop:
                self.boundary = self.final_len
            after = self.boundary - start
            hit = may_stop and first_stop_string(text + self.detok.pending, c.stop_strings, after) >= 0
            self.tail = text[max(0, len(text) - self.keep) :]
            if hit:
                return "stop"
        if self.count >= c.max_new_tokens:
            return "length"
        return None


def trim_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """Cut ``text`` before the first stop string it contains (stop strings are not output)."""
    cut = first_stop_string(text, stop_strings)
    return text if cut < 0 else text[:cut]
