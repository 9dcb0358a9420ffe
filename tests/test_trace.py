"""Traces (`--trace DIR`) and the run summary: what is recorded, what is written, and that
recording changes no token and agrees with the counters.

In process on the tiny random model (untrained heads at every inner layer): at threshold 0
every head exits, so early-exited, backfill and rolled-back work appear, and `deferred`
merges; then one 2-rank job spawned through the CLI, whose ranks' clocks are aligned at
start-up. Nothing here depends on how long anything takes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from adadecode.launcher.trace_export import chrome_trace, discarded_positions, keep_lengths, write_trace
from adadecode.runtime.run_stats import GenerationStats, RunTotals
from adadecode.runtime.stage_stats import StageStats
from adadecode.runtime.trace import COORDINATOR, TraceRecorder, as_dict, shift
from helpers import make_engine, save_identity_heads, save_tiny_chat_model

RANGES = [(0, 3), (3, 6)]
PROMPT = [5, 17, 33, 2, 9, 41, 7]


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = make_engine(model_dir, RANGES)
    engine.stages[0].heads.thresholds = dict.fromkeys(engine.stages[0].heads.layers, 0.0)  # every head exits
    return engine


def traced(engine, mode: str, max_new_tokens: int = 12):
    """``(result, events, stage counters before, stage counters after)`` of one traced generation."""
    before = [s.stats.copy() for s in engine.stages]
    recorder = engine.runner.set_trace(True)
    try:
        result = engine.generate(PROMPT, max_new_tokens=max_new_tokens, early_exit=mode)
    finally:
        engine.runner.set_trace(False)
    return result, recorder.events, before, [s.stats.copy() for s in engine.stages]


def by_type(events, kind: str, track: int | None = None) -> list[dict]:
    return [as_dict(e) for e in events if e[0] == kind and (track is None or e[1] == track)]


@pytest.mark.parametrize("mode", ["off", "eager", "deferred"])
def test_tracing_changes_no_token(engine, mode):
    plain = engine.generate(PROMPT, max_new_tokens=12, early_exit=mode)
    result, events, _, _ = traced(engine, mode)
    assert result.tokens == plain.tokens and events
    assert all(s.trace is None for s in engine.stages) and engine.runner.router.trace is None


@pytest.mark.parametrize("mode, kinds", [
    ("off", {"plain"}),
    ("eager", {"early-exited", "backfill"}),
    ("deferred", {"early-exited", "merged"}),
])
def test_compute_kinds_appear_where_expected(engine, mode, kinds):
    result, events, _, _ = traced(engine, mode)
    compute = by_type(events, "compute")
    seen = {c["kind"] for c in compute}
    assert kinds <= seen
    keep = keep_lengths(events)
    lost = sum(discarded_positions(e, keep) for e in events if e[0] == "compute")
    if mode == "off":
        assert seen == {"plain"} and not by_type(events, "head") and lost == 0 and result.stats["rollbacks"] == 0
    else:  # untrained heads are mostly wrong: rollbacks throw work away
        assert result.stats["rollbacks"] > 0 and lost > 0
        assert all(c["kind"] in ("backfill", "merged") for c in by_type(events, "compute", 1))  # emitted on stage 0
    for c in compute:  # every item starts where its layer range says, within its stage
        a, b = RANGES[c["track"]]
        assert a <= c["a"] < c["b"] <= b and c["n"] >= 1


@pytest.mark.parametrize("lookup", [0, 1])
@pytest.mark.parametrize("mode", ["eager", "deferred"])
def test_summary_equals_the_counters_and_the_trace(engine, mode, lookup):
    """With the context lookup, its guesses are their own trace events and counts, in no head's."""
    engine.lookup = lookup
    try:
        result, events, before, after = traced(engine, mode)
    finally:
        engine.lookup = 0
    st = result.stats
    delta = [a - b for a, b in zip(after, before)]
    assert result.counters.stage_stats == delta and st["stage_stats"] == [d.as_dict() for d in delta]
    assert st["stage_merged"] == [d.merged for d in delta]
    assert st["stage_idle_backfills"] == [d.idle_backfills for d in delta]
    computed, discarded = sum(d.computed for d in delta), sum(d.discarded for d in delta)
    assert st["discarded_fraction"] == round(discarded / computed, 4) and discarded > 0
    # the trace tells the same story: layer-positions computed and thrown away, head evaluations, exits
    keep = keep_lengths(events)
    for i, d in enumerate(delta):
        mine = [e for e in events if e[0] == "compute" and e[1] == i]
        assert sum(as_dict(e)["n"] * (as_dict(e)["b"] - as_dict(e)["a"]) for e in mine) == d.computed
        assert sum(discarded_positions(e, keep) * (as_dict(e)["b"] - as_dict(e)["a"]) for e in mine) == d.discarded
        heads = by_type(events, "head", i)
        assert len(heads) == d.head_evals
        assert sum(h["exited"] for h in heads) == sum(after[i].early_exits.values()) - sum(
            before[i].early_exits.values()) == sum(d.early_exits.values())
    assert len(by_type(events, "rollback", COORDINATOR)) == st["rollbacks"]
    guesses = len(by_type(events, "guess", COORDINATOR))
    assert len(by_type(events, "early", COORDINATOR)) + guesses >= st["early_emitted"]
    assert guesses >= st["lookup_emitted"] and (st["lookup_emitted"] > 0) == bool(lookup)
    assert sum(st["early_by_layer"].values()) + st["lookup_emitted"] == st["early_emitted"]
    if st["early_emitted"]:
        assert st["acceptance_rate"] == round(st["accepted"] / st["early_emitted"], 4)
    for layer, n in st["early_by_layer"].items():
        assert st["exit_rate_per_head"][layer] == round(n / len(result.tokens), 4)
        decided = st["accepted_by_layer"].get(layer, 0) + st["rejected_by_layer"].get(layer, 0)
        if decided:
            assert st["precision_per_head"][layer] == round(st["accepted_by_layer"].get(layer, 0) / decided, 4)
    # totals over generations add counters, never rates
    twice = RunTotals().add(len(result.tokens), result.counters).add(len(result.tokens), result.counters).summary()
    assert twice["discarded_fraction"] == st["discarded_fraction"] and twice["rollbacks"] == 2 * st["rollbacks"]


def test_counters_add_and_subtract_as_snapshots():
    before = StageStats(items=2, computed=6, early_exits={3: 1})
    after = before.copy()
    after.items, after.computed, after.early_exits[3], after.early_exits[1] = 5, 15, 2, 4  # the stage counts on
    assert before == StageStats(items=2, computed=6, early_exits={3: 1})  # a copy is a snapshot
    since = after - before
    assert since == StageStats(items=3, computed=9, early_exits={1: 4, 3: 1})
    assert list(since.early_exits) == [1, 3] and before + since == after
    assert (after - after).early_exits == {}  # nothing counted: no layer listed
    wire = json.loads(json.dumps(since.as_dict()))  # the control plane's JSON: layers as strings
    assert StageStats.from_dict(wire) == since and list(since.as_dict())[-1] == "early_exits"

    one = GenerationStats(elapsed_s=2.0, stage_busy_s=[1.0, 0.5], early_emitted=4, accepted=3, rollbacks=1,
                          early_by_layer={3: 4}, accepted_by_layer={3: 3}, rejected_by_layer={3: 1},
                          stage_stats=[StageStats(computed=10, discarded=1, merged=1), since])
    totals = RunTotals().add(8, one).add(8, one)
    assert totals.counters.stage_stats == [StageStats(computed=20, discarded=2, merged=2), since + since]
    assert one.stage_stats[1] == since  # adding made new counters
    s = totals.summary()
    assert (s["tokens_per_s"], s["exit_rate_per_head"], s["precision_per_head"], s["acceptance_rate"]) == (
        4.0, {3: 0.5}, {3: 0.75}, 0.75)
    assert s["stage_busy_fraction"] == [0.5, 0.25] and s["stage_merged"] == [2, 0]
    assert s["discarded_fraction"] == round(2 / (20 + 2 * 9), 4)
    with pytest.raises(ValueError, match="2 stages"):
        one + GenerationStats(stage_busy_s=[1.0], stage_stats=[StageStats()])


def check_chrome(doc: dict, num_stages: int) -> dict[int, list[dict]]:
    """The Trace Event Format invariants; the events by track (tid)."""
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names) == list(range(num_stages + 1)) and names[0] == "coordinator"
    assert all(names[i + 1].startswith(f"stage {i} ") for i in range(num_stages))
    tracks: dict[int, list[dict]] = {}
    for e in events:
        if e["ph"] == "M":
            continue
        assert e["ph"] in ("X", "i") and e["pid"] == 0 and e["ts"] >= 0 and isinstance(e["args"], dict)
        if e["ph"] == "X":
            assert e["dur"] >= 0
        tracks.setdefault(e["tid"], []).append(e)
    for tid, evs in tracks.items():  # each track is one thread of work: its times only move forward
        ts = [e["ts"] for e in evs]
        assert ts == sorted(ts), f"track {names[tid]} goes back in time"
    return tracks


def test_chrome_trace_and_png_are_written(engine, tmp_path):
    result, events, _, _ = traced(engine, "deferred")
    json_path, png_path = write_trace(tmp_path / "t", events, engine.layer_ranges, {"summary": result.stats})
    doc = json.loads(json_path.read_text())
    tracks = check_chrome(doc, len(RANGES))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compute = [e for tid in (1, 2) for e in tracks[tid] if e["cat"] == "compute"]
    assert {"early-exited", "merged"} <= {e["args"]["kind"] for e in compute}
    assert any(e["args"]["discarded"] > 0 and e["name"].endswith("(discarded)") for e in compute)
    assert {e["name"] for e in tracks[0]} >= {"start", "early", "final", "rollback", "finished"}
    assert doc["otherData"]["stages"] == [list(r) for r in RANGES]
    # in one process, a receive follows its send on the one clock
    sends = {
        (e["args"]["seq"], e["args"]["epoch"], e["args"]["pos"]): e["ts"] for e in tracks[1] if e["name"] == "send"
    }
    recvs = [e for e in tracks[2] if e["name"] == "recv"]
    assert recvs and all(e["ts"] >= sends[e["args"]["seq"], e["args"]["epoch"], e["args"]["pos"]] for e in recvs)


def test_recorder_by_hand():
    """A fake clock: the recorder times exactly the call it is handed, and shifts on drain."""
    ticks = iter(range(100, 10_000, 10))
    rec = TraceRecorder(lambda: next(ticks), offset_ns=1000)

    class W:  # the fields of a stage's work item the recorder reads
        seq, epoch, pos, merged, emitted, end_pos, layer = 3, 0, 8, False, False, 10, 2
        hidden = type("H", (), {"shape": (2, 64)})()

    assert rec.compute(0, [W()], 0, 2, lambda batch, a, b: "out") == "out"
    assert rec.head(0, W(), lambda w: True) is True
    rec.record("send", 0, 3, 0, 8, 2, 2)
    events = rec.drain()
    assert events[0] == ("compute", 0, 1100, 1110, 3, 0, 8, 2, 0, 2, "early-exited")  # relabelled by the exit
    assert events[1] == ("head", 0, 1120, 1130, 3, 0, 10, 2, True)
    assert events[2] == ("send", 0, 1140, 3, 0, 8, 2, 2) and rec.events == []
    assert shift(events, -1000)[0][2:4] == (100, 110)
    assert chrome_trace(events, [(0, 2)])["traceEvents"][-1]["ph"] == "i"


# --- two spawned ranks through the CLI --------------------------------------------------------


@pytest.mark.distributed
def test_two_spawned_ranks_write_one_aligned_trace(tmp_path, capfd):
    from adadecode.launcher.cli import main

    model = save_tiny_chat_model(tmp_path / "model")  # skipped without the bundled model's tokenizer
    heads = save_identity_heads(model, tmp_path / "heads", dict.fromkeys([1, 2, 4, 5], 0.0))
    argv = ["generate", "--model", str(model), "--prompt", "Hello there", "--max-new-tokens", "10", "--json",
            "--early-exit", "eager", f"--decoding.heads={heads}", "--model.max_seq_len=64"]
    out_dir = tmp_path / "trace"
    job = subprocess.run(
        [sys.executable, "-m", "adadecode.launcher.cli", *argv, "--stages", "2", "--transport.timeout_s=60",
         "--trace", str(out_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert job.returncode == 0, job.stderr
    traced_run = json.loads(job.stdout.splitlines()[-1])
    assert "[trace:" in job.stderr and "[stage 1 (layers " in job.stderr, job.stderr

    assert main([*argv, "--stages", "2", "--transport.backend=inprocess"]) == 0  # untraced, one process
    plain = json.loads(capfd.readouterr().out.splitlines()[-1])
    assert traced_run["tokens"] == plain["tokens"]

    doc = json.loads((out_dir / "trace.json").read_text())
    tracks = check_chrome(doc, 2)
    assert (out_dir / "trace.png").read_bytes()[:4] == b"\x89PNG"
    kinds = {e["args"]["kind"] for tid in (1, 2) for e in tracks.get(tid, []) if e["cat"] == "compute"}
    assert {"early-exited", "backfill"} <= kinds
    assert [e for e in tracks[2] if e["cat"] == "compute"], "rank 1's events reached rank 0"
    # aligned clocks: rank 1 never receives an item before rank 0 sent it, up to the measurement's
    # error bound (half its round trip) and the export's rounding to 1 ns
    tolerance_us = doc["otherData"]["clock_rtt_ns"][1] / 2000 + 0.002
    sends = {
        (e["args"]["seq"], e["args"]["epoch"], e["args"]["pos"]): e["ts"] for e in tracks[1] if e["name"] == "send"
    }
    recvs = [e for e in tracks[2] if e["name"] == "recv"]
    assert recvs
    for e in recvs:
        key = (e["args"]["seq"], e["args"]["epoch"], e["args"]["pos"])
        assert e["ts"] >= sends[key] - tolerance_us, (key, e["ts"], sends[key], tolerance_us)
    st = traced_run["stats"]
    assert st["rollbacks"] == len([e for e in tracks[0] if e["name"] == "rollback"])
    assert st["stage_stats"][1]["computed"] == sum(
        (e["args"]["layers"][1] - e["args"]["layers"][0] + 1) * e["args"]["chunk"]
        for e in tracks[2] if e["cat"] == "compute"
    )
