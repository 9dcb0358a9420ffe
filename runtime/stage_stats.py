"""What a Stage counts (``Stage.stats``): counters only, summed over its life.

runtime/run_stats.py derives the rates from them (its ``STAGE_COUNTERS`` names each one); a rank
other than 0 sends its own to rank 0 with every ``released`` answer (runtime/runners/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageStats:
    items: int = 0
    positions: int = 0
    dropped_stale: int = 0
    head_evals: int = 0
    early_exits: dict[int, int] = field(default_factory=dict)  # head layer -> exits
    merged: int = 0  # deferred backfills run together with a later token
    batched: int = 0  # calls that ran items of several sequences at once
    idle_backfills: int = 0  # deferred backfills run because the stage had nothing else
    computed: int = 0  # layer-positions run: positions x layers, summed over compute calls
    discarded: int = 0  # of those, cache entries a rollback truncated (work thrown away)
