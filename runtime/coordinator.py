"""The Coordinator: per-sequence verification, acceptance and rollback.

Theory of operation. For each sequence the Coordinator tracks the committed
tokens (prompt plus verified output), the in-flight tokens (emitted early by an
exit head, not yet verified), the epoch and a state. It does no I/O and knows
nothing of layers, tensors or transports: stages report predictions, and it
answers with commands.

- ``receive(event)`` only records; ``next_action()`` hands out the next command
  (``StepRequest``, ``Rollback``, ``Verified``, ``SequenceFinished``) or the
  sentinel ``WAITING`` / ``DONE``.
- A ``FinalPrediction`` for position ``p`` is the truth for ``p``. If an early
  token is in flight at ``p`` and agrees, it is accepted (it is already in the
  pipeline). If it disagrees, the epoch grows, everything at ``>= p`` is rolled
  back on every stage, and the final token is started instead. With no early
  token at ``p``, the final token is committed and started.
- An ``EarlyPrediction`` for the next free position starts that token at once,
  up to ``max_inflight`` unverified tokens (none for a sequence whose
  early-exit mode is ``off``). Every ``StepRequest`` carries the sequence's
  mode and sampling parameters, so the stages apply them without being told
  anything else.
- With ``lookup``, each ``StepRequest`` of a greedy sequence with early exit
  carries the context's guess of the token after it (runtime/context_lookup.py):
  the first exit head the item reaches sends it on as the early token, which is
  verified like any other.
- With ``draft``, a decode request also carries up to ``draft`` tokens after its own: the
  lookup's guess from a match of any length, the guess after that, and so on (prompt lookup
  decoding's draft). They are in flight from the moment the request leaves, and the final
  layer's predictions of the same pass verify them one by one; the first that disagrees rolls
  back like a wrong early token. A chunk of a few decode rows costs about one row where they
  share one call (compiled on the CPU; docs/results.md), so a right draft is a token for
  nothing. Nothing starts early on top of drafts. With a ``table``, where the sequence itself
  has no match, the model's own answers to other prompts give the drafts
  (runtime/draft_table.py).
- Verification is an exact match in every decoding mode. Greedy and seeded
  sampling: the final layer's token is the truth. Speculative sampling: the
  last stage has already applied the ``min(1, p/q)`` test to the head's draw
  (runtime/sampling.py), and its token equals the early one exactly when the
  draw was kept. So acceptance needs no number but the token here.
- Positions only move forward, except on ``Rollback``. Nothing is shown
  (``Verified``) or counted before it is verified, and stop conditions are
  checked on verified tokens only.
- Predictions of an older epoch are stale and dropped; predictions for a
  finished sequence are dropped too (in-flight work may still drain).
- Every sequence ends with one ``SequenceFinished``, whatever ends it: the stop
  criteria, or ``cancel()`` when the runner or the caller fails, so that every
  stage frees its slot.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .context_lookup import MAX_DRAFT, MAX_MATCH, ContextLookup
from .events import (
    DONE,
    WAITING,
    Command,
    EarlyPrediction,
    FinalPrediction,
    Prediction,
    ProtocolError,
    Rollback,
    Sentinel,
    SequenceFinished,
    StepRequest,
    Verified,
)
from .params import check_early_exit
from .sampling import SamplingParams
from .stopping import StopChecker, StopCriteria

if TYPE_CHECKING:
    from .draft_table import DraftTable

DRAFTED = 0  # the "layer" of a draft in ``Sequence.inflight_from``: it entered with its request
TABLED = -1  # the same for a draft from the draft table (runtime/draft_table.py)


class SeqState(enum.Enum):
    PREFILL = "prefill"  # prompt sent, no token yet
    DECODING = "decoding"
    FINISHED = "finished"
    ERROR = "error"


# The legal moves, in one place: {state: {event type: next state}}. A prediction in
# DECODING may also finish the sequence; that move is decided by the stop criteria.
TRANSITIONS: dict[SeqState, dict[type, SeqState]] = {
    SeqState.PREFILL: {FinalPrediction: SeqState.DECODING, EarlyPrediction: SeqState.PREFILL},
    SeqState.DECODING: {FinalPrediction: SeqState.DECODING, EarlyPrediction: SeqState.DECODING},
    SeqState.FINISHED: {FinalPrediction: SeqState.FINISHED, EarlyPrediction: SeqState.FINISHED},
    SeqState.ERROR: {},
}


@dataclass
class SeqStats:
    early_emitted: int = 0
    accepted: int = 0
    rollbacks: int = 0
    early_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens started
    accepted_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens verified
    rejected_by_layer: dict[int, int] = field(default_factory=dict)  # head layer -> the wrong token a rollback undid
    lookup_emitted: int = 0  # of early_emitted: the context's guesses (runtime/context_lookup.py)
    lookup_accepted: int = 0  # of accepted: the context's guesses
    drafted: int = 0  # of lookup_emitted: drafts, sent with a request rather than at a head
    table_drafted: int = 0  # of drafted: the draft table's (runtime/draft_table.py)
    table_accepted: int = 0  # of lookup_accepted: the draft table's


@dataclass
class Sequence:
    seq: int
    prompt_len: int
    tokens: list[int]  # committed: prompt + verified output
    criteria: StopCriteria
    state: SeqState = SeqState.PREFILL
    epoch: int = 0
    inflight: list[int] = field(default_factory=list)  # early tokens at len(tokens) + i
    # per early token: the layer of the head it exited at, and whether it is the context lookup's guess
    inflight_from: list[tuple[int, bool]] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SeqStats = field(default_factory=SeqStats)
    early_exit: str | None = None  # carried by every StepRequest; None: the stages' default
    sampling: SamplingParams | None = None  # carried by every StepRequest; None: greedy
    max_inflight: int = 0
    draft: int = 0  # the most drafts each of its requests carries
    lookup: ContextLookup | None = None  # greedy with early exit: the guesses and drafts its requests carry
    stop_checker: StopChecker = field(init=False, repr=False)  # decodes each verified token once

    def __post_init__(self) -> None:
        self.stop_checker = self.criteria.checker()

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Coordinator:
    def __init__(self, max_inflight: int = 0, early_exit_below: int | None = None, lookup: int = 0,
                 draft: int = 0, table: DraftTable | None = None):
        """``max_inflight``: cap on unverified early tokens per sequence (0: heads never start a token).

        ``lookup``: the shortest match of a greedy sequence's last tokens earlier in it whose
        continuation each ``StepRequest`` carries as its guess (runtime/context_lookup.py); 0: none.
        ``draft``: with ``lookup``, the most drafts a greedy sequence's decode request carries
        after its token (``StepRequest.drafts``); 0: none. Drafts take a match of any length (1 token
        or more, as prompt lookup decoding does): where they pay, a wrong one costs little. Nothing
        starts early after drafts, so with them a head's guess is only ever made without a match.
        ``table``: with drafts, where a sequence has no match, its drafts come from this table of the
        model's own answers (runtime/draft_table.py).

        ``early_exit_below`` (serving): heads (and drafts) are used only while fewer sequences than
        this are running; at or above it each new item goes without them (early exit off for that
        token), whatever its sequence's mode. Once several sequences fill the pipeline, a
        stage no longer idles, so the work a wrong early token throws away is no longer free
        (docs/serving.md, Early exit under load). An item already under way keeps its mode; a
        deferred backfill it parked still merges with the next token, which merges whatever its
        own mode. None: always the sequence's mode.
        """
        self.max_inflight = max_inflight
        self.early_exit_below = early_exit_below
        if not 0 <= lookup <= MAX_MATCH:
            raise ValueError(f"lookup is a match length of 1 to {MAX_MATCH} tokens (0: off), not {lookup}")
        self.lookup = lookup
        if not 0 <= draft <= MAX_DRAFT:
            raise ValueError(f"draft is a number of tokens from 0 (none) to {MAX_DRAFT}, not {draft}")
        self.draft = draft  # a sequence gets drafts only with the lookup on (gets_drafts)
        self.table = table
        self.sequences: dict[int, Sequence] = {}
        self._actions: deque[Command] = deque()

    def add_sequence(
        self,
        seq: int,
        prompt: list[int],
        criteria: StopCriteria,
        early_exit: str | None = None,
        sampling: SamplingParams | None = None,
    ) -> None:
        """Register ``seq`` and queue its prompt for stage 0.

        ``early_exit`` (off, eager, deferred) is the sequence's mode: ``off`` takes no early
        token; None leaves the stages' default policy and this Coordinator's ``max_inflight``.
        ``sampling`` (a ``SamplingParams``; None or temperature 0: greedy) travels with every
        ``StepRequest`` of the sequence.
        """
        if seq in self.sequences:
            raise ProtocolError(f"sequence {seq} already exists")
        if not prompt:
            raise ValueError(f"sequence {seq}: the prompt is empty; give at least one token")
        check_early_exit(early_exit)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams or None, not {type(sampling).__name__}")
        if sampling is not None and sampling.plain_greedy:
            sampling = None  # temperature 0 alone is greedy: the stages' greedy path, bit for bit
        max_inflight = 0 if early_exit == "off" else self.max_inflight
        draft = self.draft if early_exit != "off" and gets_drafts(self.draft, self.lookup, sampling) else 0
        lookup = None
        if (max_inflight or draft) and gets_guesses(self.lookup, sampling):
            lookup = ContextLookup(1, table=self.table) if draft else ContextLookup(self.lookup)
        s = self.sequences[seq] = Sequence(
            seq, len(prompt), list(prompt), criteria, early_exit=early_exit, sampling=sampling,
            max_inflight=max_inflight, draft=draft, lookup=lookup,
        )
        self._actions.append(self._step(s, 0, tuple(prompt)))

    def cancel(self, seq: int, reason: str = "cancelled") -> None:
        """End ``seq`` now (``cancelled``, ``failed``): drop its queued commands and queue its
        ``SequenceFinished``, so that every stage frees its slot. A finished sequence is left alone."""
        s = self.sequences[seq]
        if s.state is SeqState.FINISHED:
            return
        if s.state is not SeqState.ERROR:  # ERROR stays: it tells what went wrong
            s.state = SeqState.FINISHED
        s.finish_reason = reason
        _drop_inflight(s)
        self._actions = deque(a for a in self._actions if getattr(a, "seq", None) != seq)
        self._actions.append(SequenceFinished(seq, reason))

    def remove(self, seq: int) -> None:
        """Forget finished ``seq`` (a long-lived Coordinator, serving). Only once every stage has
        freed its slot: a prediction for a forgotten sequence is a ProtocolError."""
        s = self.sequences[seq]
        if s.state is not SeqState.FINISHED:
            raise ProtocolError(f"sequence {seq} is {s.state.name}, not finished: it cannot be removed")
        del self.sequences[seq]

    def receive(self, event: Prediction) -> None:
        """Record a prediction from a stage."""
        if not hasattr(event, "seq"):
            raise ProtocolError(
                f"the coordinator takes FinalPrediction or EarlyPrediction, not {type(event).__name__}"
            )
        s = self.sequences.get(event.seq)
        if s is None:
            raise ProtocolError(f"{type(event).__name__} for unknown sequence {event.seq}")
        allowed = TRANSITIONS[s.state]
        if type(event) not in allowed:
            state = s.state
            s.state = SeqState.ERROR
            raise ProtocolError(f"{type(event).__name__} is illegal in state {state.name} (sequence {s.seq})")
        if s.state is SeqState.FINISHED or event.epoch < s.epoch:
            return  # stale: in-flight work draining after a rollback or the end
        if event.epoch > s.epoch:
            state, s.state = s.state, SeqState.ERROR
            raise ProtocolError(
                f"{type(event).__name__} from future epoch {event.epoch} > {s.epoch} is illegal in state "
                f"{state.name} (sequence {s.seq})"
            )
        if isinstance(event, FinalPrediction):
            self._on_final(s, event)
        else:
            self._on_early(s, event)
        if s.state is not SeqState.FINISHED:
            s.state = allowed[type(event)]

    def next_action(self) -> Command | Sentinel:
        """The next command to carry out, or ``WAITING`` / ``DONE``."""
        if self._actions:
            return self._actions.popleft()
        if all(s.state is SeqState.FINISHED for s in self.sequences.values()):
            return DONE
        return WAITING

    # --- transitions ---------------------------------------------------------------

    def _on_final(self, s: Sequence, ev: FinalPrediction) -> None:
        pos = len(s.tokens)
        if ev.pos != pos:
            state, s.state = s.state, SeqState.ERROR
            raise ProtocolError(
                f"FinalPrediction for position {ev.pos} is illegal in state {state.name}: sequence {s.seq} "
                f"expects position {pos}"
            )
        s.tokens.append(ev.token)
        logprobs = () if ev.logprobs is None else (ev.logprobs,)
        self._actions.append(Verified(s.seq, pos, (ev.token,), logprobs, ev.prompt_logprobs))
        if s.inflight:
            layer, guessed = s.inflight_from.pop(0)
            if s.inflight.pop(0) == ev.token:
                s.stats.accepted += 1
                s.stats.lookup_accepted += guessed
                s.stats.table_accepted += layer == TABLED
                if not guessed:  # the per-head counts are the heads' own
                    _count(s.stats.accepted_by_layer, layer)
            else:
                if not guessed:
                    _count(s.stats.rejected_by_layer, layer)
                _drop_inflight(s)
                s.epoch += 1
                s.stats.rollbacks += 1
                self._actions.append(Rollback(s.seq, s.epoch, pos))
                if not self._maybe_finish(s):
                    self._actions.append(self._step(s, pos, (ev.token,)))
                return
            self._maybe_finish(s)
            return
        if not self._maybe_finish(s):
            self._actions.append(self._step(s, pos, (ev.token,)))

    def _on_early(self, s: Sequence, ev: EarlyPrediction) -> None:
        pos = len(s.tokens) + len(s.inflight)
        if ev.pos != pos or len(s.inflight) >= s.max_inflight:
            return  # not the next free position, or too much unverified work: ignore
        if s.inflight_from and s.inflight_from[-1][0] <= DRAFTED:
            return  # it stands on drafts, which are right far less often than a head: ignore
        if not _room(s):
            return  # past the length limit: the token could never be output
        s.inflight.append(ev.token)
        s.inflight_from.append((ev.layer, ev.lookup))
        s.stats.early_emitted += 1
        if ev.lookup:
            s.stats.lookup_emitted += 1
        else:
            _count(s.stats.early_by_layer, ev.layer)
        self._actions.append(self._step(s, pos, (ev.token,)))

    def _step(self, s: Sequence, pos: int, tokens: tuple[int, ...]) -> StepRequest:
        """``s``'s request for ``tokens`` at ``pos`` (the last of its tokens so far). Where it looks up
        and its next item may exit: a decode step's drafts after them (in flight from now on), and
        the context's guess of the token after those."""
        mode = self._mode(s)
        if s.lookup is None or mode == "off":
            return StepRequest(s.seq, s.epoch, pos, tokens, mode, s.sampling)
        drafts: list[int] = []
        guess, length = s.lookup.match(s.tokens, s.inflight)
        while guess is not None and pos > 0 and len(drafts) < s.draft and _room(s):
            drafts.append(guess)
            s.inflight.append(guess)
            s.inflight_from.append((TABLED if s.lookup.from_table else DRAFTED, True))
            s.stats.table_drafted += s.lookup.from_table
            guess, length = s.lookup.match(s.tokens, s.inflight)
        s.stats.early_emitted += len(drafts)
        s.stats.lookup_emitted += len(drafts)
        s.stats.drafted += len(drafts)
        # nothing early after drafts; a head's guess needs a match of at least ``lookup`` tokens in the
        # sequence itself (the table's matches were never measured as guesses)
        if guess is None or drafts or length < self.lookup or not s.max_inflight or s.lookup.from_table:
            guess = -1
        return StepRequest(s.seq, s.epoch, pos, tokens + tuple(drafts), mode, s.sampling, guess, len(drafts))

    def _mode(self, s: Sequence) -> str | None:
        """The early-exit mode of ``s``'s next item: its own, or off while the pipeline is full."""
        if self.early_exit_below is None or s.early_exit == "off":
            return s.early_exit
        running = sum(1 for q in self.sequences.values() if q.state not in (SeqState.FINISHED, SeqState.ERROR))
        return "off" if running >= self.early_exit_below else s.early_exit

    def _maybe_finish(self, s: Sequence) -> bool:
        reason = s.stop_checker.push(s.tokens[-1:])
        if reason is None:
            return False
        s.state = SeqState.FINISHED
        s.finish_reason = reason
        _drop_inflight(s)
        self._actions.append(SequenceFinished(s.seq, reason))
        return True


def gets_guesses(lookup: int, sampling: SamplingParams | None) -> bool:
    """Whether a sequence with early exit gets the context lookup's guesses: with the lookup on,
    greedy only (temperature 0 alone is greedy; penalties and log probabilities are not)."""
    return lookup > 0 and (sampling is None or sampling.plain_greedy)


def gets_drafts(draft: int, lookup: int, sampling: SamplingParams | None) -> bool:
    """Whether a sequence with early exit gets the context lookup's drafts: where they are on,
    for the same sequences as its guesses."""
    return draft > 0 and gets_guesses(lookup, sampling)


def _room(s: Sequence) -> bool:
    """Whether one more unverified token of ``s`` could still be output (the length limit)."""
    return len(s.tokens) - s.prompt_len + len(s.inflight) < s.criteria.max_new_tokens


def _drop_inflight(s: Sequence) -> None:
    s.inflight.clear()
    s.inflight_from.clear()


def _count(counter: dict[int, int], key: int) -> None:
    counter[key] = counter.get(key, 0) + 1
