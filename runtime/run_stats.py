"""Run statistics: the counters of one generation, totals over many, and what they mean.

One implementation of every derived number (tokens/s, exit rate and precision
per head, acceptance, the fraction of compute discarded, busy fractions), used
per generation by ``Engine.generate``, over a whole run by the CLI's summary
and ``adadecode bench``, and by the simulator, so they always agree. Counters
are typed and add up (``StageStats``, ``GenerationStats``, ``RunTotals``);
rates are computed from the totals, never averaged. Dicts are for the edges:
``GenerationStats.as_dict`` (``GenerationResult.stats``) and ``summary()``.

- exit rate of a head: early tokens it started per generated token;
- precision of a head: of its early tokens that were verified either way, the
  share that the final layer confirmed (an early token dropped unverified, at
  the end of a sequence or behind an earlier rejection, counts neither way);
- acceptance: accepted early tokens over early tokens started;
- lookup rate and acceptance: the same two for the context lookup's tokens
  (runtime/context_lookup.py): its guesses, which exit at a head but are no head's,
  and its drafts, sent with their request (the rate, per output token, can pass 1);
  the draft rate: the drafts alone;
- discarded fraction: cache entries (layer x position) that rollbacks threw
  away over those computed, all stages together (``StageStats.computed`` /
  ``discarded``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from .coordinator import SeqStats
from .stage_stats import StageStats, add_by_layer

_PerStage = TypeVar("_PerStage", float, StageStats)


@dataclass
class GenerationStats:
    """The counters of one generation (or of several added up): its time and its sequences'
    early-exit counts (the Coordinator's ``SeqStats``), and per stage its busy seconds and
    what it counted (``StageStats``, this generation's share)."""

    elapsed_s: float = 0.0
    stage_busy_s: list[float] = field(default_factory=list)
    early_emitted: int = 0
    accepted: int = 0
    rollbacks: int = 0
    early_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens started
    accepted_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens verified
    rejected_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens rolled back
    lookup_emitted: int = 0  # of early_emitted: the context lookup's guesses
    lookup_accepted: int = 0  # of accepted: the context lookup's guesses
    drafted: int = 0  # of lookup_emitted: drafts, sent with their request (coordinator.py)
    table_drafted: int = 0  # of drafted: the draft table's (runtime/draft_table.py)
    table_accepted: int = 0  # of lookup_accepted: the draft table's
    stage_stats: list[StageStats] = field(default_factory=list)

    @classmethod
    def of(cls, sequences: Iterable[SeqStats], *, elapsed_s: float, stage_busy_s: Sequence[float],
           stage_stats: Sequence[StageStats]) -> GenerationStats:
        """One generation's counters: its sequences' counts summed, with its time and its stages'."""
        out = cls(elapsed_s=elapsed_s, stage_busy_s=list(stage_busy_s), stage_stats=list(stage_stats))
        for s in sequences:
            out.early_emitted += s.early_emitted
            out.accepted += s.accepted
            out.rollbacks += s.rollbacks
            out.lookup_emitted += s.lookup_emitted
            out.lookup_accepted += s.lookup_accepted
            out.drafted += s.drafted
            out.table_drafted += s.table_drafted
            out.table_accepted += s.table_accepted
            out.early_by_layer = add_by_layer(out.early_by_layer, s.early_by_layer)
            out.accepted_by_layer = add_by_layer(out.accepted_by_layer, s.accepted_by_layer)
            out.rejected_by_layer = add_by_layer(out.rejected_by_layer, s.rejected_by_layer)
        return out

    def __add__(self, other: GenerationStats) -> GenerationStats:
        return GenerationStats(
            elapsed_s=self.elapsed_s + other.elapsed_s,
            stage_busy_s=_per_stage(self.stage_busy_s, other.stage_busy_s, 0.0),
            early_emitted=self.early_emitted + other.early_emitted,
            accepted=self.accepted + other.accepted,
            rollbacks=self.rollbacks + other.rollbacks,
            early_by_layer=add_by_layer(self.early_by_layer, other.early_by_layer),
            accepted_by_layer=add_by_layer(self.accepted_by_layer, other.accepted_by_layer),
            rejected_by_layer=add_by_layer(self.rejected_by_layer, other.rejected_by_layer),
            lookup_emitted=self.lookup_emitted + other.lookup_emitted,
            lookup_accepted=self.lookup_accepted + other.lookup_accepted,
            drafted=self.drafted + other.drafted,
            table_drafted=self.table_drafted + other.table_drafted,
            table_accepted=self.table_accepted + other.table_accepted,
            stage_stats=_per_stage(self.stage_stats, other.stage_stats, StageStats()),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the keys ``GenerationResult.stats`` has for these counters."""
        return asdict(self)


def _per_stage(a: list[_PerStage], b: list[_PerStage], zero: _PerStage) -> list[_PerStage]:
    """``a + b`` stage by stage; an empty list (no generation yet) counts as zeros."""
    a, b = a or [zero] * len(b), b or [zero] * len(a)
    if len(a) != len(b):
        raise ValueError(f"cannot add the counters of {len(a)} stages to those of {len(b)}")
    return [x + y for x, y in zip(a, b)]


@dataclass
class RunTotals:
    """Generations added up (``add`` each one's ``GenerationResult.counters``), and the numbers derived."""

    generations: int = 0
    tokens: int = 0
    counters: GenerationStats = field(default_factory=GenerationStats)

    def add(self, tokens: int, counters: GenerationStats) -> RunTotals:
        self.generations += 1
        self.tokens += tokens
        self.counters += counters
        return self

    @property
    def tokens_per_s(self) -> float:
        t = self.counters.elapsed_s
        return self.tokens / t if t > 0 else 0.0

    @property
    def stage_busy_fraction(self) -> list[float]:
        t = self.counters.elapsed_s
        return [b / t if t > 0 else 0.0 for b in self.counters.stage_busy_s]

    def summary(self) -> dict[str, Any]:
        """The derived numbers (JSON-ready)."""
        c = self.counters
        layers = sorted(c.early_by_layer.keys() | c.accepted_by_layer.keys() | c.rejected_by_layer.keys())
        precision: dict[int, float | None] = {}
        for l in layers:
            decided = c.accepted_by_layer.get(l, 0) + c.rejected_by_layer.get(l, 0)
            precision[l] = round(c.accepted_by_layer.get(l, 0) / decided, 4) if decided else None
        computed = sum(s.computed for s in c.stage_stats)
        discarded = sum(s.discarded for s in c.stage_stats)
        return {
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "exit_rate_per_head": {l: round(c.early_by_layer.get(l, 0) / self.tokens, 4) if self.tokens else 0.0
                                   for l in layers},
            "precision_per_head": precision,
            "acceptance_rate": round(c.accepted / c.early_emitted, 4) if c.early_emitted else None,
            "lookup_rate": round(c.lookup_emitted / self.tokens, 4) if self.tokens else 0.0,
            "lookup_acceptance": round(c.lookup_accepted / c.lookup_emitted, 4) if c.lookup_emitted else None,
            "draft_rate": round(c.drafted / self.tokens, 4) if self.tokens else 0.0,
            "table_rate": round(c.table_drafted / self.tokens, 4) if self.tokens else 0.0,
            "table_acceptance": round(c.table_accepted / c.table_drafted, 4) if c.table_drafted else None,
            "rollbacks": c.rollbacks,
            "discarded_fraction": round(discarded / computed, 4) if computed else 0.0,
            "stage_busy_fraction": [round(f, 4) for f in self.stage_busy_fraction],
            "stage_merged": [s.merged for s in c.stage_stats],
            "stage_idle_backfills": [s.idle_backfills for s in c.stage_stats],
        }


def summary_lines(summary: dict, stages: list[tuple[int, int]]) -> list[str]:
    """The end-of-run summary as a few lines of text (the CLI's stderr)."""
    s = summary
    lines = [f"{s['tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s"]
    if s["exit_rate_per_head"] or s["lookup_acceptance"] is not None:  # heads, or the lookup's drafts alone
        acc = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.3f}"
        lines.append(f"early exit: acceptance {acc}, {s['rollbacks']} rollbacks, "
                     f"{100 * s['discarded_fraction']:.1f}% of compute discarded")
        if s["lookup_acceptance"] is not None:
            lines.append(f"  context lookup: {s['lookup_rate']:.3f} guesses and drafts a token "
                         f"({s['draft_rate']:.3f} drafts), acceptance {s['lookup_acceptance']:.3f}")
        if s["table_acceptance"] is not None:
            lines.append(f"  draft table: {s['table_rate']:.3f} drafts a token, acceptance {s['table_acceptance']:.3f}")
        for l, rate in s["exit_rate_per_head"].items():
            p = s["precision_per_head"][l]
            lines.append(f"  head at layer {l}: exit rate {rate:.3f}, precision {'-' if p is None else f'{p:.3f}'}")
    for i, (a, b) in enumerate(stages):
        lines.append(f"stage {i} (layers {a}-{b - 1}): busy {s['stage_busy_fraction'][i]:.2f}, "
                     f"merged {s['stage_merged'][i]}, idle backfills {s['stage_idle_backfills'][i]}")
    return lines
