"""Simulator scenarios and the CPU profile's provenance (the costs themselves: runtime/sim/costs.py).

Exit statistics, two scenarios: ``measured`` — the bundled heads' exit rate and
precision per head, measured on held-out prompts here, at the same relative
depths; ``paper`` — AdaDecode's reported operating point on Llama-3.1-8B: heads
at layers 8/16/24 of 32, about 5.5% of early tokens rejected (docs/design.md, Prior
art). The paper's per-head exit rate is not in our summary of it; 0.35 per head
is assumed, which makes one simulated H100 with deferred backfill 1.30x faster
than plain decoding, inside the paper's reported 1.14-1.73x.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adadecode.runtime.sim.costs import RUNNER_FIELDS
from adadecode.runtime.sim.fit import exit_stats, fit_costs
from adadecode.runtime.sim.simulator import ExitReplay, ExitStats


def build_cpu_profile(one_rank: str | Path, ranks: str | Path) -> dict:
    """The CPU profile from two ``bench --trace`` traces: a stage's costs and the exit statistics
    from the one-rank trace (in-process), the runner's per-hop costs from the multi-rank one."""
    from .trace_export import read_trace

    events, _, other = read_trace(one_rank)
    costs = fit_costs(events, other)
    exits = exit_stats(events, {g["seq"] for g in other["generations"] if g["mode"] != "off"})
    r_events, _, r_other = read_trace(ranks)
    pipeline = fit_costs(r_events, r_other)
    return {
        "note": "fitted by launcher/sim_profiles.build_cpu_profile on data/traces (docs/simulator.md)",
        "traces": [Path(one_rank).name, Path(ranks).name],
        "num_layers": other["num_layers"],
        "threads": other.get("threads"),
        "costs": {k: _round(v) for k, v in costs.to_dict().items()},
        "pipeline": {k: _round(getattr(pipeline, k)) for k in RUNNER_FIELDS},
        "exits": {"rate": {str(l): round(v, 4) for l, v in exits.rate.items()},
                  "precision": {str(l): round(v, 4) for l, v in exits.precision.items()}},
    }


def _round(v):
    if isinstance(v, list):
        return [_round(x) for x in v]
    return float(f"{v:.4g}") if isinstance(v, float) else v


def scaled_layer(layer: int, from_depth: int, to_depth: int) -> int:
    """The layer at the same relative depth in a model of ``to_depth`` layers."""
    return max(1, min(to_depth - 1, round(layer * to_depth / from_depth)))


def exit_scenario(name: str, depth: int, measured: ExitStats | ExitReplay,
                  measured_depth: int) -> ExitStats | ExitReplay:
    """``measured`` (the bundled heads, at the same relative depths) or ``paper`` (see the docstring)."""
    if name == "measured":
        return measured.moved({scaled_layer(l, measured_depth, depth): l for l in measured.layers})
    if name == "paper":
        heads = {scaled_layer(l, 32, depth) for l in (8, 16, 24)}
        return ExitStats({l: 0.35 for l in heads}, {l: 0.945 for l in heads})
    raise ValueError(f"exit scenario `{name}` is unknown; use measured or paper")


def main(argv: list[str]) -> int:
    """``python -m adadecode.launcher.sim_profiles ONE_RANK RANKS OUT``: write the profile fitted on
    two ``bench --trace`` traces (runtime/assets/sim/*.json are written so; a test refits them)."""
    if len(argv) != 3:
        print(main.__doc__, file=sys.stderr)
        return 2
    one, ranks, out = argv
    Path(out).write_text(json.dumps(build_cpu_profile(one, ranks), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
