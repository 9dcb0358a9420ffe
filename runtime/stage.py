"""The Stage: a contiguous layer range ``[start, end)``, its KV cache, its work queue.

Theory of operation. A Stage takes work items — a ``StepRequest`` (stage 0:
tokens to embed) or ``Activations`` from the previous stage — and runs each
through its layers, handing out ``Activations`` for the next stage or, on the
last stage, the final layer's greedy ``FinalPrediction``. It does no I/O: a
runner or transport feeds ``receive()`` and ships what ``next_action()``
returns.

Rules:

- The Stage never decides acceptance; the Coordinator does.
- Every item carries ``(seq, epoch)``. Items of an older epoch than the
  stage has seen for that sequence are dropped. An item of a newer epoch at
  position ``p`` first truncates the sequence's cache to ``p`` — the rollback
  it implies — so the result never depends on whether the ``Rollback`` or the
  data arrives first (DESIGN.md, Transport).
- Positions only move forward within an epoch: an item must start exactly at
  the cache's valid length (DESIGN.md invariant 1).

It does not know the prompt, the tokenizer or the stop conditions.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

import torch

from .events import (
    DONE,
    WAITING,
    Activations,
    FinalPrediction,
    ProtocolError,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
)
from .model_runner import StageModel


class StageState(enum.Enum):
    RUNNING = "running"
    SHUTDOWN = "shutdown"
    ERROR = "error"


TRANSITIONS: dict[StageState, dict[type, StageState]] = {
    StageState.RUNNING: {
        StepRequest: StageState.RUNNING,
        Activations: StageState.RUNNING,
        Rollback: StageState.RUNNING,
        SequenceFinished: StageState.RUNNING,
        Shutdown: StageState.SHUTDOWN,
    },
    StageState.SHUTDOWN: {},
    StageState.ERROR: {},
}


@dataclass
class _Work:
    seq: int
    epoch: int
    pos: int
    layer: int
    hidden: torch.Tensor  # [S, D]


@dataclass
class StageStats:
    items: int = 0
    positions: int = 0
    dropped_stale: int = 0


class Stage:
    def __init__(self, index: int, num_stages: int, model: StageModel):
        self.index = index
        self.num_stages = num_stages
        self.model = model
        self.start, self.end = model.start, model.end
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.state = StageState.RUNNING
        self.epochs: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        self.finished: set[int] = set()
        self.stats = StageStats()
        self._work: deque[_Work] = deque()
        self._out: deque = deque()

    # --- input ---------------------------------------------------------------------

    def receive(self, event) -> None:
        """Record an event; compute happens in ``next_action()``."""
        if type(event) not in TRANSITIONS[self.state]:
            state = self.state
            self.state = StageState.ERROR
            raise ProtocolError(
                f"stage {self.index}: {type(event).__name__} is illegal in state {state.name} "
                f"(sequence {getattr(event, 'seq', '-')})"
            )
        if isinstance(event, Shutdown):
            self.state = StageState.SHUTDOWN
            self._work.clear()
        elif isinstance(event, SequenceFinished):
            self._release(event.seq)
        elif isinstance(event, Rollback):
            if self._advance_epoch(event.seq, event.epoch, event.keep_len):
                self._work = deque(w for w in self._work if not (w.seq == event.seq and w.epoch < event.epoch))
        elif isinstance(event, StepRequest):
            if not self.is_first:
                self.state = StageState.ERROR
                raise ProtocolError(f"stage {self.index}: StepRequest sent to a stage other than 0 (sequence {event.seq})")
            hidden = self.model.embed(torch.tensor(event.tokens, dtype=torch.long))
            self._enqueue(_Work(event.seq, event.epoch, event.pos, self.start, hidden))
        else:  # Activations
            if event.layer != self.start:
                self.state = StageState.ERROR
                raise ProtocolError(
                    f"stage {self.index} starts at layer {self.start} but got activations for layer "
                    f"{event.layer} (sequence {event.seq})"
                )
            self._enqueue(_Work(event.seq, event.epoch, event.pos, event.layer, event.hidden))

    def _enqueue(self, work: _Work) -> None:
        if work.seq in self.finished or work.epoch < self.epochs.get(work.seq, 0):
            self.stats.dropped_stale += 1
            return
        self._advance_epoch(work.seq, work.epoch, work.pos)
        self._work.append(work)

    def _advance_epoch(self, seq: int, epoch: int, keep_len: int) -> bool:
        """Apply the rollback a newer epoch implies; False if ``epoch`` is not newer."""
        if seq in self.finished or epoch <= self.epochs.get(seq, 0):
            return False
        self.epochs[seq] = epoch
        if seq in self.slots:
            self.model.truncate(self.slots[seq], keep_len)
        return True

    def _slot(self, seq: int) -> int:
        slot = self.slots.get(seq)
        if slot is None:
            free = set(range(self.model.cache.num_slots)) - set(self.slots.values())
            if not free:
                raise ProtocolError(
                    f"stage {self.index}: no free cache slot for sequence {seq} "
                    f"({len(self.slots)} sequences in flight)"
                )
            slot = self.slots[seq] = min(free)
            self.model.reset(slot)
        return slot

    def _release(self, seq: int) -> None:
        self.finished.add(seq)
        self.slots.pop(seq, None)
        self.epochs.pop(seq, None)
        self._work = deque(w for w in self._work if w.seq != seq)

    # --- output ----------------------------------------------------------------------

    def next_action(self):
        """Run queued work and return the next output event, or ``WAITING`` / ``DONE``."""
        while not self._out and self._work:
            self._run(self._work.popleft())
        if self._out:
            return self._out.popleft()
        return DONE if self.state is StageState.SHUTDOWN else WAITING

    def _run(self, w: _Work) -> None:
        slot = self._slot(w.seq)
        length = self.model.cache_length(w.layer, slot)
        if w.pos != length:
            self.state = StageState.ERROR
            raise ProtocolError(
                f"stage {self.index}: sequence {w.seq} epoch {w.epoch} sent position {w.pos} "
                f"but layer {w.layer} holds {length} positions"
            )
        hidden = self.model.run_layers(w.hidden, w.pos, w.layer, self.end, slot)
        self.stats.items += 1
        self.stats.positions += hidden.shape[0]
        if not self.is_last:
            self._out.append(Activations(w.seq, w.epoch, w.pos, self.end, hidden))
            return
        # Greedy: only the last position's distribution is needed.
        token = int(self.model.logits(hidden[-1:]).argmax(dim=-1)[0])
        self._out.append(FinalPrediction(w.seq, w.epoch, w.pos + hidden.shape[0], token))
