"""Which sequences have finished, in bounded memory (``Stage.finished``).

Work of a finished sequence may still arrive (the data plane is not ordered with
the control plane), and must be dropped however late it comes, so a stage must
remember every finished id; but a server runs sequences without end. Ids are
never reused, and the Engine hands them out in increasing order without gaps,
so the finished ids collapse into a watermark plus the few that finished out of
order.
"""

from __future__ import annotations


class FinishedSeqs:
    """The ids of finished sequences: every id below ``floor``, plus the ids above it in a set.

    Exact for any ids (``floor`` only passes ids that were added). When ids are handed out
    in increasing order without gaps, as the Engine does, ``floor`` follows the oldest
    sequence still running and the set holds only those that finished out of order.
    """

    def __init__(self) -> None:
        self.floor = 0
        self._above: set[int] = set()

    def add(self, seq: int) -> None:
        if seq >= self.floor:
            self._above.add(seq)
            while self.floor in self._above:
                self._above.remove(self.floor)
                self.floor += 1

    def __contains__(self, seq: int) -> bool:
        return 0 <= seq < self.floor or seq in self._above

    def __len__(self) -> int:
        """Ids held one by one (those below ``floor`` cost nothing)."""
        return len(self._above)
