"""Serving: many sequences in flight through one pipeline, fed by other threads.

A ``ServingLoop`` owns one long-lived Coordinator and drives the engine's runner
in a thread of its own (the runner's ``feed``): between ticks it takes in
submitted requests, up to ``max_num_seqs`` sequences holding a cache slot, and
cancellations. Everything else is the runtime as it is: the Coordinator keys
everything by sequence, so verification and rollback stay the one
implementation, and a sequence's slot is freed on every stage when it finishes.

Other threads (an HTTP server, tests) talk to it through three calls, safe to
make from any thread:

- ``submit(request, on_event)`` queues a request (``QueueFull`` past
  ``max_queue``; ``RequestTooLong`` when prompt plus ``max_new_tokens`` cannot
  fit the cache) and returns its id. ``on_event`` is then called, on the loop's
  thread, with a ``TextDelta`` per verified token (its text may be empty: stop
  strings are held back until they cannot match, and a token may end inside a
  character) and one ``Finished`` at the end, whatever
  the end: eos, stop, length, cancelled, or failed (with the error's message).
  It must return quickly (hand the event to another thread). A request whose
  ``sampling`` asks for log probabilities gets them on each ``TextDelta``
  (``logprobs``, one per token; the prompt's, ``prompt_logprobs``, on the first);
  ``max_new_tokens`` 0 with ``prompt_logprobs`` runs the prefill only: one
  ``TextDelta`` with the prompt's log probabilities and no token, then
  ``Finished("length")`` (the token the prefill's last position predicts is
  not output).
- ``cancel(id)``: a client went away. The sequence ends, its slot is freed on
  every stage and its in-flight work is dropped.
- ``metrics()``: a snapshot of counters and gauges for /metrics and /health.

When the runner fails, every request in flight gets ``Finished("failed")`` and
its slot is freed (the runner's own cleanup). A failure that leaves the
pipeline usable (a bug in one sequence, in-process) restarts the loop with a
new Coordinator; a lost rank ends serving (``error`` says why; ``healthy`` is
False) and later submissions raise ``ServingStopped``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .coordinator import Coordinator, SeqState
from .detokenize import TextStream
from .events import Verified
from .params import RequestTooLong, SamplingParams, check_request  # noqa: F401 - RequestTooLong: submit's error
from .sampling import TokenLogprobs
from .stopping import StopCriteria

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("adadecode.serving")


class QueueFull(RuntimeError):
    """The request queue is full (serve.max_queue): try again later."""


class ServingStopped(RuntimeError):
    """The serving loop has stopped (shut down, or a rank was lost)."""


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]  # token ids (chat templates are applied before)
    max_new_tokens: int  # 0: the prompt's log probabilities only (sampling.prompt_logprobs), no output
    stop: tuple[str, ...] = ()
    early_exit: str = "off"
    sampling: SamplingParams | None = None  # None or temperature 0: greedy
    min_tokens: int = 0  # EOS and stop strings do not end it before this many tokens (StopCriteria)
    ignore_eos: bool = False  # EOS is an ordinary token: it runs to a stop string or max_new_tokens


@dataclass(frozen=True)
class TextDelta:
    id: int
    text: str
    tokens: tuple[int, ...]  # the verified tokens behind it (text may lag them)
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token, when the request's sampling asks
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # the prompt's tokens 1 .., on the first delta, when asked


@dataclass(frozen=True)
class Finished:
    id: int
    reason: str  # eos, stop, length, cancelled, failed
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # held-back text released at the end
    error: str | None = None  # with reason "failed"


@dataclass
class _Active:
    rid: int
    request: Request
    on_event: Callable[[object], None]
    stream: TextStream
    pending: list[str]  # text the stream released, not yet handed out
    completion_tokens: int = 0


@dataclass
class Counters:
    requests_finished: dict[str, int] = field(default_factory=dict)  # by reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    early_emitted: dict[int, int] = field(default_factory=dict)  # head layer -> early tokens
    early_accepted: dict[int, int] = field(default_factory=dict)
    early_rejected: dict[int, int] = field(default_factory=dict)
    lookup_emitted: int = 0  # early tokens that were the context lookup's guesses (in no head's counts)
    lookup_accepted: int = 0


class ServingLoop:
    def __init__(self, engine: Engine, *, max_num_seqs: int | None = None, max_queue: int = 64,
                 early_exit_below: int | None = None):
        """``engine``: an ``Engine`` (or rank 0's ``PipelineEngine``) whose stages have at least
        ``max_num_seqs`` cache slots (``LoadSpec.num_slots``). ``early_exit_below``: requests'
        early exit applies only while fewer sequences run (``Coordinator``); None: always."""
        self.early_exit_below = early_exit_below
        slots = engine.num_slots
        self.engine = engine
        self.max_num_seqs = slots if max_num_seqs is None else max_num_seqs
        if not 1 <= self.max_num_seqs <= slots:
            raise ValueError(f"max_num_seqs {self.max_num_seqs} needs 1..{slots} cache slots per stage")
        self.max_queue = max_queue
        self.counters = Counters()
        self.error: str | None = None
        self._lock = threading.Condition()
        self._queue: deque[tuple[int, Request, Callable]] = deque()
        self._cancelled: set[int] = set()
        # Requests get ids at submission; sequences get the engine's ids at admission, so the
        # stages see gapless ids (their finished sets stay small) and no id is used twice.
        self._active: dict[int, _Active] = {}  # seq -> admitted request, not yet reported finished
        self._seq_of: dict[int, int] = {}  # rid -> seq, while admitted
        self._finishing: set[int] = set()  # finished seqs whose slots are not yet freed everywhere
        self._next_id = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self._coord: Coordinator | None = None

    # --- any thread -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._running and self.error is None

    def start(self) -> ServingLoop:
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="adadecode-serving", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel everything, end the loop and wait for its thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, request: Request, on_event: Callable[[object], None]) -> int:
        """Queue ``request``; return its id. Raises ``ValueError`` / ``RequestTooLong`` for a bad
        request, ``QueueFull`` when the queue is full, ``ServingStopped`` when not serving."""
        self._check(request)
        with self._lock:
            if not self.healthy:
                raise ServingStopped(self.error or "the server is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (serve.max_queue); try again later")
            rid = self._next_id
            self._next_id += 1
            self._queue.append((rid, request, on_event))
            self._lock.notify_all()
        return rid

    def cancel(self, rid: int) -> None:
        with self._lock:
            self._cancelled.add(rid)
            self._lock.notify_all()

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot (a length read: no lock needed for a bound check)."""
        return len(self._queue)

    def metrics(self) -> dict:
        """Gauges and counters, for /metrics and /health (a consistent snapshot)."""
        runner = self.engine.runner
        with self._lock:
            return {
                "num_requests_running": len(self._active),
                "num_requests_waiting": len(self._queue),
                "free_slots": self.max_num_seqs - len(self._active) - len(self._finishing),
                "max_num_seqs": self.max_num_seqs,
                "requests_finished": dict(self.counters.requests_finished),
                "prompt_tokens_total": self.counters.prompt_tokens,
                "generation_tokens_total": self.counters.generation_tokens,
                "early_emitted": dict(self.counters.early_emitted),
                "early_accepted": dict(self.counters.early_accepted),
                "early_rejected": dict(self.counters.early_rejected),
                "lookup_emitted": self.counters.lookup_emitted,
                "lookup_accepted": self.counters.lookup_accepted,
                "stage_busy_seconds": list(runner.busy_s),
                "healthy": self.healthy,
                "error": self.error,
            }

    def _check(self, request: Request) -> None:
        # refused here, on the caller's thread, not by the Coordinator on the loop's, where it would fail every request
        e = self.engine
        if request.max_new_tokens == 0 and (request.sampling is None or request.sampling.prompt_logprobs is None):
            raise ValueError("max_tokens must be >= 1, got 0 (0 is for the prompt's log probabilities alone: "
                             "send it with echo and logprobs)")
        mode = e.early_exit_for(request.early_exit, request.sampling)
        check_request(len(request.prompt), max(request.max_new_tokens, 1), mode, request.sampling,
                      max_seq_len=e.max_seq_len, heads_loaded=e.starts_early(request.sampling),
                      tokens_name="max_tokens", model="this server")
        if not 0 <= request.min_tokens <= request.max_new_tokens:
            raise ValueError(f"min_tokens ({request.min_tokens}) must be in [0, max_tokens = {request.max_new_tokens}]")

    # --- the loop's thread: the runner's feed ------------------------------------------------------

    def _serve(self) -> None:
        while self._running:
            self._coord = Coordinator(max_inflight=self.engine.max_inflight, early_exit_below=self.early_exit_below,
                                      lookup=self.engine.lookup, draft=self.engine.draft,
                                      table=self.engine.table)
            try:
                self.engine.runner.run(self._coord, on_verified=self._on_verified, feed=self)
            except BaseException as exc:
                message = f"{type(exc).__name__}: {exc}"
                log.error("serving loop failed: %s", message, exc_info=not _is_transport_error(exc))
                fatal = _is_transport_error(exc) or getattr(self.engine.runner, "_broken", None)
                if fatal:  # first, so that the queued requests fail too and new ones are refused
                    with self._lock:
                        self.error = message
                        self._running = False
                        self._lock.notify_all()
                self._fail_all(message)
                if fatal:
                    return
        self._fail_all("the server is shutting down", reason="cancelled")

    def admit(self, coord: Coordinator) -> None:
        """Between ticks: cancellations, freed slots, then new sequences up to the slot budget."""
        # Slots freed everywhere since the last call (SequenceFinished went out in the pump
        # between the calls, so ``released`` is meaningful now): forget those sequences.
        for seq in [q for q in self._finishing if self.engine.runner.released(q)]:
            self._finishing.discard(seq)
            coord.remove(seq)
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [q for q in self._queue if q[0] in cancelled]
            self._queue = deque(q for q in self._queue if q[0] not in cancelled)
            budget = self.max_num_seqs - len(self._active) - len(self._finishing)
            admitted = []
            while self._queue and budget > 0:
                admitted.append(self._queue.popleft())
                budget -= 1
        for rid, request, on_event in dropped:  # never got a slot
            _add(self.counters.requests_finished, "cancelled", 1)
            on_event(Finished(rid, "cancelled", len(request.prompt), 0))
        for rid in cancelled:
            seq = self._seq_of.get(rid)
            if seq is not None and seq in self._active:
                coord.cancel(seq, "cancelled")
                self._report_finish(coord, seq)
        e = self.engine
        for rid, request, on_event in admitted:
            criteria = StopCriteria(  # max_new_tokens 0: the prefill's one token, not output (_on_verified)
                max_new_tokens=max(request.max_new_tokens, 1), eos_token_ids=e.eos_token_ids,
                stop_strings=request.stop, decode=e._decode if request.stop else None,
                min_new_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
            )
            pending: list[str] = []
            seq = e.new_sequence_id()
            stream = TextStream(e._decode, request.stop, pending.append, min_tokens=request.min_tokens)
            self._active[seq] = _Active(rid, request, on_event, stream, pending)
            self._seq_of[rid] = seq
            mode = self.engine.early_exit_for(request.early_exit, request.sampling)
            coord.add_sequence(seq, list(request.prompt), criteria, early_exit=mode,
                              sampling=request.sampling)
            self.counters.prompt_tokens += len(request.prompt)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Idle: block until there is something to admit or cancel (or ``timeout_s``); False to stop."""
        with self._lock:
            if self._running and not self._queue and not self._cancelled:
                self._lock.wait(0.5 if timeout_s is None else timeout_s)
            return self._running

    def _on_verified(self, event: Verified) -> None:
        a = self._active.get(event.seq)
        if a is None:
            return
        if a.request.max_new_tokens == 0:  # the prompt's log probabilities only: the prefill's token is not output
            a.on_event(TextDelta(a.rid, "", (), (), event.prompt_logprobs))
            self._coord.sequences[event.seq].finish_reason = "length"
            self._report_finish(self._coord, event.seq)
            return
        a.completion_tokens += len(event.tokens)
        self.counters.generation_tokens += len(event.tokens)
        a.stream.push(event.tokens)
        text = "".join(a.pending)
        a.pending.clear()
        s = self._coord.sequences[event.seq]
        if s.state is SeqState.FINISHED and event.pos + len(event.tokens) >= len(s.tokens):  # its last token
            a.on_event(TextDelta(a.rid, text, tuple(event.tokens), event.logprobs, event.prompt_logprobs))
            self._report_finish(self._coord, event.seq)
        else:  # text may be empty: tokens still count
            a.on_event(TextDelta(a.rid, text, tuple(event.tokens), event.logprobs, event.prompt_logprobs))

    def _report_finish(self, coord: Coordinator, seq: int) -> None:
        """``seq`` has finished (its SequenceFinished is queued): report it with the text still held."""
        a = self._active.pop(seq)
        self._seq_of.pop(a.rid, None)
        s = coord.sequences[seq]
        self._finishing.add(seq)
        for layer, n in s.stats.early_by_layer.items():
            _add(self.counters.early_emitted, layer, n)
        for layer, n in s.stats.accepted_by_layer.items():
            _add(self.counters.early_accepted, layer, n)
        for layer, n in s.stats.rejected_by_layer.items():
            _add(self.counters.early_rejected, layer, n)
        self.counters.lookup_emitted += s.stats.lookup_emitted
        self.counters.lookup_accepted += s.stats.lookup_accepted
        text = ""
        if s.finish_reason != "cancelled":
            a.stream.flush()
            text = "".join(a.pending)
        _add(self.counters.requests_finished, s.finish_reason, 1)
        a.on_event(Finished(a.rid, s.finish_reason, len(a.request.prompt), a.completion_tokens, text))

    def _fail_all(self, message: str, reason: str = "failed") -> None:
        """Every admitted request ends with ``reason`` (the runner has freed their slots already)."""
        active, self._active = self._active, {}
        self._finishing.clear()
        self._seq_of.clear()
        for a in active.values():
            _add(self.counters.requests_finished, reason, 1)
            a.on_event(Finished(a.rid, reason, len(a.request.prompt), a.completion_tokens, "", message))
        if reason == "cancelled" or self.error is not None or not self._running:
            with self._lock:
                queued, self._queue = self._queue, deque()
            for rid, request, on_event in queued:
                _add(self.counters.requests_finished, reason, 1)
                on_event(Finished(rid, reason, len(request.prompt), 0, "", message))


def _add(counter: dict, key, n: int) -> None:
    counter[key] = counter.get(key, 0) + n


def _is_transport_error(exc: BaseException) -> bool:
    from .transport.errors import TransportError

    return isinstance(exc, TransportError)
