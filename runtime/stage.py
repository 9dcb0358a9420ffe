"""The Stage: a contiguous layer range ``[start, end)``, its KV cache, its exit heads.

Theory of operation. A Stage runs work items (stage 0's ``StepRequest``, or ``Activations`` from the
previous stage) through its layers, handing out ``Activations`` for the next stage or, on the last,
a ``FinalPrediction`` for each position that needs one. A confident exit head's ``EarlyPrediction``
goes out at once, and the layers the item has left (its backfill) run under its ``early_exit`` mode:
``eager``, next; ``deferred``, parked until the sequence's next token joins them. It does no I/O:
a runner feeds ``receive()`` and ships what ``next_action()`` returns. Beside it: what runs next,
together and how far (work_queue.py); which tokens come out (token_choice.py); the model, as a
``StageModelLike`` (stage_model.py); a ``trace`` (trace.py), when set, times each call it is handed.

Rules, each tested as docs/design.md lists (invariants 1 and 7, "How a Stage picks work"):

- The Stage never decides acceptance; the Coordinator does. It does not know the prompt, the
  tokenizer, the stop conditions or how many early tokens the Coordinator will take.
- Every item carries ``(seq, epoch)``. An item of an older epoch than the stage has seen is dropped;
  one of a newer epoch at position ``p`` first applies the rollback it implies (truncate to ``p``,
  drop older work), so ``Rollback`` and data may arrive in either order.
- Within an epoch, at every layer an item starts exactly at the cache's valid length.
- ``SequenceFinished`` frees the slot in any state but SHUTDOWN (cleanup after a failure must still
  free it) and drops the sequence's pending work; ``finished`` remembers every finished id in
  bounded memory, so later items are stale.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .events import (
    DONE,
    EARLY_EXIT_MODES,
    WAITING,
    Activations,
    ProtocolError,
    Rollback,
    Sentinel,
    SequenceFinished,
    Shutdown,
    StageInput,
    StageOutput,
    StepRequest,
)
from .finished import FinishedSeqs
from .stage_stats import StageStats
from .token_choice import TokenHistory, final_predictions, try_exit
from .work_queue import WorkItem, WorkQueue, group_size, merge

if TYPE_CHECKING:  # for annotations only: the Stage loads no model or heads and writes no trace
    import torch

    from .exit_heads import ExitHeads
    from .stage_model import StageModelLike
    from .trace import TraceRecorder


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
    StageState.ERROR: {SequenceFinished: StageState.ERROR},  # freeing a slot is always safe
}


class Stage:
    def __init__(
        self, index: int, num_stages: int, model: StageModelLike, heads: ExitHeads | None = None,
        policy: str = "off", max_batch: int | None = None, exact_batches: bool = True,
    ):
        """``heads``: an ``ExitHeads`` (runtime/exit_heads.py) or None; ``policy``: off, eager or
        deferred, for items that carry no ``early_exit`` of their own; ``max_batch``: items of
        different sequences run as one call (default: as many as the model has cache slots);
        ``exact_batches``: each sequence in a call gets the bits it would get alone (see
        ``StageModel.run_layers_batch``), else one matmul for all rows (faster)."""
        if policy not in EARLY_EXIT_MODES:
            raise ValueError(f"backfill policy `{policy}` is unknown; use one of {', '.join(EARLY_EXIT_MODES)}")
        self.index, self.num_stages = index, num_stages
        self.model = model
        self.start, self.end = model.start, model.end
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.heads, self.policy = heads, policy
        self.exact_batches = exact_batches
        self.state = StageState.RUNNING
        self.epochs: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        self.finished = FinishedSeqs()
        self.stats = StageStats()
        self._queue = WorkQueue(model.num_slots if max_batch is None else max_batch, self.end, self._head_layers)
        self._out: deque[StageOutput] = deque()
        self._history = TokenHistory()  # last stage: token ids of sequences whose items carry them
        self.trace: TraceRecorder | None = None  # set by the runner; None: not traced

    @property
    def queued(self) -> int:
        """Fresh items waiting to run."""
        return self._queue.fresh

    @property
    def ready(self) -> int:
        """Outputs computed and not handed out yet."""
        return len(self._out)

    @property
    def parked(self) -> int:
        """Deferred backfills parked until the next token of their sequence (or an idle moment)."""
        return self._queue.parked

    def is_stale(self, event: WorkItem | StageOutput) -> bool:
        """Whether ``event`` (an item, or an output of this stage) is of a finished sequence or an
        older epoch than this stage has seen: work every stage drops, so a runner need not send it."""
        return event.seq in self.finished or event.epoch < self.epochs.get(event.seq, 0)

    # --- input ---------------------------------------------------------------------

    def receive(self, event: StageInput) -> None:
        """Record an event; compute happens in ``next_action()``."""
        if type(event) not in TRANSITIONS[self.state]:
            raise self._error(f"{type(event).__name__} is illegal (sequence {getattr(event, 'seq', '-')})")
        if isinstance(event, Shutdown):
            self.state = StageState.SHUTDOWN
            self._queue.clear()
        elif isinstance(event, SequenceFinished):
            self._release(event.seq)
        elif isinstance(event, Rollback):
            self._advance_epoch(event.seq, event.epoch, event.keep_len)
        elif isinstance(event, StepRequest):
            if not self.is_first:
                raise self._error(f"StepRequest sent to a stage other than 0 (sequence {event.seq})")
            if not 0 <= event.drafts < len(event.tokens):
                raise self._error(f"StepRequest of {len(event.tokens)} tokens says {event.drafts} of them are "
                                  f"drafts: at least the first is not (sequence {event.seq})")
            self._enqueue(WorkItem.embedded(event, self._policy_of(event), self.model.embed(event.tokens), self.start))
        else:  # Activations
            if event.layer != self.start:
                raise self._error(
                    f"the stage starts at layer {self.start} but got activations for layer "
                    f"{event.layer} (sequence {event.seq})"
                )
            self._enqueue(WorkItem.arrived(event, self._policy_of(event)))

    def _error(self, what: str) -> ProtocolError:
        """Enter ERROR and return the error to raise: the stage, the state it was in, what happened."""
        state, self.state = self.state, StageState.ERROR
        return ProtocolError(f"stage {self.index} in state {state.name}: {what}")

    def _policy_of(self, event: StepRequest | Activations) -> str:
        if event.early_exit is None:
            return self.policy
        if event.early_exit not in EARLY_EXIT_MODES:
            raise self._error(
                f"{type(event).__name__} carries early_exit `{event.early_exit}`, not one of "
                f"{', '.join(EARLY_EXIT_MODES)} (sequence {event.seq})"
            )
        return event.early_exit

    def _enqueue(self, work: WorkItem) -> None:
        if self.is_stale(work):
            self.stats.dropped_stale += 1
            return
        self._advance_epoch(work.seq, work.epoch, work.pos)
        self._queue.push(work)

    def _advance_epoch(self, seq: int, epoch: int, keep_len: int) -> None:
        """Apply the rollback a newer epoch implies: truncate, and drop older queued work."""
        if seq in self.finished or epoch <= self.epochs.get(seq, 0):
            return
        self.epochs[seq] = epoch
        if seq in self.slots:
            slot = self.slots[seq]
            self.stats.discarded += sum(
                max(0, self.model.cache_length(l, slot) - keep_len) for l in range(self.start, self.end)
            )
            self.model.truncate(slot, keep_len)
        dropped = self._queue.drop(seq, before_epoch=epoch)
        if self.trace is not None:
            self.trace.record("rollback", self.index, seq, epoch, keep_len, dropped)

    def _slot(self, seq: int) -> int:
        slot = self.slots.get(seq)
        if slot is None:
            free = set(range(self.model.num_slots)) - set(self.slots.values())
            if not free:
                raise self._error(f"no free cache slot for sequence {seq} ({len(self.slots)} sequences in flight)")
            slot = self.slots[seq] = min(free)
            self.model.reset(slot)
        return slot

    def _release(self, seq: int) -> None:
        self.finished.add(seq)
        self.slots.pop(seq, None)
        self.epochs.pop(seq, None)
        self._queue.drop(seq)
        self._history.drop(seq)
        self._out = deque(o for o in self._out if o.seq != seq)  # nothing of it follows the release

    # --- output ----------------------------------------------------------------------

    def next_action(self) -> StageOutput | Sentinel:
        """Run work until an event is ready; return it, or ``WAITING`` / ``DONE``."""
        if self.state is StageState.ERROR:
            raise ProtocolError(f"stage {self.index} is in state ERROR after an earlier error; it runs nothing more")
        while not self._out:
            batch, idle = self._queue.next_batch(self._group_size())
            if not batch:
                break
            self._run(batch)
            self.stats.idle_backfills += idle
        if self._out:
            return self._out.popleft()
        return DONE if self.state is StageState.SHUTDOWN else WAITING

    def _group_size(self) -> int | None:
        """The most items of one call (``group_size``): the sequences in flight here, those with a
        cache slot or a queued item, over the stages; None (only ``max_batch``) on a lone stage."""
        if self.num_stages == 1:
            return None
        return group_size(len(self.slots.keys() | self._queue.queued_seqs()), self.num_stages)

    def _run(self, batch: list[WorkItem]) -> None:
        """Advance ``batch`` (items of distinct sequences, all at one layer) segment by segment, each
        ending where ``WorkQueue.stop`` says. At a boundary an item may join its parked backfill, exit
        early or leave the stage; the first output ends the call and the rest goes back to the front
        of the queue, so an early token does not wait for the others' layers."""
        while batch:
            batch = [self._join_parked(w) for w in batch]
            going, leaving, eager = self._queue.route(batch, self._exit_or_guess)
            for w in going:
                length = self.model.cache_length(w.layer, self._slot(w.seq))
                if w.pos != length:
                    raise self._error(
                        f"sequence {w.seq} epoch {w.epoch} sent position {w.pos} "
                        f"but layer {w.layer} holds {length} positions"
                    )
            self._leave(leaving)
            if self._out:  # hand it out now; the rest of the batch, eager backfills first, runs next
                self._queue.push_front(eager + going)
                return
            if not going:
                return
            batch, layer = going, going[0].layer
            stop = min(self._queue.stop(w) for w in batch)
            hiddens = self._traced("compute", self._compute, batch, layer, stop)
            for w, hidden in zip(batch, hiddens):
                w.hidden, w.layer = hidden, stop
                self.stats.items += 1
                self.stats.positions += hidden.shape[0]
                self.stats.computed += hidden.shape[0] * (stop - layer)

    def _compute(self, batch: list[WorkItem], layer: int, stop: int) -> list[torch.Tensor]:
        chunks = [(w.hidden, w.pos, self._slot(w.seq)) for w in batch]
        parts = [w.parts for w in batch]
        merged = any(len(p) > 1 for p in parts)  # only a merged chunk needs its parts (row_invariant.py)
        if len(batch) == 1:
            hidden, pos, slot = chunks[0]
            if merged:
                return [self.model.run_layers(hidden, pos, layer, stop, slot, parts=parts[0])]
            return [self.model.run_layers(hidden, pos, layer, stop, slot)]
        self.stats.batched += 1
        if merged:
            return self.model.run_layers_batch(chunks, layer, stop, exact=self.exact_batches, parts=parts)
        return self.model.run_layers_batch(chunks, layer, stop, exact=self.exact_batches)

    def _head_layers(self, policy: str) -> tuple[int, ...]:
        """The layers whose heads this stage evaluates under ``policy``: in ``(start, end]`` and below
        ``num_layers``, where the LM head reads the same state. Read per call: ``heads`` may be replaced."""
        if self.heads is None or policy == "off":
            return ()
        return tuple(l for l in self.heads.layers if self.start < l <= self.end and l < self.model.args.num_layers)

    def _join_parked(self, w: WorkItem) -> WorkItem:
        """``w`` and the backfill of its sequence parked at ``w.layer``, if any, as one chunk."""
        parked = self._queue.unpark(w.seq, w.layer)
        if parked is None:
            return w
        if parked.epoch != w.epoch or parked.end_pos != w.pos:
            raise self._error(
                f"sequence {w.seq} parked positions {parked.pos}..{parked.end_pos - 1} "
                f"(epoch {parked.epoch}) at layer {w.layer} cannot join position {w.pos} (epoch {w.epoch})"
            )
        self.stats.merged += 1
        return merge(parked, w)

    def _exit_or_guess(self, w: WorkItem) -> bool:
        """The head at ``w``'s layer, traced as one; an item carrying the context's guess exits with
        it there, and that is no head evaluation (token_choice.try_exit)."""
        return self._try_exit(w) if w.guessed else self._traced("head", self._try_exit, w)

    def _try_exit(self, w: WorkItem) -> bool:
        assert self.heads is not None  # only a layer of _head_layers gets here, and without heads there is none
        self.stats.head_evals += not w.guessed  # a guess is sent on unread
        early = try_exit(self.heads, w)
        if early is None:
            return False
        if not early.lookup:  # the heads' own exits
            self.stats.early_exits[w.layer] = self.stats.early_exits.get(w.layer, 0) + 1
        self._out.append(early)
        return True

    def _leave(self, items: list[WorkItem]) -> None:
        """Items past the stage's last layer: activations for the next stage or, on the last, tokens."""
        if not self.is_last:
            self._out.extend(w.activations(self.end) for w in items)
        elif items:
            self._traced("lm_head", self._predict, items)

    def _predict(self, items: list[WorkItem]) -> None:
        self._out.extend(final_predictions(self.model, items, self.exact_batches, self._history))

    def _traced(self, hook: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, through the trace's ``hook`` (which times and records it) when tracing."""
        if self.trace is None:
            return call(*args)
        return getattr(self.trace, hook)(self.index, *args, call)
