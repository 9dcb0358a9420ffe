"""LocalRunner: one Coordinator and N Stages in one process, wired by in-memory queues.

With one stage this *is* single-device decoding; with several it simulates the
pipeline deterministically: in each tick every stage works through what it
holds, and the activations it sends are delivered only after the tick, so an
item moves one stage per tick as it would between ranks. Predictions go to the
Coordinator at once and its commands come back before the stage runs again,
as a fast control plane would deliver them: that is what lets an early token
start on stage 0 while the stage that exited still holds deferred work.

It is the reference runner: every other runner must produce the same tokens.
It only moves events; decisions belong to the state machines.
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
    Rollback,
    SequenceFinished,
    StepRequest,
    Verified,
)
from ..stage import Stage


class LocalRunner:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.busy_s = [0.0] * len(stages)

    def run(self, coord: Coordinator, on_verified: Callable[[Verified], None] | None = None) -> None:
        """Drive ``coord`` and the stages until every sequence has finished."""
        stages = self.stages
        while True:
            if self._pump(coord, on_verified) is DONE:
                return
            sent: list[tuple[int, Activations]] = []
            progressed = False
            for i, stage in enumerate(stages):
                t0 = time.perf_counter()
                out = stage.next_action()
                while out is not WAITING and out is not DONE:
                    progressed = True
                    if isinstance(out, Activations):
                        sent.append((i, out))
                    elif isinstance(out, (FinalPrediction, EarlyPrediction)):
                        coord.receive(out)
                        self._pump(coord, on_verified)
                    else:
                        raise TypeError(f"stage {i} produced an unexpected {type(out).__name__}")
                    out = stage.next_action()
                self.busy_s[i] += time.perf_counter() - t0
            if not progressed and self._pump(coord, on_verified) is WAITING:
                raise RuntimeError(
                    "pipeline stalled: the coordinator is waiting but no stage has work "
                    "(a dropped item or a protocol bug)"
                )
            for i, event in sent:
                stages[i + 1].receive(event)

    def _pump(self, coord: Coordinator, on_verified):
        """Deliver the coordinator's commands; return the sentinel it ends with."""
        action = coord.next_action()
        while action is not WAITING and action is not DONE:
            if isinstance(action, StepRequest):
                self.stages[0].receive(action)
            elif isinstance(action, (Rollback, SequenceFinished)):
                for stage in self.stages:
                    stage.receive(action)
            elif isinstance(action, Verified):
                if on_verified is not None:
                    on_verified(action)
            else:
                raise TypeError(f"coordinator produced an unexpected {type(action).__name__}")
            action = coord.next_action()
        return action
