"""When a sequence stops: EOS, a stop string, or ``max_new_tokens``.

Checked by the Coordinator on verified tokens only, so an early (unverified)
token can never end a generation (DESIGN.md invariant 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCriteria:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[Sequence[int]], str] | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (the tokenizer's)")

    def check(self, generated: Sequence[int]) -> str | None:
        """The reason to stop after the last of ``generated``, or ``None`` to go on."""
        if generated and generated[-1] in self.eos_token_ids:
            return "eos"
        if self.stop_strings and self._hits_stop_string(generated):
            return "stop"
        if len(generated) >= self.max_new_tokens:
            return "length"
        return None

    def _hits_stop_string(self, generated: Sequence[int]) -> bool:
        # Only a stop string that ends inside the newest token can be new. A token may decode to
        # nothing (a skipped special token) or to part of a character (byte-level BPE), so no
        # fixed token tail is safe: compare the whole text with the text before the newest token.
        text = self.decode(generated)
        before = len(self.decode(generated[:-1]))
        longest = max(len(s) for s in self.stop_strings)
        window = text[max(0, min(before, len(text)) - longest) :]
        return any(s in window for s in self.stop_strings)

def trim_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """Cut ``text`` before the first stop string it contains (stop strings are not output)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]
