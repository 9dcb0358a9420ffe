"""LocalRunner: one Coordinator and N Stages in one process, wired by in-memory queues.

With one stage this *is* single-device decoding; with several it simulates the
pipeline deterministically: in each tick every stage drains what it holds, and
what it sends is delivered only after the tick, so an item moves one stage per
tick as it would between ranks. It is the reference runner: every other runner
must produce the same tokens.

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
            action = coord.next_action()
            while action is not WAITING and action is not DONE:
                if isinstance(action, StepRequest):
                    stages[0].receive(action)
                elif isinstance(action, (Rollback, SequenceFinished)):
                    for stage in stages:
                        stage.receive(action)
                elif isinstance(action, Verified):
                    if on_verified is not None:
                        on_verified(action)
                else:
                    raise TypeError(f"coordinator produced an unexpected {type(action).__name__}")
                action = coord.next_action()
            if action is DONE:
                return

            sent: list[tuple[int, object]] = []
            for i, stage in enumerate(stages):
                t0 = time.perf_counter()
                out = stage.next_action()
                while out is not WAITING and out is not DONE:
                    sent.append((i, out))
                    out = stage.next_action()
                self.busy_s[i] += time.perf_counter() - t0
            if not sent:
                raise RuntimeError(
                    "pipeline stalled: the coordinator is waiting but no stage has work "
                    "(a dropped item or a protocol bug)"
                )
            for i, event in sent:
                if isinstance(event, Activations):
                    stages[i + 1].receive(event)
                elif isinstance(event, (FinalPrediction, EarlyPrediction)):
                    coord.receive(event)
                else:
                    raise TypeError(f"stage {i} produced an unexpected {type(event).__name__}")
