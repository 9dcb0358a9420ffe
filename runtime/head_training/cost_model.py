"""What an early exit is worth, and the default heads and thresholds that maximise it.

Everything here runs on the host, on the outcomes ``calibrate.head_outcomes`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .calibrate import THRESHOLD_SWEEP


@dataclass(frozen=True)
class CostModel:
    """What an early exit is worth, in decode steps (one token through every layer), on one device
    with deferred backfill: an early token at layer ``l`` leaves its layers ``l..L-1`` to run merged
    with the next token's pass through them, as one 2-row chunk costing ``merge_cost`` rows.

    - accepted: the two tokens cost ``2 l/L + merge_cost (L-l)/L`` instead of 2, a saving of
      ``(2 - merge_cost)(L-l)/L`` (``(L-l)/L`` when a 2-row chunk costs one row);
    - rejected: ``rollback_cost`` (default: a whole token). None is the structural cost, the next
      token's pass thrown away, ``l/L + (merge_cost - 1)(L-l)/L``; it ignores tokens emitted early
      behind the rejected one and the rollback's own overhead. On the bundled model's validation
      prompts the defaults chosen with a whole token lose 0.01 step/token if the true cost is the
      structural one, while those chosen with the structural cost lose 0.04 if it is a whole token;
      hence the default.
    - every head evaluation costs ``eval_cost``.
    """

    num_layers: int
    eval_cost: float
    merge_cost: float = 1.1
    rollback_cost: float | None = 1.0

    def accept_saving(self, layer: int) -> float:
        return (2 - self.merge_cost) * (self.num_layers - layer) / self.num_layers

    def reject_cost(self, layer: int) -> float:
        if self.rollback_cost is not None:
            return self.rollback_cost
        rest = (self.num_layers - layer) / self.num_layers
        return layer / self.num_layers + (self.merge_cost - 1) * rest


def eval_cost(k: int, hidden_size: int, weights_per_step: int) -> float:
    """A head evaluation's cost in decode steps: the weights it reads (T and K LM-head rows) over the
    weights a decode step reads, plus 0.2% for the call. On the bundled model and one CPU thread this
    is within 0.1% of the in-situ timings for K = 1024, 2048, 4096 (0.9%, 1.3%, 2.0% of a 51 ms
    step) and overestimates larger heads (K=8192: 4.0% against 3.4%; full: 21% against 17%)."""
    return 0.002 + (hidden_size * hidden_size + k * hidden_size) / weights_per_step


def expected_saving(outcomes, selection: dict[int, float], cost: CostModel) -> dict:
    """Simulate the heads of ``selection`` ({layer: threshold}) in layer order on every token of
    ``outcomes``: a token exits at the first head whose confidence exceeds its threshold and is not
    evaluated further. Returns the mean saving per token under ``cost`` and the rates behind it."""
    n = len(next(iter(outcomes.values()))[0])
    remaining = torch.ones(n, dtype=torch.bool)
    saved = evals = accepted = rejected = 0.0
    for l in sorted(selection):
        conf, agree = outcomes[l]
        evals += float(remaining.sum())
        exits = remaining & (conf > selection[l])
        good, bad = float((exits & agree).sum()), float((exits & ~agree).sum())
        saved += good * cost.accept_saving(l) - bad * cost.reject_cost(l)
        accepted, rejected = accepted + good, rejected + bad
        remaining &= ~exits
    saving = (saved - cost.eval_cost * evals) / n
    return {
        "saving_per_token": round(saving, 4),
        "speedup_estimate": round(1 / (1 - saving), 3),
        "exit_rate": round((accepted + rejected) / n, 4),
        "acceptance": round(accepted / (accepted + rejected), 4) if accepted + rejected else None,
        "head_evals_per_token": round(evals / n, 3),
    }


def choose_defaults(outcomes, cost: CostModel, sweep: Sequence[float] = THRESHOLD_SWEEP
                    ) -> tuple[dict[int, float], dict[int, float]]:
    """Default heads by coordinate ascent on ``expected_saving``: each head in turn gets the best of
    off or a sweep threshold, until nothing improves. Also a threshold for every head: the default's,
    or the best for that head alone. Returns (default {layer: threshold}, all {layer: threshold})."""

    def score(sel):
        return expected_saving(outcomes, sel, cost)["saving_per_token"]

    chosen: dict[int, float] = {}
    best = score(chosen)
    for _ in range(10):
        improved = False
        for l in sorted(outcomes):
            for option in (None, *sweep):
                trial = {k: v for k, v in chosen.items() if k != l}
                if option is not None:
                    trial[l] = option
                s = score(trial)
                if s > best + 1e-9:
                    best, chosen, improved = s, trial, True
        if not improved:
            break
    alone = {l: chosen.get(l) or max(sweep, key=lambda t: (score({l: t}), t)) for l in outcomes}
    return dict(sorted(chosen.items())), dict(sorted(alone.items()))
