"""The trace recorder: what each stage and the coordinator did, and when.

Theory of operation. A ``TraceRecorder`` appends one tuple per event to a list
and does nothing else: no file, no clock of its own. The runner that owns it
passes a clock (``time.perf_counter_ns`` in every runner), so the Stage and
this module stay sans-I/O; the launcher turns the tuples into a Chrome trace
and a Gantt chart (launcher/trace_export.py).

Tracing off costs one ``if self.trace is not None`` per compute call, per
head evaluation and per LM-head call in the Stage, and nothing else: the Stage hands its compute
and head calls to the recorder, which times and records them.

Tracks: a stage's index, or ``COORDINATOR``. Times are nanoseconds on the
recorder's clock plus ``offset_ns``: a rank other than 0 measures its offset
to rank 0's clock at start-up (runners/distributed.py), so every rank's events
share rank 0's time line; stages in one process share one clock (offset 0).

Events (``EVENT_FIELDS``), first the type, the track and the time(s):

- ``compute``: a chunk through layers ``[a, b)``; ``kind`` is ``plain``, ``early-exited``
  (the segment that ended at a confident head: its token went out early), ``backfill``
  (layers left after an early exit, on the exiting stage or a later one), ``merged``
  (a deferred backfill run together with the next token) or ``drafts`` (a token with the
  context lookup's drafts, coordinator.py, from layer 0; it reads no head, and past its first
  segment it shows as a ``backfill``).
- ``head``: an exit head evaluated on the chunk's last position; ``exited``: it was confident.
- ``lm_head``: the last stage's final norm, LM head and token choice for ``n`` rows of items leaving it.
- ``send`` / ``recv``: activations leaving a stage / reaching the next.
- ``wait``: a rank with nothing to do, sleeping on its inputs.
- ``rollback``: on a stage, a truncation to ``keep_len`` with the queued or parked items it
  dropped; on the coordinator, the command.
- ``start``, ``early``, ``final``, ``finished``: the coordinator's commands and the
  predictions it took in; ``guess``: an early token that is the context lookup's guess
  (runtime/context_lookup.py), sent on at the head ``layer`` without evaluating it, so it
  counts in no head's statistics.
"""

from __future__ import annotations

from collections.abc import Callable

COORDINATOR = -1
COMPUTE_KINDS = ("plain", "early-exited", "backfill", "merged", "drafts")

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "compute": ("t0", "t1", "seq", "epoch", "pos", "n", "a", "b", "kind"),
    "head": ("t0", "t1", "seq", "epoch", "pos", "layer", "exited"),
    "lm_head": ("t0", "t1", "n"),
    "send": ("t", "seq", "epoch", "pos", "layer", "n"),
    "recv": ("t", "seq", "epoch", "pos", "layer", "n"),
    "wait": ("t0", "t1"),
    "rollback": ("t", "seq", "epoch", "keep_len", "dropped"),
    "start": ("t", "seq", "epoch", "pos", "n"),
    "early": ("t", "seq", "epoch", "pos", "token", "layer", "prob"),
    "guess": ("t", "seq", "epoch", "pos", "token", "layer"),
    "final": ("t", "seq", "epoch", "pos", "token"),
    "finished": ("t", "seq", "reason"),
}


def as_dict(event: tuple) -> dict:
    """``("compute", track, t0, ...)`` as ``{"type": "compute", "track": ..., "t0": ..., ...}``."""
    return {"type": event[0], "track": event[1], **dict(zip(EVENT_FIELDS[event[0]], event[2:]))}


class TraceRecorder:
    def __init__(self, clock: Callable[[], int], offset_ns: int = 0):
        """``clock``: monotonic nanoseconds; ``offset_ns``: added to every time handed out (the
        difference to rank 0's clock)."""
        self.clock = clock
        self.offset_ns = offset_ns
        self.events: list[tuple] = []
        self._last_compute: dict[tuple[int, int], int] = {}  # (track, seq) -> index of its last compute

    # --- hooks of the Stage: time the call they are given ----------------------------------

    def compute(self, track: int, batch, layer: int, stop: int, run):
        """``run(batch, layer, stop)``, timed; one ``compute`` event per item of the batch."""
        t0 = self.clock()
        out = run(batch, layer, stop)
        t1 = self.clock()
        for w in batch:
            # at layer 0 only a request with drafts is emitted (it reads no head); later it reads as a backfill
            kind = ("merged" if w.merged else "drafts" if w.emitted and layer == 0 else "backfill" if w.emitted
                    else "plain")
            self._last_compute[track, w.seq] = len(self.events)
            self.events.append(("compute", track, t0, t1, w.seq, w.epoch, w.pos, w.hidden.shape[0], layer, stop, kind))
        return out

    def lm_head(self, track: int, items, predict) -> None:
        """``predict(items)`` (the last stage's final norm, LM head and token choice), timed."""
        t0 = self.clock()
        predict(items)
        rows = sum(w.hidden.shape[0] - max(w.predict_from - w.pos, 0) for w in items)  # those that get a token
        self.events.append(("lm_head", track, t0, self.clock(), rows))

    def head(self, track: int, w, decide) -> bool:
        """``decide(w)`` (evaluate the head at ``w.layer``, emit if confident), timed. An exit
        relabels the plain segment that led to it ``early-exited``."""
        t0 = self.clock()
        exited = decide(w)
        self.events.append(("head", track, t0, self.clock(), w.seq, w.epoch, w.end_pos, w.layer, exited))
        i = self._last_compute.get((track, w.seq))
        if exited and i is not None:
            e = self.events[i]
            if e[5] == w.epoch and e[9] == w.layer and e[10] == "plain":
                self.events[i] = (*e[:10], "early-exited")
        return exited

    # --- everything else: one call, one event --------------------------------------------

    def record(self, kind: str, track: int, *fields) -> None:
        """An instant event: ``fields`` after the time, as ``EVENT_FIELDS[kind]`` names them."""
        self.events.append((kind, track, self.clock(), *fields))

    def span(self, kind: str, track: int, t0: int, *fields) -> None:
        """A span from ``t0`` (this recorder's ``clock()``) to now."""
        self.events.append((kind, track, t0, self.clock(), *fields))

    def drain(self) -> list[tuple]:
        """The events so far, on the shared time line (``offset_ns`` applied), and forget them."""
        events, self.events = self.events, []
        self._last_compute.clear()
        return shift(events, self.offset_ns) if self.offset_ns else events

    def merge(self, events) -> None:
        """Add events of another rank, already on this recorder's time line."""
        self.events.extend(tuple(e) for e in events)

    def clear(self) -> None:
        self.events.clear()
        self._last_compute.clear()


def shift(events: list[tuple], offset_ns: int) -> list[tuple]:
    """``events`` with every time moved by ``offset_ns``."""
    out = []
    for e in events:
        times = 2 if EVENT_FIELDS[e[0]][1] == "t1" else 1
        out.append((e[0], e[1], *(t + offset_ns for t in e[2 : 2 + times]), *e[2 + times :]))
    return out
