"""What a Stage counts (``Stage.stats``): counters only, summed over its life.

Counters are values that add up: ``after - before`` is what a stage counted between two
snapshots (``copy()``), and ``a + b`` adds two counts, ``early_exits`` by head layer.
runtime/run_stats.py derives the rates from them; a rank other than 0 sends its own to rank 0
with every ``released`` answer (``as_dict``/``from_dict``, runtime/runners/distributed.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass
class StageStats:
    items: int = 0
    positions: int = 0
    computed: int = 0  # layer-positions run: positions x layers, summed over compute calls
    discarded: int = 0  # of those, cache entries a rollback truncated (work thrown away)
    merged: int = 0  # deferred backfills run together with a later token
    idle_backfills: int = 0  # deferred backfills run because the stage had nothing else
    batched: int = 0  # calls that ran items of several sequences at once
    head_evals: int = 0
    dropped_stale: int = 0
    early_exits: dict[int, int] = field(default_factory=dict)  # head layer -> exits

    def __add__(self, other: StageStats) -> StageStats:
        return self._combine(other, 1)

    def __sub__(self, other: StageStats) -> StageStats:
        """What was counted since ``other``, an earlier snapshot of the same stage."""
        return self._combine(other, -1)

    def _combine(self, other: StageStats, sign: int) -> StageStats:
        counts = {f.name: getattr(self, f.name) + sign * getattr(other, f.name)
                  for f in fields(self) if f.name != "early_exits"}
        return replace(self, **counts, early_exits=add_by_layer(self.early_exits, other.early_exits, sign))

    def copy(self) -> StageStats:
        """A snapshot: later counting on this stage leaves it as it is."""
        return replace(self, early_exits=dict(self.early_exits))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``early_exits`` keyed by head layer)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> StageStats:
        """Read back ``as_dict()``, also after JSON (whose object keys are strings)."""
        return cls(**{**body, "early_exits": {int(l): n for l, n in body.get("early_exits", {}).items()}})


def add_by_layer(a: dict[int, int], b: dict[int, int], sign: int = 1) -> dict[int, int]:
    """Counts by head layer, ``a + sign * b``: in layer order, zeros left out."""
    return {l: n for l in sorted(a.keys() | b.keys()) if (n := a.get(l, 0) + sign * b.get(l, 0))}
