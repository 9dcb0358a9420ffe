"""LocalRunner: one Coordinator and N Stages in one process, wired by in-memory queues.

With one stage this *is* single-device decoding; with several it simulates the
pipeline deterministically: in each tick every stage works through what it
holds, and the activations it sends are delivered only after the tick, so an
item moves one stage per tick as it would between ranks. Predictions go to the
Coordinator at once and its commands come back before the stage runs again,
as a fast control plane would deliver them: that is what lets an early token
start on stage 0 while the stage that exited still holds deferred work.

It is the reference runner: every other runner must produce the same tokens.
With a ``feed`` (runtime/serving.py) it does not return when every sequence has
finished: it takes in new sequences and cancellations between ticks and waits
for more when idle.
With a trace (``set_trace``) every stage and the router record into one
recorder on one clock, and the runner records each hand-over of activations
(``send`` when a stage hands them out, ``recv`` when the next stage takes them).
It only moves events; decisions belong to the state machines, and which
command goes where to the ``ActionRouter`` it shares with every runner. If
anything raises inside ``run`` (the model, a state machine, the caller's
``on_verified``, an interrupt), every sequence is ended and its slot freed on
every stage before the error goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..coordinator import Coordinator
from ..events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    ProtocolError,
    Verified,
)
from ..stage import Stage
from ..trace import TraceRecorder
from .routing import ActionRouter


class LocalRunner:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.busy_s = [0.0] * len(stages)
        self.router = ActionRouter(stages[0].receive, self._to_every_stage)
        self.trace: TraceRecorder | None = None

    def set_trace(self, on: bool) -> TraceRecorder | None:
        """Record a trace from now on (a fresh recorder), or stop recording; the recorder, or None."""
        self.trace = TraceRecorder(time.perf_counter_ns) if on else None
        for stage in self.stages:
            stage.trace = self.trace
        self.router.trace = self.trace
        return self.trace

    def _to_every_stage(self, event) -> None:
        for stage in self.stages:
            stage.receive(event)

    def run(self, coord: Coordinator, on_verified: Callable[[Verified], None] | None = None, feed=None) -> None:
        """Drive ``coord`` and the stages until every sequence has finished (with a ``feed``: until
        the feed says stop); on any failure, free every sequence's slot on every stage and re-raise."""
        try:
            self._run(coord, on_verified, feed)
        except BaseException as exc:
            self.router.release(coord, exc)
            raise

    def released(self, seq: int) -> bool:
        """Whether every stage has freed ``seq``'s slot: at once, in process."""
        return True

    def _run(self, coord: Coordinator, on_verified, feed) -> None:
        stages = self.stages
        while True:
            if feed is not None:
                feed.admit(coord)
            if self.router.pump(coord, on_verified) is DONE:
                if feed is None or not feed.wait():
                    return
                continue
            sent: list[tuple[int, Activations]] = []
            progressed = False
            for i, stage in enumerate(stages):
                t0 = time.perf_counter()
                out = stage.next_action()
                while out is not WAITING and out is not DONE:
                    progressed = True
                    if isinstance(out, Activations):
                        sent.append((i, out))
                        if self.trace is not None:
                            self.trace.record("send", i, out.seq, out.epoch, out.pos, out.layer, out.hidden.shape[0])
                    elif isinstance(out, (FinalPrediction, EarlyPrediction)):
                        self.router.predict(coord, out)
                        self.router.pump(coord, on_verified)
                    else:
                        raise TypeError(f"stage {i} produced an unexpected {type(out).__name__}")
                    out = stage.next_action()
                self.busy_s[i] += time.perf_counter() - t0
            if not progressed and self.router.pump(coord, on_verified) is WAITING:
                raise ProtocolError(
                    "pipeline stalled: the coordinator is waiting but no stage has work "
                    "(a dropped item or a protocol bug)"
                )
            for i, event in sent:
                if self.trace is not None:
                    n = event.hidden.shape[0]
                    self.trace.record("recv", i + 1, event.seq, event.epoch, event.pos, event.layer, n)
                stages[i + 1].receive(event)
