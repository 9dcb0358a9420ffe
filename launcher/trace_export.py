"""`--trace DIR`: a run's recorded events as a Chrome trace and a Gantt chart.

``write_trace`` turns the tuples of a ``TraceRecorder`` (runtime/trace.py),
every rank's already on rank 0's time line, into:

- ``DIR/trace.json``: Chrome's Trace Event Format (JSON object form), which
  Perfetto (https://ui.perfetto.dev, "Open trace file") and chrome://tracing
  open. One process, one track per stage (``stage i (layers a-b)``) and one for
  the coordinator. Compute and head evaluations are slices (``ph: X``) with
  their item in ``args``; waits are slices too; sends, receives, rollbacks and
  the coordinator's commands are instants. ``otherData`` holds the stage split,
  the clock and each rank's clock-measurement round trip.
- ``DIR/trace.png``: a Gantt chart of stage activity, compute coloured by kind
  (plain, early-exited, backfill, merged) and work a rollback discarded in red.

Discarded work is found here, not recorded: a rollback that starts epoch
``e + 1`` keeps positions ``< keep_len``, so every position ``>= keep_len`` that
epoch ``e`` computed was thrown away (verified lengths only grow, so later
rollbacks never discard what an earlier one kept). Summed as positions x
layers, this equals the stages' ``StageStats.discarded``.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adadecode.runtime import atomic_io
from adadecode.runtime.trace import COMPUTE_KINDS, COORDINATOR, EVENT_FIELDS, as_dict

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine

COLOURS = {
    "plain": "#4c72b0",
    "early-exited": "#55a868",
    "backfill": "#dd8452",
    "merged": "#8172b3",
    "drafts": "#937860",
    "discarded": "#c44e52",
}


def keep_lengths(events: Sequence[tuple]) -> dict[tuple[int, int], int]:
    """``(seq, epoch) -> keep_len`` of the rollback that started that epoch (the coordinator's)."""
    return {(e[3], e[4]): e[5] for e in events if e[0] == "rollback" and e[1] == COORDINATOR}


def discarded_positions(event: tuple, keep: dict[tuple[int, int], int]) -> int:
    """How many positions of a ``compute`` event a later rollback threw away."""
    d = as_dict(event)
    k = keep.get((d["seq"], d["epoch"] + 1))
    if k is None:
        return 0
    return max(0, d["pos"] + d["n"] - max(d["pos"], k))


def _tid(track: int) -> int:
    return 0 if track == COORDINATOR else track + 1


def chrome_trace(events: Sequence[tuple], stages: Sequence[tuple[int, int]], other: dict | None = None) -> dict:
    """The Trace Event Format object of ``events`` (times in ns, shown in µs from the first event)."""
    keep = keep_lengths(events)
    t_first = min((e[2] for e in events), default=0)

    def us(t: int) -> float:
        return round((t - t_first) / 1000, 3)

    out: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "adadecode"}}]
    names = [(COORDINATOR, "coordinator")] + [(i, f"stage {i} (layers {a}-{b - 1})") for i, (a, b) in enumerate(stages)]
    for track, name in names:
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": _tid(track), "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": _tid(track),
                    "args": {"sort_index": _tid(track)}})
    for e in events:
        d = as_dict(e)
        kind, tid = d.pop("type"), _tid(d.pop("track"))
        base = {"pid": 0, "tid": tid, "cat": kind}
        if kind == "compute":
            lost = discarded_positions(e, keep)
            args = {"seq": d["seq"], "epoch": d["epoch"], "positions": [d["pos"], d["pos"] + d["n"] - 1],
                    "layers": [d["a"], d["b"] - 1], "chunk": d["n"], "kind": d["kind"], "discarded": lost}
            name = d["kind"] + (" (discarded)" if lost else "")
            out.append({**base, "name": name, "ph": "X", "ts": us(d["t0"]), "dur": us(d["t1"]) - us(d["t0"]),
                        "args": args})
        elif kind in ("head", "wait", "lm_head"):
            t0, t1 = d.pop("t0"), d.pop("t1")
            name = f"head {d['layer']}: {'exit' if d['exited'] else 'no exit'}" if kind == "head" else kind
            out.append({**base, "name": name, "ph": "X", "ts": us(t0), "dur": us(t1) - us(t0), "args": d})
        else:
            t = d.pop("t")
            out.append({**base, "name": kind, "ph": "i", "s": "t", "ts": us(t), "args": d})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"stages": [list(r) for r in stages], "clock": "perf_counter_ns, rank 0's", **(other or {})}}


def read_trace(path: str | Path) -> tuple[list[tuple], list[tuple[int, int]], dict]:
    """A ``trace.json`` written by ``write_trace`` (plain or gzipped) as its events (the recorder's
    tuples, times in ns from the first event), the stage split, and ``otherData``."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    data = json.loads(raw)
    events = []
    for x in data["traceEvents"]:
        kind = x.get("cat")
        if kind is None:  # metadata
            continue
        track, a = (COORDINATOR if x["tid"] == 0 else x["tid"] - 1), x.get("args", {})
        t0 = round(x["ts"] * 1000)
        if kind == "compute":
            t1 = t0 + round(x["dur"] * 1000)
            p0, (l0, l1) = a["positions"][0], a["layers"]
            events.append(("compute", track, t0, t1, a["seq"], a["epoch"], p0, a["chunk"], l0, l1 + 1, a["kind"]))
        elif x["ph"] == "X":
            t1 = t0 + round(x["dur"] * 1000)
            events.append((kind, track, t0, t1, *(a[f] for f in EVENT_FIELDS[kind][2:])))
        else:
            events.append((kind, track, t0, *(a[f] for f in EVENT_FIELDS[kind][1:])))
    other = data.get("otherData", {})
    return events, [tuple(r) for r in other.get("stages", [])], other


def gantt_png(events: Sequence[tuple], stages: Sequence[tuple[int, int]], path: Path) -> None:
    """Stage activity over time, one row per stage (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    keep = keep_lengths(events)
    t_first = min((e[2] for e in events), default=0)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in events:
        if e[0] != "compute":
            continue
        d = as_dict(e)
        colour = "discarded" if discarded_positions(e, keep) else d["kind"]
        start = (d["t0"] - t_first) / 1e6
        bars.setdefault((d["track"], colour), []).append((start, max((d["t1"] - d["t0"]) / 1e6, 1e-4)))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.6 * len(stages)))
    for (track, colour), spans in bars.items():
        ax.broken_barh(spans, (track - 0.4, 0.8), facecolors=COLOURS[colour], linewidth=0)
    ax.set_yticks(range(len(stages)), [f"stage {i} ({a}-{b - 1})" for i, (a, b) in enumerate(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in (*COMPUTE_KINDS, "discarded")],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(stages) < 3 else -0.2), ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_trace(directory: str | Path, events: Sequence[tuple], stages: Sequence[tuple[int, int]],
                other: dict | None = None) -> tuple[Path, Path]:
    """Write ``trace.json`` and ``trace.png`` into ``directory`` (created); their paths. Each
    replaces its old version whole or not at all (runtime/atomic_io.py): an interrupted run leaves
    the previous trace, never a truncated one that a viewer or ``read_trace`` chokes on."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "trace.json", directory / "trace.png"
    atomic_io.write_text(json_path, json.dumps(chrome_trace(events, stages, other)))
    with atomic_io.replacing(png_path) as tmp:  # the temporary name keeps .png: matplotlib's format
        gantt_png(events, stages, tmp)
    return json_path, png_path


def save_trace(directory: str | Path, engine: Engine, summary: dict | None = None, extra: dict | None = None) -> None:
    """Write ``engine``'s recorded trace (``--trace DIR``) and say where, on stderr. ``extra``: more
    for ``otherData`` (``bench``: each timed generation's sequence, mode and time)."""
    other = {"clock_rtt_ns": [getattr(s, "clock_rtt_ns", 0) for s in engine.stages], "summary": summary,
             "num_layers": engine.args.num_layers, "hidden_bytes": engine.args.hidden_size * _element_size(engine),
             **(extra or {})}
    json_path, png_path = write_trace(directory, engine.runner.trace.events, engine.layer_ranges, other)
    print(f"[trace: {json_path} (open in https://ui.perfetto.dev), {png_path}]", file=sys.stderr)


def _element_size(engine: Engine) -> int:
    """Bytes per element of the activations a stage sends (its model's dtype)."""
    import torch

    return torch.empty((), dtype=getattr(engine.stages[0].model, "dtype", torch.float32)).element_size()
