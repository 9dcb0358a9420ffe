"""Run statistics: the counters of one generation, totals over many, and what they mean.

One implementation of every derived number (exit rate and precision per head,
acceptance, the fraction of compute discarded, busy fractions), used per
generation by ``Engine.generate`` and over a whole run by the CLI's summary
and ``adadecode bench``, so the three always agree. Only counters are added
up; rates are computed from the totals, never averaged.

- exit rate of a head: early tokens it started per generated token;
- precision of a head: of its early tokens that were verified either way, the
  share that the final layer confirmed (an early token dropped unverified, at
  the end of a sequence or behind an earlier rejection, counts neither way);
- acceptance: accepted early tokens over early tokens started;
- discarded fraction: cache entries (layer x position) that rollbacks threw
  away over those computed, all stages together (``StageStats.computed`` /
  ``discarded``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .stage_stats import StageStats

STAGE_COUNTERS = (
    "items", "positions", "computed", "discarded", "merged", "idle_backfills", "batched", "head_evals", "dropped_stale",
)


def stage_counters(stats: StageStats) -> dict:
    """A stage's counters as a plain dict (JSON-ready; ``early_exits`` by head layer)."""
    return {**{k: getattr(stats, k) for k in STAGE_COUNTERS}, "early_exits": dict(stats.early_exits)}


def counters_since(after: dict, before: dict) -> dict:
    """What a stage counted between two ``stage_counters`` snapshots."""
    out = {k: after[k] - before[k] for k in STAGE_COUNTERS}
    exits = {l: n - before["early_exits"].get(l, 0) for l, n in after["early_exits"].items()}
    out["early_exits"] = {l: n for l, n in sorted(exits.items()) if n}
    return out


def _add(into: dict, counts: dict) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n


@dataclass
class RunTotals:
    """Counters of generations added up (``add`` each generation's ``GenerationResult.stats``)."""

    generations: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    early_emitted: int = 0
    accepted: int = 0
    rollbacks: int = 0
    early_by_layer: dict[int, int] = field(default_factory=dict)
    accepted_by_layer: dict[int, int] = field(default_factory=dict)
    rejected_by_layer: dict[int, int] = field(default_factory=dict)
    stage_busy_s: list[float] = field(default_factory=list)
    stage_stats: list[dict] = field(default_factory=list)

    def add(self, tokens: int, stats: dict) -> RunTotals:
        self.generations += 1
        self.tokens += tokens
        self.elapsed_s += stats["elapsed_s"]
        for k in ("early_emitted", "accepted", "rollbacks"):
            setattr(self, k, getattr(self, k) + stats[k])
        for k in ("early_by_layer", "accepted_by_layer", "rejected_by_layer"):
            _add(getattr(self, k), {int(l): n for l, n in stats[k].items()})
        busy = stats["stage_busy_s"]
        self.stage_busy_s = [a + b for a, b in zip(self.stage_busy_s, busy)] if self.stage_busy_s else list(busy)
        if not self.stage_stats:
            self.stage_stats = [{k: 0 for k in STAGE_COUNTERS} | {"early_exits": {}} for _ in stats["stage_stats"]]
        for total, counts in zip(self.stage_stats, stats["stage_stats"]):
            _add(total, {k: counts[k] for k in STAGE_COUNTERS})
            _add(total["early_exits"], {int(l): n for l, n in counts["early_exits"].items()})
        return self

    def summary(self) -> dict:
        """The derived numbers (JSON-ready)."""
        layers = sorted(self.early_by_layer.keys() | self.accepted_by_layer.keys() | self.rejected_by_layer.keys())
        precision = {}
        for l in layers:
            decided = self.accepted_by_layer.get(l, 0) + self.rejected_by_layer.get(l, 0)
            precision[l] = round(self.accepted_by_layer.get(l, 0) / decided, 4) if decided else None
        computed = sum(s["computed"] for s in self.stage_stats)
        discarded = sum(s["discarded"] for s in self.stage_stats)
        t = self.elapsed_s
        return {
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / t, 3) if t > 0 else 0.0,
            "exit_rate_per_head": {l: round(self.early_by_layer.get(l, 0) / self.tokens, 4) if self.tokens else 0.0
                                   for l in layers},
            "precision_per_head": precision,
            "acceptance_rate": round(self.accepted / self.early_emitted, 4) if self.early_emitted else None,
            "rollbacks": self.rollbacks,
            "discarded_fraction": round(discarded / computed, 4) if computed else 0.0,
            "stage_busy_fraction": [round(b / t, 4) if t > 0 else 0.0 for b in self.stage_busy_s],
            "stage_merged": [s["merged"] for s in self.stage_stats],
            "stage_idle_backfills": [s["idle_backfills"] for s in self.stage_stats],
        }


def summary_lines(summary: dict, stages: list[tuple[int, int]]) -> list[str]:
    """The end-of-run summary as a few lines of text (the CLI's stderr)."""
    s = summary
    lines = [f"{s['tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s"]
    if s["exit_rate_per_head"]:
        acc = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.3f}"
        lines.append(f"early exit: acceptance {acc}, {s['rollbacks']} rollbacks, "
                     f"{100 * s['discarded_fraction']:.1f}% of compute discarded")
        for l, rate in s["exit_rate_per_head"].items():
            p = s["precision_per_head"][l]
            lines.append(f"  head at layer {l}: exit rate {rate:.3f}, precision {'-' if p is None else f'{p:.3f}'}")
    for i, (a, b) in enumerate(stages):
        lines.append(f"stage {i} (layers {a}-{b - 1}): busy {s['stage_busy_fraction'][i]:.2f}, "
                     f"merged {s['stage_merged'][i]}, idle backfills {s['stage_idle_backfills'][i]}")
    return lines
