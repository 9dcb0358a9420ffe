"""The one place where the Coordinator's commands become deliveries, for every runner.

A runner builds an ``ActionRouter`` with its two deliveries — to stage 0 (a
``StepRequest``) and to every stage (a ``Rollback`` or a ``SequenceFinished``:
in-process calls, or stage 0 plus a control-plane broadcast) — and calls
``pump`` whenever the Coordinator may have something to say. Which command goes
where is decided here and nowhere else.

With a ``trace`` (runtime/trace.py) it records, on the coordinator's track,
every command it delivers and every prediction handed to the Coordinator
through ``predict``.

``release`` is the cleanup after a failure (an exception or an interrupt inside
``run``): every sequence of the Coordinator is ended and its ``SequenceFinished``
delivered to every stage, so no cache slot stays taken, whatever the failure was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..coordinator import Coordinator
from ..events import DONE, WAITING, EarlyPrediction, Rollback, SequenceFinished, StepRequest, Verified
from ..trace import COORDINATOR

log = logging.getLogger("adadecode.runner")


class ActionRouter:
    def __init__(self, to_first_stage: Callable[[StepRequest], None], to_every_stage: Callable[[object], None]):
        self.to_first_stage = to_first_stage
        self.to_every_stage = to_every_stage
        self.trace = None  # a TraceRecorder, or None

    def predict(self, coord: Coordinator, event) -> None:
        """Hand a stage's ``FinalPrediction`` / ``EarlyPrediction`` to ``coord``."""
        if self.trace is not None:
            if isinstance(event, EarlyPrediction) and event.lookup:
                self.trace.record("guess", COORDINATOR, event.seq, event.epoch, event.pos, event.token, event.layer)
            elif isinstance(event, EarlyPrediction):
                self.trace.record("early", COORDINATOR, event.seq, event.epoch, event.pos, event.token, event.layer,
                                  event.prob)
            else:
                self.trace.record("final", COORDINATOR, event.seq, event.epoch, event.pos, event.token)
        coord.receive(event)

    def pump(self, coord: Coordinator, on_verified: Callable[[Verified], None] | None = None):
        """Deliver the Coordinator's commands until it has none; return its sentinel (WAITING / DONE)."""
        action = coord.next_action()
        while action is not WAITING and action is not DONE:
            if self.trace is not None:
                self._record(action)
            if isinstance(action, StepRequest):
                self.to_first_stage(action)
            elif isinstance(action, (Rollback, SequenceFinished)):
                self.to_every_stage(action)
            elif isinstance(action, Verified):
                if on_verified is not None:
                    on_verified(action)
            else:
                raise TypeError(f"coordinator produced an unexpected {type(action).__name__}")
            action = coord.next_action()
        return action

    def _record(self, action) -> None:
        if isinstance(action, StepRequest):
            self.trace.record("start", COORDINATOR, action.seq, action.epoch, action.pos, len(action.tokens))
        elif isinstance(action, Rollback):
            self.trace.record("rollback", COORDINATOR, action.seq, action.epoch, action.keep_len, 0)
        elif isinstance(action, SequenceFinished):
            self.trace.record("finished", COORDINATOR, action.seq, action.reason)

    def release(self, coord: Coordinator, exc: BaseException) -> None:
        """After ``exc`` ended a run: end every sequence of ``coord`` and free its slot on every stage.

        A sequence that finished normally gets its ``SequenceFinished`` again (freeing is
        idempotent), in case the failure came between the Coordinator and a stage. Commands
        still queued are dropped. A delivery that fails is noted on ``exc``, which the caller
        re-raises: the first failure is the one to report.
        """
        reason = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        for seq in coord.sequences:
            coord.cancel(seq, reason)
        while (action := coord.next_action()) is not WAITING and action is not DONE:
            pass
        for seq, s in coord.sequences.items():
            try:
                self.to_every_stage(SequenceFinished(seq, s.finish_reason or reason))
            except Exception as e:  # noqa: BLE001 - best effort: the original error is what matters
                log.warning("freeing the cache slots of sequence %d failed: %s", seq, e)
                exc.add_note(f"freeing the cache slots of sequence {seq} failed too: {type(e).__name__}: {e}")
