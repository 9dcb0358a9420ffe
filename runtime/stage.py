"""The Stage: a contiguous layer range ``[start, end)``, its KV cache, its exit heads.

Theory of operation. A Stage takes work items — a ``StepRequest`` (stage 0:
tokens to embed) or ``Activations`` from the previous stage — and runs each
through its layers, handing out ``Activations`` for the next stage or, on the
last stage, the final layer's ``FinalPrediction`` for every position of the
chunk that needs one: greedy, or sampled under the sequence's ``sampling``
(runtime/sampling.py; in speculative mode the last stage also accepts or
resamples an exit head's draw, which rides with the item as a ``Proposal``). It does no I/O: a runner or transport feeds
``receive()`` and ships what ``next_action()`` returns, one event at a time.
With a ``trace`` (runtime/trace.py) it hands each compute call and head
evaluation to the recorder, which times and records it; without, nothing.

Early exit. The head at layer ``l`` reads the hidden state entering layer
``l``; a stage evaluates the heads in ``(start, end]`` on the last position of
an item whose next token has not been emitted yet. When a head is confident,
the stage emits an ``EarlyPrediction`` at once and stops the item there; its
remaining layers (the *backfill*) then run under the policy the item carries
(``early_exit``, the sequence's mode; the stage's ``policy`` when it carries
none), so sequences of different modes can share a stage:

- ``eager``: next, before any other item, one chunk as it was: bit-identical
  to early exit off.
- ``deferred``: parked at layer ``l`` until the next token of the sequence
  reaches ``l``, then run as one chunk with it (true positions, causal mask).
  Deferred work never waits while the stage would otherwise idle: with no
  fresh item queued, the parked item with the lowest layer runs (and picks up
  the parked items above it on its way).

Rules:

- The Stage never decides acceptance; the Coordinator does.
- Every item carries ``(seq, epoch)``. Items of an older epoch than the
  stage has seen for that sequence are dropped. An item of a newer epoch at
  position ``p`` first truncates the sequence's cache to ``p`` and discards
  queued and parked work of older epochs — the rollback it implies — so the
  result never depends on whether the ``Rollback`` or the data arrives first
  (docs/design.md, invariant 7).
- Positions only move forward within an epoch: at every layer an item starts
  exactly at the cache's valid length (docs/design.md, invariant 1).
- ``SequenceFinished`` frees the sequence's slot, in any state but SHUTDOWN
  (cleanup after a failure must still free it); its outputs not handed out
  yet are dropped, and later items are stale. ``finished`` remembers every finished id in bounded memory: ids
  are never reused, and handed out in increasing order they collapse into a
  watermark (``FinishedSeqs``).

It does not know the prompt, the tokenizer, the stop conditions or how many
early tokens the Coordinator will take.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .events import (
    DONE,
    EARLY_EXIT_MODES,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
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
from .model_runner import StageModel
from .sampling import Proposal, SamplingParams

if TYPE_CHECKING:  # for annotations only: the Stage does not load heads or write traces
    from .exit_heads import ExitHeads
    from .trace import TraceRecorder

BACKFILL_POLICIES = EARLY_EXIT_MODES


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


@dataclass
class _Work:
    seq: int
    epoch: int
    pos: int
    layer: int  # the next layer to run
    hidden: torch.Tensor  # [S, D]
    predict_from: int  # first position whose next token the final layer predicts
    emitted: bool = False  # the last position's next token went out early
    policy: str = "off"  # the sequence's early-exit mode
    sampling: SamplingParams | None = None  # the sequence's; None: greedy
    proposals: dict[int, Proposal] = field(default_factory=dict)  # speculative: position -> head's draw
    merged: bool = False  # a deferred backfill joined it on this stage (for the trace)

    @property
    def end_pos(self) -> int:
        return self.pos + self.hidden.shape[0]


@dataclass
class StageStats:
    items: int = 0
    positions: int = 0
    dropped_stale: int = 0
    head_evals: int = 0
    early_exits: dict[int, int] = field(default_factory=dict)  # head layer -> exits
    merged: int = 0  # deferred backfills run together with a later token
    batched: int = 0  # calls that ran items of several sequences at once
    idle_backfills: int = 0  # deferred backfills run because the stage had nothing else
    computed: int = 0  # layer-positions run: positions x layers, summed over compute calls
    discarded: int = 0  # of those, cache entries a rollback truncated (work thrown away)


class Stage:
    def __init__(
        self,
        index: int,
        num_stages: int,
        model: StageModel,
        heads: ExitHeads | None = None,
        policy: str = "off",
        max_batch: int | None = None,
        exact_batches: bool = True,
    ):
        """``heads``: an ``ExitHeads`` (runtime/exit_heads.py) or None; ``policy``: off, eager or
        deferred, for items that carry no ``early_exit`` of their own; ``max_batch``: items of
        different sequences run as one call (default: as many as the model has cache slots);
        ``exact_batches``: each sequence in a call gets the bits it would get alone (see
        ``StageModel.run_layers_batch``), else one matmul for all rows (faster)."""
        if policy not in BACKFILL_POLICIES:
            raise ValueError(f"backfill policy `{policy}` is unknown; use one of {', '.join(BACKFILL_POLICIES)}")
        self.index = index
        self.num_stages = num_stages
        self.model = model
        self.start, self.end = model.start, model.end
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.heads = heads
        self.policy = policy
        self.max_batch = model.num_slots if max_batch is None else max_batch
        self.exact_batches = exact_batches
        self.state = StageState.RUNNING
        self.epochs: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        self.finished = FinishedSeqs()
        self.stats = StageStats()
        self._work: deque[_Work] = deque()
        self._parked: dict[int, dict[int, _Work]] = {}  # seq -> {layer: deferred backfill}
        self._out: deque[StageOutput] = deque()
        self.trace: TraceRecorder | None = None  # set by the runner; None: not traced

    @property
    def head_layers(self) -> tuple[int, ...]:
        """Head layers this stage evaluates under its default policy."""
        return self._head_layers(self.policy)

    def _head_layers(self, policy: str) -> tuple[int, ...]:
        if self.heads is None or policy == "off":
            return ()
        num_layers = self.model.args.num_layers
        return tuple(l for l in self.heads.layers if self.start < l <= self.end and l < num_layers)

    @property
    def queued(self) -> int:
        """Fresh items waiting to run."""
        return len(self._work)

    @property
    def ready(self) -> int:
        """Outputs computed and not handed out yet."""
        return len(self._out)

    @property
    def parked(self) -> int:
        """Deferred backfills parked until the next token of their sequence (or an idle moment)."""
        return sum(len(items) for items in self._parked.values())

    def is_stale(self, event: _Work | StageOutput) -> bool:
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
            self._work.clear()
            self._parked.clear()
        elif isinstance(event, SequenceFinished):
            self._release(event.seq)
        elif isinstance(event, Rollback):
            self._advance_epoch(event.seq, event.epoch, event.keep_len)
        elif isinstance(event, StepRequest):
            if not self.is_first:
                raise self._error(f"StepRequest sent to a stage other than 0 (sequence {event.seq})")
            policy = self._policy_of(event)
            hidden = self.model.embed(event.tokens)
            last = event.pos + len(event.tokens) - 1
            self._enqueue(
                _Work(
                    event.seq, event.epoch, event.pos, self.start, hidden, last, policy=policy,
                    sampling=event.sampling,
                )
            )
        else:  # Activations
            if event.layer != self.start:
                raise self._error(
                    f"the stage starts at layer {self.start} but got activations for layer "
                    f"{event.layer} (sequence {event.seq})"
                )
            last = event.pos + event.hidden.shape[0] - 1
            predict_from = last if event.predict_from < 0 else event.predict_from
            policy = self._policy_of(event)
            self._enqueue(
                _Work(
                    event.seq, event.epoch, event.pos, event.layer, event.hidden, predict_from, event.emitted, policy,
                    event.sampling, {p.pos: p for p in event.proposals},
                )
            )

    def _error(self, what: str) -> ProtocolError:
        """Enter ERROR and return the error to raise: the stage, the state it was in, what happened."""
        state, self.state = self.state, StageState.ERROR
        return ProtocolError(f"stage {self.index} in state {state.name}: {what}")

    def _policy_of(self, event: StepRequest | Activations) -> str:
        if event.early_exit is None:
            return self.policy
        if event.early_exit not in BACKFILL_POLICIES:
            raise self._error(
                f"{type(event).__name__} carries early_exit `{event.early_exit}`, not one of "
                f"{', '.join(BACKFILL_POLICIES)} (sequence {event.seq})"
            )
        return event.early_exit

    def _enqueue(self, work: _Work) -> None:
        if self.is_stale(work):
            self.stats.dropped_stale += 1
            return
        self._advance_epoch(work.seq, work.epoch, work.pos)
        self._work.append(work)

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
        queued = len(self._work)
        self._work = deque(w for w in self._work if not (w.seq == seq and w.epoch < epoch))
        parked = self._parked.pop(seq, None)  # parked work is never older than the newest epoch's
        if self.trace is not None:
            dropped = queued - len(self._work) + len(parked or ())
            self.trace.record("rollback", self.index, seq, epoch, keep_len, dropped)

    def _slot(self, seq: int) -> int:
        slot = self.slots.get(seq)
        if slot is None:
            free = set(range(self.model.num_slots)) - set(self.slots.values())
            if not free:
                raise self._error(
                    f"no free cache slot for sequence {seq} "
                    f"({len(self.slots)} sequences in flight)"
                )
            slot = self.slots[seq] = min(free)
            self.model.reset(slot)
        return slot

    def _release(self, seq: int) -> None:
        self.finished.add(seq)
        self.slots.pop(seq, None)
        self.epochs.pop(seq, None)
        self._parked.pop(seq, None)
        self._work = deque(w for w in self._work if w.seq != seq)
        self._out = deque(o for o in self._out if o.seq != seq)  # nothing of it follows the release

    # --- output ----------------------------------------------------------------------

    def next_action(self) -> StageOutput | Sentinel:
        """Run work until an event is ready; return it, or ``WAITING`` / ``DONE``.

        Fresh items run first; parked (deferred) backfills only when there is none.
        """
        if self.state is StageState.ERROR:
            raise ProtocolError(f"stage {self.index} is in state ERROR after an earlier error; it runs nothing more")
        while not self._out:
            if self._work:
                self._run(self._take_batch())
            elif any(self._parked.values()):
                self._run([self._pop_lowest_parked()])
                self.stats.idle_backfills += 1
            else:
                break
        if self._out:
            return self._out.popleft()
        return DONE if self.state is StageState.SHUTDOWN else WAITING

    def _take_batch(self) -> list[_Work]:
        """The next queued item, and up to ``max_batch - 1`` queued items of other sequences at
        the same layer: they run as one call (each row attends to its own slot)."""
        first = self._work.popleft()
        batch = [first]
        if self.max_batch > 1 and self._work:
            seqs, rest = {first.seq}, deque[_Work]()
            for w in self._work:
                if len(batch) < self.max_batch and w.layer == first.layer and w.seq not in seqs:
                    batch.append(w)
                    seqs.add(w.seq)
                else:
                    rest.append(w)
            self._work = rest
        return batch

    def _pop_lowest_parked(self) -> _Work:
        parked = self._parked[min(seq for seq, items in self._parked.items() if items)]
        return parked.pop(min(parked))

    def _run(self, batch: list[_Work]) -> None:
        """Advance ``batch`` (items of distinct sequences, all at one layer) segment by segment,
        a segment ending at the stage's end, a head layer or a parked item. At each boundary an
        item may merge with its parked backfill, exit early, or leave the stage. Returns as soon
        as a boundary produced an output, putting the rest back at the front of the queue, so an
        early token goes out without waiting for the others' layers."""
        while batch:
            going, leaving, eager = [], [], []
            for w in batch:
                parked = self._parked.get(w.seq, {}).pop(w.layer, None)
                if parked is not None:  # a deferred backfill joins this token: one chunk from here on
                    w = self._merge(parked, w)
                if w.layer in self._head_layers(w.policy) and not w.emitted and self._head(w) and w.layer < self.end:
                    if w.policy == "eager":  # the backfill runs next, before anything else
                        eager.append(w)
                    else:
                        self._parked.setdefault(w.seq, {})[w.layer] = w
                    continue
                if w.layer == self.end:
                    leaving.append(w)
                    continue
                length = self.model.cache_length(w.layer, self._slot(w.seq))
                if w.pos != length:
                    raise self._error(
                        f"sequence {w.seq} epoch {w.epoch} sent position {w.pos} "
                        f"but layer {w.layer} holds {length} positions"
                    )
                going.append(w)
            self._leave(leaving)
            if self._out:  # hand it out now; the rest of the batch, eager backfills first, runs next
                self._work.extendleft(reversed(going))
                self._work.extendleft(reversed(eager))
                return
            batch = going
            if not batch:
                return
            layer = batch[0].layer
            stop = min(self._stop(w) for w in batch)
            if self.trace is None:
                hiddens = self._compute(batch, layer, stop)
            else:  # the same call, timed and recorded
                hiddens = self.trace.compute(self.index, batch, layer, stop, self._compute)
            for w, hidden in zip(batch, hiddens):
                w.hidden, w.layer = hidden, stop
                self.stats.items += 1
                self.stats.positions += hidden.shape[0]
                self.stats.computed += hidden.shape[0] * (stop - layer)

    def _compute(self, batch: list[_Work], layer: int, stop: int) -> list[torch.Tensor]:
        chunks = [(w.hidden, w.pos, self._slot(w.seq)) for w in batch]
        if len(batch) == 1:
            return [self.model.run_layers(*chunks[0][:2], layer, stop, chunks[0][2])]
        self.stats.batched += 1
        return self.model.run_layers_batch(chunks, layer, stop, exact=self.exact_batches)

    def _stop(self, w: _Work) -> int:
        """Where ``w`` must stop next: the stage's end, a head layer, or a parked backfill of its sequence."""
        heads = self._head_layers(w.policy)
        return min(l for l in (self.end, *heads, *self._parked.get(w.seq, ())) if l > w.layer)

    def _leave(self, items: list[_Work]) -> None:
        """Items past the stage's last layer: activations for the next stage or, on the last,
        the final layer's tokens (one LM-head call and one transfer for all of them)."""
        if not items:
            return
        if not self.is_last:
            for w in items:
                self._out.append(
                    Activations(
                        w.seq, w.epoch, w.pos, self.end, w.hidden, w.predict_from, w.emitted, w.policy,
                        w.sampling, tuple(w.proposals.values()),
                    )
                )
            return
        if self.trace is None:
            self._predict(items)
        else:  # the same call, timed and recorded
            self.trace.lm_head(self.index, items, self._predict)

    def _predict(self, items: list[_Work]) -> None:
        """The last stage's tokens for ``items``: final norm, LM head, greedy or sampled."""
        for w in (w for w in items if w.sampling is not None):
            self._sample(w)
        items = [w for w in items if w.sampling is None]
        if not items:
            return
        # Greedy: only the positions that still need a next token get the LM head.
        firsts = [max(w.predict_from - w.pos, 0) for w in items]
        rows = [w.hidden[f:] for w, f in zip(items, firsts)]
        if len(rows) == 1 or self.exact_batches:  # each as alone: the LM head's rows are a matmul's too
            tokens = [t for r in rows for t in self.model.greedy_tokens(r)]
        else:
            with torch.inference_mode():  # like every tensor the model makes
                tokens = self.model.greedy_tokens(torch.cat(rows))
        at = 0
        for w, f, r in zip(items, firsts, rows):
            for i, token in enumerate(tokens[at : at + r.shape[0]]):
                self._out.append(FinalPrediction(w.seq, w.epoch, w.pos + f + i + 1, token))
            at += r.shape[0]

    def _sample(self, w: _Work) -> None:
        """The final layer's sampled tokens of ``w``, each position with its own noise and, in
        speculative mode, the head's proposal for it (runtime/sampling.py)."""
        first = max(w.predict_from - w.pos, 0)
        positions = range(w.pos + first + 1, w.end_pos + 1)
        tokens = self.model.sampled_tokens(w.hidden[first:], w.sampling, positions, w.proposals)
        for pos, token in zip(positions, tokens):
            self._out.append(FinalPrediction(w.seq, w.epoch, pos, token))

    def _head(self, w: _Work) -> bool:
        if self.trace is None:
            return self._try_exit(w)
        return self.trace.head(self.index, w, self._try_exit)  # the same call, timed and recorded

    def _try_exit(self, w: _Work) -> bool:
        heads = self.heads
        assert heads is not None  # only a layer of _head_layers gets here, and without heads there is none
        if w.sampling is None:
            token, prob = heads.predict(w.layer, w.hidden[-1])
            proposal = None
        else:  # the draw for position end_pos, with that position's noise
            token, prob, proposal = heads.propose(w.layer, w.hidden[-1], w.sampling, w.end_pos)
        self.stats.head_evals += 1
        if prob <= heads.thresholds[w.layer]:
            return False
        w.emitted = True
        if proposal is not None:  # rides with the item to the last stage, which accepts or resamples
            w.proposals[w.end_pos] = proposal
        self.stats.early_exits[w.layer] = self.stats.early_exits.get(w.layer, 0) + 1
        self._out.append(EarlyPrediction(w.seq, w.epoch, w.end_pos, token, w.layer, prob))
        return True

    def _merge(self, parked: _Work, w: _Work) -> _Work:
        if parked.epoch != w.epoch or parked.end_pos != w.pos:
            raise self._error(
                f"sequence {w.seq} parked positions {parked.pos}..{parked.end_pos - 1} "
                f"(epoch {parked.epoch}) at layer {w.layer} cannot join position {w.pos} (epoch {w.epoch})"
            )
        self.stats.merged += 1
        with torch.inference_mode():  # like every tensor the model makes (a compiled step guards on it)
            hidden = torch.cat([parked.hidden, w.hidden])
        return replace(
            w, pos=parked.pos, hidden=hidden, predict_from=min(parked.predict_from, w.predict_from),
            proposals={**parked.proposals, **w.proposals}, merged=True,
        )
