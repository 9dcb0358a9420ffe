"""`adadecode simulate`: this runtime's scheduling on simulated time, to see past this machine.

    adadecode simulate --trace traces/bench/trace.json          # fit on a bench trace; measured vs predicted
    adadecode simulate --stages 2 --early-exit eager             # the bundled model on this CPU's fitted costs
    adadecode simulate --profile llama-3.1-70b --link ib --stages 8 --early-exit deferred --exits paper
    adadecode simulate --project --plot speedup.png              # speedup over plain pipeline, P = 1..16
    adadecode simulate --design                                  # heads, max_inflight, policies, sequences

The simulator (runtime/sim/simulator.py) runs the real Stage and Coordinator; the
costs come from a trace (runtime/sim/fit.py) or a profile (launcher/sim_profiles.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from adadecode.runtime.context_lookup import MAX_MATCH
from adadecode.runtime.partition import partition_layers
from adadecode.runtime.sim.costs import (
    CPU_PROFILE,
    GPU_MODELS,
    H100,
    LINKS,
    NVLINK,
    SMOLLM2_135M,
    load_cpu_profile,
    setting_costs,
)
from adadecode.runtime.sim.fit import calibrate, fit_costs
from adadecode.runtime.sim.heads import head_extra_weights
from adadecode.runtime.sim.simulator import Costs, ExitReplay, ExitStats, SimSpec, simulate

from .errors import report_error
from .sim_profiles import exit_scenario, scaled_layer

PROJECT_STAGES = (1, 2, 4, 8, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adadecode simulate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:8]))
    p.add_argument("--trace", metavar="FILE", help="a `bench --trace` trace.json (or .json.gz): fit the costs on it")
    p.add_argument("--profile", default=CPU_PROFILE, choices=[CPU_PROFILE, *GPU_MODELS],
                   help=f"costs to simulate with (default {CPU_PROFILE}: fitted on this project's CPU)")
    p.add_argument("--compiled", action="store_true",
                   help=f"{CPU_PROFILE}: the costs of the compiled layer loop (pipeline.compile=on)")
    p.add_argument("--link", choices=list(LINKS), help="GPU profiles: the link between stages (default nvlink)")
    p.add_argument("--exits", default="measured", metavar="measured|paper|DIR",
                   help="exit statistics: the bundled heads' (measured here), AdaDecode's reported ones, or a heads "
                        "directory's (`train-heads --out DIR`: its per-token outcomes where it has them, else its "
                        "calibration table), at --exit-layers and --thresholds (default: its defaults), mapped to "
                        "the same relative depths of the profile's model")
    p.add_argument("--thresholds", default="", metavar="T,T",
                   help="with --exits DIR: a threshold per exit layer, or one")
    p.add_argument("--lookup", type=int, default=0, metavar="K",
                   help="with --exits DIR: replay the context lookup's guesses of K or more matched tokens with "
                        "the heads (decoding.lookup; docs/heads.md), from its per-token outcomes; 0: off")
    p.add_argument("--stages", type=int, default=1, metavar="P")
    p.add_argument("--early-exit", default="off", choices=["off", "eager", "deferred", "wait"],
                   help="wait: deferred, but later stages hold a parked backfill for the next token (simulated only)")
    p.add_argument("--max-inflight", type=int, default=2, metavar="N")
    p.add_argument("--exit-layers", default="", metavar="L,L", help="head layers (default: the scenario's)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="sequences in flight at once")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="N")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--sequences", type=int, default=8, metavar="N", help="generations simulated")
    p.add_argument("--project", action="store_true", help="speedup over plain pipeline greedy at P = 1, 2, 4, 8, 16")
    p.add_argument("--plot", metavar="FILE", help="with --project: a PNG of the projection")
    p.add_argument("--design", action="store_true", help="the design comparisons (docs/results.md)")
    p.add_argument("--requirements", action="store_true",
                   help="how good heads must be: the exit rate per head that reaches 1.5x and 2x of plain pipeline "
                        "greedy, per model, stage count, precision and max_inflight (heads at 1/4, 1/2, 3/4 depth)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


# --- settings -------------------------------------------------------------------------


class Setting:
    """A model on hardware: costs, depth, the measured exit statistics and their depth."""

    def __init__(self, profile: str, link: str = "nvlink", compiled: bool = False):
        cpu = load_cpu_profile()
        self.compiled = compiled
        self.measured = ExitStats({int(l): r for l, r in cpu["exits"]["rate"].items()},
                                  {int(l): r for l, r in cpu["exits"]["precision"].items()})
        self.measured_depth = cpu["num_layers"]
        if profile == CPU_PROFILE:
            self.name = f"SmolLM2-135M, this CPU (fp32{', compiled' if compiled else ''})"
            self.model, self.device, self.link = SMOLLM2_135M, "cpu", NVLINK
            self.fits = lambda p: True
        else:
            model = GPU_MODELS[profile]
            self.name = f"{model.name}, {H100.name}, {LINKS[link].name}"
            self.model, self.device, self.link = model, "cuda", LINKS[link]
            # bf16 weights over P GPUs, with a fifth of each GPU left for the KV cache and activations
            self.fits = lambda p: 2 * model.layer_params * model.layers / p < 0.8 * H100.memory_bytes
        self.depth = self.model.layers

    def exits(self, scenario: str | HeadsScenario) -> ExitStats | ExitReplay:
        """A named scenario, or some heads' statistics: mapped to this model's depth."""
        if isinstance(scenario, HeadsScenario):
            return exit_scenario("measured", self.depth, scenario.exits, scenario.depth)
        return exit_scenario(scenario, self.depth, self.measured, self.measured_depth)

    def costs(self, stages: int, head_extra: int = 0) -> Costs:
        """``head_extra``: weights one head evaluation reads beyond a linear 1,024-token head's."""
        return setting_costs(self.model, self.device, stages, link=self.link, compiled=self.compiled,
                             head_extra=head_extra)

    def ranges(self, stages: int) -> list[tuple[int, int]]:
        c = self.costs(stages)
        return partition_layers(self.depth, stages, last_extra=c.lm_head_s / c.layer(1))


class HeadsScenario(NamedTuple):
    """Some heads' exit statistics, the depth of their model, and their manifest (which prices a
    head evaluation: its type and vocabulary, ``head_extra_weights``; ``{}``: linear, 1,024 tokens)."""

    exits: ExitStats | ExitReplay
    depth: int
    manifest: dict


def heads_exits(path: str, layers: Sequence[int] | None, thresholds: Sequence[float],
                lookup: int = 0) -> HeadsScenario:
    """A heads directory's exit statistics at ``layers`` (default: its defaults) and ``thresholds``
    (one per layer, or one for all; default: its defaults), the depth of its model and its manifest
    (which prices a head: ``run``): replayed token by token where train-heads recorded the outcomes,
    else from its calibration table; with ``lookup``, the context lookup's guesses replayed with them."""
    from adadecode.runtime.exit_heads import read_all_outcomes, read_manifest
    from adadecode.runtime.sim.heads import conditional_exits, exit_table, replay_exits, with_lookup

    where = Path(path).parent if Path(path).name == "manifest.json" else Path(path)
    manifest = read_manifest(where)
    layers = list(layers or manifest["default_layers"])
    missing = [l for l in layers if l not in manifest["layers"]]
    if missing:
        raise ValueError(f"--exit-layers: {where} has no heads at {missing}; it has {manifest['layers']}")
    if not thresholds:
        thresholds = [float(manifest["default_thresholds"][str(l)]) for l in layers]
    elif len(thresholds) == 1:
        thresholds = list(thresholds) * len(layers)
    if len(thresholds) != len(layers):
        raise ValueError(f"--thresholds: {len(thresholds)} values for {len(layers)} exit layers; give one per layer, "
                         "or one for all")
    selection = dict(zip(layers, thresholds))
    outcomes, guesses = read_all_outcomes(where, manifest)
    if outcomes is not None:
        if (lacking := sorted(set(layers) - set(outcomes))):
            raise ValueError(f"{where}: its per-token outcomes have no heads at {lacking}; rerun `adadecode "
                             "train-heads` into it")
        if lookup:
            if guesses is None:
                raise ValueError(f"--lookup: {where} records no context lookup outcomes; record them with "
                                 f"`adadecode train-heads --outcomes-only --out {where}`")
            outcomes = with_lookup(outcomes, lookup, *guesses)
        return HeadsScenario(replay_exits(selection, outcomes), manifest["base_model"]["num_layers"], manifest)
    if lookup:
        raise ValueError(f"--lookup: {where} has no per-token outcomes to replay the lookup with; record them with "
                         f"`adadecode train-heads --outcomes-only --out {where}`")
    table = exit_table(manifest)
    off_table = {l: t for l, t in selection.items() if all(r[0] != t for r in table[l])}
    if off_table:
        raise ValueError(f"--thresholds: {where} has no per-token outcomes and its calibration table has no row "
                         f"for {off_table}; use thresholds of its sweep {[r[0] for r in table[layers[0]]]}")
    return HeadsScenario(conditional_exits(selection, table), manifest["base_model"]["num_layers"], manifest)


def run(setting: Setting, stages: int, mode: str, scenario: str | HeadsScenario = "measured", max_inflight: int = 2,
        layers: Sequence[int] | None = None, concurrency: int = 1, prompt_tokens: int = 64, new_tokens: int = 128,
        sequences: int = 8, seed: int = 0, early_exit_below: int | None = None) -> dict:
    """Simulate one setting; the simulator's summary. A heads directory's scenario (``heads_exits``)
    prices a head evaluation by its type and vocabulary, as the runtime's head choice does."""
    exits = setting.exits(scenario)
    extra = head_extra_weights(scenario.manifest, setting.model.hidden) if isinstance(scenario, HeadsScenario) else 0
    if layers:
        exits = exits.moved({l: min(exits.layers, key=lambda k, l=l: abs(k - l)) for l in layers})
    ranges = setting.ranges(stages)
    wait = None
    if mode == "wait":  # hold a parked backfill about as long as the next token takes to get there
        c = setting.costs(stages, extra)
        wait = [a * c.layer(1) + i * (c.step_s + c.hop(1)) for i, (a, _) in enumerate(ranges)]
    spec = SimSpec(
        num_layers=setting.depth, ranges=ranges, costs=setting.costs(stages, extra),
        exits=exits if mode != "off" else None, head_layers=exits.layers if mode != "off" else (),
        early_exit="deferred" if mode == "wait" else mode,
        max_inflight=max_inflight, prompts=[(prompt_tokens, new_tokens)] * sequences, concurrency=concurrency,
        early_exit_below=early_exit_below, wait_s=wait, seed=seed,
    )
    return simulate(spec).summary()


# --- reports --------------------------------------------------------------------------


def projection(scenarios=("measured", "paper")) -> list[dict]:
    """Speedup of eager and deferred over plain pipeline greedy, per profile, link, scenario and P."""
    rows = []
    settings = [(CPU_PROFILE, "-")] + [(m, link) for m in GPU_MODELS for link in LINKS]
    for profile, link in settings:
        setting = Setting(profile, link if link != "-" else "nvlink")
        for scenario in scenarios:
            for stages in PROJECT_STAGES:
                if stages > setting.depth:
                    continue
                off = run(setting, stages, "off", scenario)["tokens_per_s"]
                row = {"profile": profile, "link": link, "exits": scenario, "stages": stages,
                       "fits": setting.fits(stages), "off_tokens_per_s": round(off, 1)}
                for mode in ("eager", "deferred"):
                    row[mode] = round(run(setting, stages, mode, scenario)["tokens_per_s"] / off, 3)
                rows.append(row)
    return rows


def design() -> list[dict]:
    """The design comparisons: each row one question, a setting and its variants' speedups over off."""
    rows = []
    cases = [(CPU_PROFILE, "nvlink", 2, "measured"), ("llama-3.1-8b", "nvlink", 4, "paper"),
             ("llama-3.1-70b", "ib", 8, "paper")]
    for profile, link, stages, scenario in cases:
        setting = Setting(profile, link)
        name = f"{setting.name.split(',')[0]}, P={stages}" + (f", {link}" if profile != CPU_PROFILE else "")
        off = run(setting, stages, "off", scenario)["tokens_per_s"]

        def speedup(mode="deferred", off=off, setting=setting, stages=stages, scenario=scenario, **kw):
            return round(run(setting, stages, mode, scenario, **kw)["tokens_per_s"] / off, 3)

        ranges = setting.ranges(stages)
        default = setting.exits(scenario).layers
        # the same heads on the stage boundaries, or two layers before or after them (inside a stage)
        bounds = tuple(b for _, b in ranges[:-1])
        placements = {"on the boundaries": bounds, "2 layers before": tuple(b - 2 for b in bounds),
                      "2 layers after": tuple(b + 2 for b in bounds)}
        rows.append({"setting": name, "question": f"head placement ({len(bounds)} head(s), deferred)",
                     "variants": {f"{k} {list(v)}": speedup(layers=v) for k, v in placements.items()}
                     | {f"the scenario's {list(default)}": speedup()}})
        rows.append({"setting": name, "question": "max_inflight, deferred",
                     "variants": {str(n): speedup(max_inflight=n) for n in (1, 2, 3, 4)}})
        rows.append({"setting": name, "question": "backfill policy",
                     "variants": {m: speedup(m) for m in ("eager", "deferred", "wait")}})
        seqs = {}
        for c in (1, 2, 4):
            base = run(setting, stages, "off", scenario, concurrency=c)["tokens_per_s"]
            seqs[f"{c} in flight: off tokens/s"] = round(base, 1)
            for rule, below in (("", None), (" + load rule", max(2, stages))):
                on = run(setting, stages, "deferred", scenario, concurrency=c, early_exit_below=below)
                seqs[f"{c}: deferred{rule}"] = round(on["tokens_per_s"] / base, 3)
        rows.append({"setting": name, "question": "several sequences in flight", "variants": seqs})
    return rows


REQUIREMENT_RATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def requirements(profiles=("llama-3.1-8b", "llama-3.1-70b"), stage_counts=(4, 8, 16), precisions=(0.8, 0.9, 0.95),
                 targets=(1.5, 2.0)) -> list[dict]:
    """For each model, P, precision and max_inflight (2, and P): the smallest exit rate per head
    (three heads at 1/4, 1/2 and 3/4 of the depth, each exiting that share of the tokens that
    reach it) at which eager or deferred reaches each target speedup over plain pipeline greedy;
    None: not at any rate up to 0.9. Short runs (2 sequences x 64 tokens): a design answer."""
    rows = []
    for profile in profiles:
        setting = Setting(profile)
        heads = sorted({scaled_layer(l, 4, setting.depth) for l in (1, 2, 3)})
        for stages in stage_counts:
            short = {"sequences": 2, "new_tokens": 64}
            off = run(setting, stages, "off", **short)["tokens_per_s"]
            for inflight in sorted({2, stages}):
                for precision in precisions:
                    curve = {}
                    for rate in REQUIREMENT_RATES:
                        stats = HeadsScenario(ExitStats(dict.fromkeys(heads, rate), dict.fromkeys(heads, precision)),
                                              setting.depth, {})
                        curve[rate] = max(run(setting, stages, mode, stats, inflight, **short)["tokens_per_s"] / off
                                          for mode in ("eager", "deferred"))
                    row = {"model": GPU_MODELS[profile].name, "stages": stages, "max_inflight": inflight,
                           "precision": precision, "best": round(max(curve.values()), 3)}
                    for target in targets:
                        row[f"rate_for_{target}x"] = next((r for r in REQUIREMENT_RATES if curve.get(r, 0) >= target),
                                                          None)
                    rows.append(row)
    return rows


def projection_table(rows: list[dict]) -> str:
    """One line per model, link and exit scenario; a cell per P: `eager / deferred` speedup
    (plain pipeline tokens/s), in italics where the weights do not fit."""
    lines = ["| model, hardware, link | exits | " + " | ".join(f"P={p}" for p in PROJECT_STAGES) + " |",
             "|---|---|" + "---|" * len(PROJECT_STAGES)]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        where = r["profile"] + ("" if r["link"] == "-" else f", {r['link']}")
        groups.setdefault((where, r["exits"]), {})[r["stages"]] = r
    for (where, exits), by_p in groups.items():
        cells = []
        for p in PROJECT_STAGES:
            r = by_p.get(p)
            cell = "" if r is None else f"{r['eager']:.2f}x / {r['deferred']:.2f}x ({r['off_tokens_per_s']:g})"
            cells.append(cell if r is None or r["fits"] else f"_{cell}_ (no fit)")
        lines.append(f"| {where} | {exits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_projection(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        groups.setdefault((r["profile"], r["link"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), sharey=True)
    for ax, ((profile, link), rs) in zip(axes, groups.items()):
        for scenario, style in (("measured", "-"), ("paper", "--")):
            for mode, colour in (("eager", "#55a868"), ("deferred", "#8172b3")):
                pts = [(r["stages"], r[mode]) for r in rs if r["exits"] == scenario and r["fits"]]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, marker="o", label=f"{mode}, {scenario} exits")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(PROJECT_STAGES, [str(p) for p in PROJECT_STAGES])
        ax.set_title(profile + ("" if link == "-" else f", {link}"), fontsize=9)
        ax.set_xlabel("pipeline stages P")
    axes[0].set_ylabel("speedup over plain pipeline")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------


def _from_trace(a) -> int:
    from .trace_export import read_trace

    events, stages, other = read_trace(a.trace)
    costs = fit_costs(events, other)
    result = calibrate(events, stages, other, costs=costs)
    if a.json:
        print(json.dumps({"costs": costs.to_dict(), "calibration": result}))
        return 0
    print(f"costs fitted on {a.trace}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in costs.to_dict().items()))
    print("| mode | measured (tokens/s) | predicted (tokens/s) | error |\n|---|---|---|---|")
    for mode, r in result.items():
        print(f"| {mode} | {r['measured_tokens_per_s']:.2f} | {r['predicted_tokens_per_s']:.2f} "
              f"| {100 * r['error']:+.1f}% |")
    return 0


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def check_args(a) -> None:
    """Refuse what cannot be simulated, naming the flag (ValueError: a user error)."""
    if a.trace and not Path(a.trace).is_file():
        raise ValueError(f"--trace {a.trace}: no such file; give the trace.json an `adadecode bench --trace DIR` wrote")
    for flag, value in (("--concurrency", a.concurrency), ("--sequences", a.sequences),
                        ("--max-inflight", a.max_inflight), ("--prompt-tokens", a.prompt_tokens),
                        ("--new-tokens", a.new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} {value}: give an integer >= 1")
    if a.link and a.profile == CPU_PROFILE:
        raise ValueError(f"--link applies to the GPU profiles ({', '.join(GPU_MODELS)}), not to {CPU_PROFILE}")
    if a.plot and not a.project:
        raise ValueError("--plot draws the projection: add --project")
    try:
        a.layers = [int(x) for x in a.exit_layers.split(",") if x] or None
    except ValueError:
        raise ValueError(
            f"--exit-layers {a.exit_layers}: give layer numbers separated by commas, e.g. 8,16,24"
        ) from None
    try:
        a.threshold_list = [float(x) for x in a.thresholds.split(",") if x]
    except ValueError:
        raise ValueError(f"--thresholds {a.thresholds}: give numbers separated by commas, e.g. 0.5,0.8") from None
    if not 0 <= a.lookup <= MAX_MATCH:
        raise ValueError(f"--lookup {a.lookup}: give a match length of 1 to {MAX_MATCH} tokens, or 0 for none")
    if a.exits not in ("measured", "paper"):
        if not Path(a.exits).exists():
            raise ValueError(f"--exits {a.exits}: give measured, paper, or a heads directory (`train-heads --out DIR`)")
        a.exits = heads_exits(a.exits, a.layers, a.threshold_list, a.lookup)
        a.layers = None  # chosen inside the heads' statistics, and mapped to the profile's depth with them
    elif a.thresholds or a.lookup:
        raise ValueError("--thresholds and --lookup apply to --exits DIR (a heads directory); the named scenarios "
                         "fix theirs")


def main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(list(argv))
    try:
        check_args(a)
        if a.trace:
            return _from_trace(a)
        if a.project:
            rows = projection()
            if a.plot:
                plot_projection(rows, a.plot)
            if a.json:
                print(json.dumps(rows))
            else:
                print(projection_table(rows))
            return 0
        if a.requirements:
            rows = requirements()
            if a.json:
                print(json.dumps(rows))
            else:
                print("| model (H100, NVLink) | P | max_inflight | precision | exit rate per head for 1.5x | for 2x "
                      "| best simulated |\n|---|---|---|---|---|---|---|")
                for r in rows:
                    cells = [("-" if r[k] is None else f"{r[k]:.2f}") for k in ("rate_for_1.5x", "rate_for_2.0x")]
                    print(f"| {r['model']} | {r['stages']} | {r['max_inflight']} | {r['precision']} | "
                          f"{cells[0]} | {cells[1]} | {r['best']}x |")
            return 0
        if a.design:
            rows = design()
            if a.json:
                print(json.dumps(rows))
            else:
                print("| setting | question | variants (speedup over off, simulated) |\n|---|---|---|")
                for r in rows:
                    v = "; ".join(f"{k}: {'-' if x is None else x}" for k, x in r["variants"].items())
                    print(f"| {r['setting']} | {r['question']} | {v} |")
            return 0
        if a.compiled and a.profile != CPU_PROFILE:
            raise ValueError(f"--compiled: only for --profile {CPU_PROFILE} (the GPU profiles are the compiled recipe)")
        setting = Setting(a.profile, a.link or "nvlink", a.compiled)
        if a.stages < 1 or a.stages > setting.depth:
            raise ValueError(f"--stages {a.stages}: give 1 to {setting.depth} (the model's layers)")
        layers = a.layers
        bad = [l for l in layers or () if not 0 < l < setting.depth]
        if bad:
            raise ValueError(f"--exit-layers: {bad} outside 1..{setting.depth - 1}, the layers a head can read")
        out = {"setting": setting.name, "stages": setting.ranges(a.stages), "early_exit": a.early_exit}
        off = run(setting, a.stages, "off", a.exits, concurrency=a.concurrency, prompt_tokens=a.prompt_tokens,
                  new_tokens=a.new_tokens, sequences=a.sequences)
        res = off if a.early_exit == "off" else run(
            setting, a.stages, a.early_exit, a.exits, a.max_inflight, layers, a.concurrency, a.prompt_tokens,
            a.new_tokens, a.sequences)
        out.update(res, vs_off=round(res["tokens_per_s"] / off["tokens_per_s"], 3))
        if a.json:
            print(json.dumps(out))
        else:
            for k, v in out.items():
                print(f"{k:>22}: {v}")
        return 0
    except Exception as e:  # noqa: BLE001 - one line for a user error, a traceback for a bug
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
