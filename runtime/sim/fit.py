"""Fitting the simulator to a trace: costs, exit statistics, and the agreement it reaches.

Theory of operation. A trace (runtime/trace.py; ``adadecode bench --trace``)
times every compute call, head evaluation and LM-head call of every stage on
one time line, with the waits, the sends and receives, and the coordinator's
predictions. ``fit_costs`` reads the simulator's ``Costs`` off it:

- per layer for chunks of 1..k rows, and the fixed cost of a call: a line
  ``call + layers x per_layer`` through the single-row calls, then the median
  per-layer time of each larger chunk; prefill chunks give the cost per extra
  row. Only calls that no other rank's compute overlapped are used for these;
- ``shared_bus``: how much slower a call ran for the share of it that other
  ranks computed at the same time (ranks on one memory bus);
- head, LM head: medians;
- link and control plane: the time from a send (an exit, a final token) to its
  arrival where the receiver was waiting for it, so the arrival was not held
  up behind the receiver's own step;
- ``step_s``: each generation's time no recorded work explains (no compute,
  head, LM head or wait), per stage output: the runner's own work.

``exit_stats`` reads each head's exit rate (exits per evaluation: the chance it
exits when it is reached) and precision (early tokens the final token
confirmed) off the generations of one mode. ``calibrate`` simulates every mode
of a ``bench`` trace with them and sets the prediction against the measurement.
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict

from ..trace import COORDINATOR, as_dict
from .simulator import Costs, ExitStats, SimSpec, simulate

MAX_CHUNK = 4  # chunk sizes tabulated per row count; larger ones (prefill) give the cost per extra row


def _median(xs, default: float = 0.0) -> float:
    return statistics.median(xs) if xs else default


def _overlaps(events: list[dict]) -> list[float]:
    """For each compute event, the fraction of its time some other rank was computing too."""
    by_track: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        by_track[e["track"]].append((e["t0"], e["t1"]))
    for spans in by_track.values():
        spans.sort()
    ends = {k: [b for _, b in v] for k, v in by_track.items()}
    out = []
    for e in events:
        covered = 0
        for track, spans in by_track.items():
            if track == e["track"]:
                continue
            i = bisect.bisect_right(ends[track], e["t0"])
            while i < len(spans) and spans[i][0] < e["t1"]:
                covered += min(spans[i][1], e["t1"]) - max(spans[i][0], e["t0"])
                i += 1
        dur = e["t1"] - e["t0"]
        out.append(min(1.0, covered / dur) if dur > 0 else 0.0)
    return out


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)  # > 0: the caller checks for two distinct x
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


class _Spans:
    """Disjoint time spans, sorted: which one holds a time."""

    def __init__(self, spans):
        self.spans = sorted(spans)
        self.starts = [a for a, _ in self.spans]

    def at(self, t: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, t) - 1
        return self.spans[i] if i >= 0 and self.spans[i][1] >= t else None


def _waiting(events: list[dict]) -> dict[int, _Spans]:
    """Per track, its wait spans."""
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        if e["type"] == "wait":
            spans[e["track"]].append((e["t0"], e["t1"]))
    return {k: _Spans(v) for k, v in spans.items()}


def _was_waiting(waits: dict[int, _Spans], track: int, t: int) -> bool:
    return track in waits and waits[track].at(t) is not None


def fit_costs(raw_events: list[tuple], other: dict) -> Costs:
    """The simulator's costs, read off a trace (see the module docstring)."""
    events = [as_dict(e) for e in raw_events]
    ns = 1e-9
    compute = [e for e in events if e["type"] == "compute"]
    if not compute:
        raise ValueError("the trace holds no compute events; record it with `--trace DIR`")
    overlap = _overlaps(compute)
    alone = [(e, f) for e, f in zip(compute, overlap) if f < 0.05]
    singles = [((e["b"] - e["a"]), (e["t1"] - e["t0"]) * ns) for e, _ in alone if e["n"] == 1]
    if len({x for x, _ in singles}) < 2:
        raise ValueError("the trace has too few single-row compute calls to fit a layer's cost")
    call_s, per_layer = _line(singles)
    call_s = max(call_s, 0.0)
    table = [per_layer]
    for n in range(2, MAX_CHUNK + 1):
        per = [((e["t1"] - e["t0"]) * ns - call_s) / (e["b"] - e["a"]) for e, _ in alone if e["n"] == n]
        table.append(_median(per, table[-1]) if len(per) >= 3 else table[-1])
    for i in range(1, len(table)):  # more rows never cost less; noise on a few calls can say so
        table[i] = max(table[i], table[i - 1])
    extra = [(((e["t1"] - e["t0"]) * ns - call_s) / (e["b"] - e["a"]) - table[-1]) / (e["n"] - MAX_CHUNK)
             for e, _ in alone if e["n"] > MAX_CHUNK]
    row_s = max(_median(extra, 0.0), 0.0)

    # ranks sharing a memory bus: a call runs (1 + bus x overlapped fraction) times as long
    num, den = 0.0, 0.0
    for e, f in zip(compute, overlap):
        if e["n"] == 1 and f >= 0.2:
            expected = call_s + (e["b"] - e["a"]) * per_layer
            num += f * ((e["t1"] - e["t0"]) * ns / expected - 1)
            den += f * f
    shared_bus = min(max(num / den, 0.0), 2.0) if den >= 5 else 0.0

    heads = [(e["t1"] - e["t0"]) * ns for e in events if e["type"] == "head"]
    lm = [(e["t1"] - e["t0"]) * ns for e in events if e["type"] == "lm_head" and e["n"] == 1]

    waits = _waiting(events)
    sends = {(e["seq"], e["epoch"], e["pos"], e["layer"]): e for e in events if e["type"] == "send"}
    link = [(e["t"] - s["t"]) * ns for e in events if e["type"] == "recv"
            for s in [sends.get((e["seq"], e["epoch"], e["pos"], e["layer"]))]
            if s is not None and _was_waiting(waits, e["track"], s["t"])]
    exits = {(e["seq"], e["epoch"], e["pos"]): e for e in events
             if e["type"] == "head" and e["exited"] and e["track"] > 0}
    control = [(e["t"] - h["t1"]) * ns for e in events if e["type"] == "early" and e["track"] == COORDINATOR
               for h in [exits.get((e["seq"], e["epoch"], e["pos"]))]
               if h is not None and _was_waiting(waits, 0, h["t1"])]
    rtt = [r for r in other.get("clock_rtt_ns", []) if r]
    control_s = _median(control, _median(rtt) * ns / 2)

    step_s = _step_overhead(events, other)
    return Costs(
        layer_s=table, row_s=row_s, call_s=call_s, head_s=_median(heads), lm_head_s=_median(lm),
        step_s=step_s, link_s=_median(link), control_s=max(control_s, 0.0),
        hidden_bytes=int(other.get("hidden_bytes", 0)), shared_bus=shared_bus,
    )


def _windows(events: list[dict]) -> dict[int, tuple[int, int]]:
    """Each sequence's span on the coordinator: its prompt's start to its end."""
    first, last = {}, {}
    for e in events:
        if e["track"] == COORDINATOR and e["type"] in ("start", "finished"):
            first.setdefault(e["seq"], e["t"])
            if e["type"] == "finished":
                last[e["seq"]] = e["t"]
    return {s: (first[s], last[s]) for s in last if s in first}


def _step_overhead(events: list[dict], other: dict) -> float:
    """The runner's own time per stage output: what no recorded work or wait explains."""
    windows = _Spans(_windows(events).values())
    if not windows.spans:
        return 0.0
    span = sum(b - a for a, b in windows.spans)
    tracks = len(other.get("stages", [])) or 1
    worked, outputs = 0, 0
    for e in events:
        if e["track"] == COORDINATOR:
            continue
        t = e.get("t0", e.get("t"))
        window = windows.at(t)
        if window is None:
            continue
        if e["type"] in ("compute", "head", "lm_head", "wait"):
            worked += min(e["t1"], window[1]) - t
        if e["type"] == "send" or (e["type"] == "head" and e["exited"]):
            outputs += 1
        elif e["type"] == "lm_head":
            outputs += e["n"]
    idle = span * tracks - worked
    return max(idle, 0) * 1e-9 / outputs if outputs else 0.0


def exit_stats(raw_events: list[tuple], seqs: set[int] | None = None) -> ExitStats:
    """Each head's exit rate (exits per evaluation) and precision (early tokens the final token
    confirmed, of those verified either way), over ``seqs`` (None: every sequence)."""
    events = [as_dict(e) for e in raw_events]
    if seqs is not None:
        events = [e for e in events if e.get("seq") in seqs]
    evals, exited = defaultdict(int), defaultdict(int)
    for e in events:
        if e["type"] == "head":
            evals[e["layer"]] += 1
            exited[e["layer"]] += bool(e["exited"])
    finals = {(e["seq"], e["epoch"], e["pos"]): e["token"] for e in events if e["type"] == "final"}
    right, decided = defaultdict(int), defaultdict(int)
    for e in events:
        if e["type"] == "early":
            truth = finals.get((e["seq"], e["epoch"], e["pos"]))
            if truth is not None:
                decided[e["layer"]] += 1
                right[e["layer"]] += truth == e["token"]
    rate = {l: exited[l] / n for l, n in sorted(evals.items())}
    precision = {l: (right[l] / decided[l] if decided[l] else 1.0) for l in rate}
    return ExitStats(rate, precision)


def calibrate(raw_events: list[tuple], stages: list[tuple[int, int]], other: dict, costs: Costs | None = None,
              max_inflight: int | None = None) -> dict[str, dict]:
    """For each mode of a ``bench`` trace: measured and simulated tokens/s, with the costs fitted
    on the whole trace and each mode's own exit statistics."""
    generations = other.get("generations")
    if not generations or "num_layers" not in other:
        raise ValueError("the trace does not list its generations; record it with `adadecode bench --trace DIR` "
                         "(a `generate` trace, or one from an older adadecode, cannot be fitted)")
    costs = costs or fit_costs(raw_events, other)
    max_inflight = max_inflight or int(other.get("max_inflight", 2))
    out = {}
    for mode in dict.fromkeys(g["mode"] for g in generations):
        gens = [g for g in generations if g["mode"] == mode]
        seqs = {g["seq"] for g in gens}
        ran_as = gens[0].get("ran_as", mode.split(":")[0])  # off where no head paid (runtime/sim/heads.py)
        exits = exit_stats(raw_events, seqs) if ran_as != "off" else None
        if exits is not None and not exits.layers:  # heads loaded, none on the path: nothing exits
            exits, ran_as = None, "off"
        spec = SimSpec(
            num_layers=int(other["num_layers"]), ranges=[tuple(r) for r in stages], costs=costs, exits=exits,
            head_layers=exits.layers if exits else (), early_exit=ran_as, max_inflight=max_inflight,
            prompts=[(g["prompt_tokens"], g["tokens"]) for g in gens],
        )
        sim = simulate(spec)
        measured = sum(g["tokens"] for g in gens) / sum(g["elapsed_s"] for g in gens)
        out[mode] = {
            "measured_tokens_per_s": round(measured, 3),
            "predicted_tokens_per_s": round(sim.tokens_per_s, 3),
            "error": round(sim.tokens_per_s / measured - 1, 4),
            "simulated": sim.summary(),
        }
    return out
