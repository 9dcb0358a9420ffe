"""A Stage's pending work: which of it runs next, together, and how far.

Theory of operation. Fresh items (stage 0's embedded ``StepRequest``, or ``Activations``) wait in
arrival order; the first runs with queued items of other sequences at its layer, as one call. A
segment runs to the nearest of the stage's end, a head layer of the item's mode and a layer where a
backfill of its sequence is parked. At that boundary (``route``) an item that exits early leaves its
backfill behind: ``eager``, put back first, to run next as the chunk it was; ``deferred``, parked at
that layer until the sequence's next token gets there and joins it (``merge``), or until the stage
has nothing fresh, when the lowest one runs and picks up those parked above it on its way. The
rules, each with its test, are in docs/design.md ("How a Stage picks work").

It holds and picks; the Stage evaluates the heads, computes, and says what is stale (``drop``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .events import Activations, StepRequest

if TYPE_CHECKING:
    from .sampling import Proposal, SamplingParams


@dataclass
class WorkItem:
    """A chunk of one sequence's positions on its way through a stage."""

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
    tokens: tuple[int, ...] = ()  # the token ids of its positions, when sampling.needs_tokens
    lookup: int = -1  # the context's guess of the token after its last position (-1: none)

    @property
    def end_pos(self) -> int:
        return self.pos + self.hidden.shape[0]

    @property
    def guessed(self) -> bool:
        """It carries the context's guess of its next token, which its first head sends on unread
        (greedy only: the Coordinator makes none for a sampled sequence)."""
        return self.lookup >= 0 and self.sampling is None

    @property
    def parts(self) -> tuple[int, ...]:
        """The row counts of the calls plain decoding makes for these positions: those up to
        ``predict_from`` as one (the prompt, whose last position is the first predicted), every
        later one alone (a decode step); runtime/row_invariant.py gives each part its bits."""
        rows = self.hidden.shape[0]
        head = min(max(self.predict_from - self.pos + 1, 1), rows)
        return (head,) + (1,) * (rows - head)

    @classmethod
    def embedded(cls, event: StepRequest, policy: str, hidden: torch.Tensor, layer: int) -> WorkItem:
        """Stage 0's item for ``event``'s tokens, embedded as ``hidden``; the final layer predicts from the
        last token that is not a draft (each draft's position is then predicted too, which verifies it).
        An item with drafts reads no head (``emitted``): nothing starts early on top of drafts."""
        last = event.pos + len(event.tokens) - 1 - event.drafts
        tokens = event.tokens if event.sampling is not None and event.sampling.needs_tokens else ()
        return cls(event.seq, event.epoch, event.pos, layer, hidden, last, event.drafts > 0, policy,
                   event.sampling, tokens=tokens, lookup=event.lookup)

    @classmethod
    def arrived(cls, event: Activations, policy: str) -> WorkItem:
        last = event.pos + event.hidden.shape[0] - 1
        predict_from = last if event.predict_from < 0 else event.predict_from
        return cls(
            event.seq, event.epoch, event.pos, event.layer, event.hidden, predict_from, event.emitted, policy,
            event.sampling, {p.pos: p for p in event.proposals}, tokens=event.tokens, lookup=event.lookup,
        )

    def activations(self, layer: int) -> Activations:
        """The item handed to the next stage, which starts at ``layer``."""
        return Activations(
            self.seq, self.epoch, self.pos, layer, self.hidden, self.predict_from, self.emitted, self.policy,
            self.sampling, tuple(self.proposals.values()), self.tokens, self.lookup,
        )


def merge(parked: WorkItem, w: WorkItem) -> WorkItem:
    """A parked backfill and the next token of its sequence (same epoch, ``parked.end_pos ==
    w.pos``: the caller checks) as one chunk, run with true positions and a causal mask."""
    with torch.inference_mode():  # like every tensor the model makes (a compiled step guards on it)
        hidden = torch.cat([parked.hidden, w.hidden])
    return replace(
        w, pos=parked.pos, hidden=hidden, predict_from=min(parked.predict_from, w.predict_from),
        proposals={**parked.proposals, **w.proposals}, merged=True, tokens=parked.tokens + w.tokens,
    )


def group_size(sequences: int, stages: int) -> int:
    """The most items a stage of a pipeline runs as one call: the sequences in flight split
    evenly over the stages (micro-batches, as vLLM's and Megatron's pipelines split a batch), so
    that every stage has a group of its own to run while the others run theirs. One call of all
    of them would march them through the stages together, each stage idle while another runs
    them."""
    return max(1, -(-sequences // max(stages, 1)))


class WorkQueue:
    def __init__(self, max_batch: int, end: int, head_layers: Callable[[str], tuple[int, ...]]):
        """``max_batch``: the most items, of distinct sequences, one call runs; ``end``: the stage's
        end; ``head_layers(mode)``: the layers of the exit heads the stage evaluates under a mode."""
        self.max_batch = max_batch
        self.end = end
        self.head_layers = head_layers
        self._fresh: deque[WorkItem] = deque()
        self._parked: dict[int, dict[int, WorkItem]] = {}  # seq -> {layer: deferred backfill}

    @property
    def fresh(self) -> int:
        return len(self._fresh)

    @property
    def parked(self) -> int:
        return sum(len(items) for items in self._parked.values())

    def push(self, w: WorkItem) -> None:
        self._fresh.append(w)

    def push_front(self, items: Iterable[WorkItem]) -> None:
        """Put ``items`` back ahead of everything queued, in their order."""
        self._fresh.extendleft(reversed(list(items)))

    def park(self, w: WorkItem) -> None:
        self._parked.setdefault(w.seq, {})[w.layer] = w

    def unpark(self, seq: int, layer: int) -> WorkItem | None:
        return self._parked.get(seq, {}).pop(layer, None)

    def parked_layers(self, seq: int) -> Iterable[int]:
        return self._parked.get(seq, {}).keys()

    def queued_seqs(self) -> set[int]:
        """The sequences with fresh items queued."""
        return {w.seq for w in self._fresh}

    def next_batch(self, limit: int | None = None) -> tuple[list[WorkItem], bool]:
        """The items to run next as one call (at most ``limit``, and ``max_batch``), and whether
        they are an idle backfill: fresh items first; a parked backfill only when there is none,
        since it may still wait for a token to join it; ``[]`` when there is nothing at all."""
        if self._fresh:
            return self._take_batch(self.max_batch if limit is None else min(limit, self.max_batch)), False
        if any(self._parked.values()):
            return [self._pop_lowest_parked()], True
        return [], False

    def _take_batch(self, limit: int) -> list[WorkItem]:
        """The first queued item, and up to ``limit - 1`` queued items of other sequences at the
        same layer: they run as one call (each row attends to its own slot). A sequence never
        batches with itself: its later item must wait for this one's cache entries."""
        first = self._fresh.popleft()
        batch = [first]
        if limit > 1 and self._fresh:
            seqs, rest = {first.seq}, deque[WorkItem]()
            for w in self._fresh:
                if len(batch) < limit and w.layer == first.layer and w.seq not in seqs:
                    batch.append(w)
                    seqs.add(w.seq)
                else:
                    rest.append(w)
            self._fresh = rest
        return batch

    def _pop_lowest_parked(self) -> WorkItem:
        """For an idle stage: the lowest sequence's parked backfill at its lowest layer, which picks
        up the sequence's backfills parked above it on its way."""
        parked = self._parked[min(seq for seq, items in self._parked.items() if items)]
        return parked.pop(min(parked))

    def stop(self, w: WorkItem) -> int:
        """Where ``w``'s next segment ends: the stage's end, a head layer of its mode, or a layer where
        a backfill of its sequence is parked."""
        return min(l for l in (self.end, *self.head_layers(w.policy), *self.parked_layers(w.seq)) if l > w.layer)

    def route(
        self, batch: list[WorkItem], exits: Callable[[WorkItem], bool]
    ) -> tuple[list[WorkItem], list[WorkItem], list[WorkItem]]:
        """Sort ``batch``, at a segment boundary, into the items that go on, those that leave the
        stage and eager backfills. At a head layer of its mode, an item whose next token has not
        gone out asks ``exits`` (the Stage evaluates the head and emits); one that exits below the
        stage's end leaves its backfill, which runs next (``eager``) or is parked here (``deferred``)."""
        going, leaving, eager = [], [], []
        for w in batch:
            if w.layer in self.head_layers(w.policy) and not w.emitted and exits(w) and w.layer < self.end:
                if w.policy == "eager":  # bit-identical to early exit off: the same chunk, only later
                    eager.append(w)
                else:
                    self.park(w)
            elif w.layer == self.end:
                leaving.append(w)
            else:
                going.append(w)
        return going, leaving, eager

    def drop(self, seq: int, before_epoch: int | None = None) -> int:
        """Drop the queued items of ``seq`` of an epoch before ``before_epoch`` (all if None) and all
        its parked ones; return how many went. Parked work is always of the newest epoch seen so
        far, so a newer epoch makes all of it stale."""
        queued = len(self._fresh)
        self._fresh = deque(
            w for w in self._fresh if not (w.seq == seq and (before_epoch is None or w.epoch < before_epoch))
        )
        return queued - len(self._fresh) + len(self._parked.pop(seq, {}))

    def clear(self) -> None:
        self._fresh.clear()
        self._parked.clear()
