"""DistributedRunner: one Stage per rank, the Coordinator on rank 0 next to stage 0.

A thin shell around the state machines, like vLLM's worker loop: it moves
events and makes no decoding decision. Each rank runs the same loop, one stage
output at a time:

1. take in everything that has arrived — control messages first, then the
   data plane's completed receives — and hand it to ``stage.receive`` (on
   rank 0: predictions to ``coord.receive``, then the coordinator's commands
   through the ``ActionRouter`` every runner shares: to stage 0 and, for
   ``Rollback`` / ``SequenceFinished``, out to every rank);
2. call ``stage.next_action()`` once (timed: ``busy_s``; the pulse thread
   reports how long the step has run, so a long one is not taken for a hang);
3. take in what arrived during that step, then ship the output: ``Activations``
   to the next rank over p2p — unless the step's own rollback or end made them
   stale (``stage.is_stale``): those are dropped here, not sent to be dropped —
   and ``FinalPrediction`` / ``EarlyPrediction`` from any stage to the coordinator.

Draining before every ``next_action()`` matters: a stage runs deferred work
only when it has nothing fresh, so it must see fresh work as soon as it exists.
``(seq, epoch)`` on every event makes the order in which the two planes
deliver irrelevant (docs/design.md, Runners and transports). A sequence's early-exit mode rides
on its items, so nothing is relayed between generations.

Tracing (``trace=True`` on every rank): each rank records into its own
``TraceRecorder`` (runtime/trace.py), its clock moved onto rank 0's by an
offset measured at start-up, NTP-style over the control plane (``clock``
pings; the shortest of 16 round trips, so the error is at most half of it:
``clock_rtt_ns``). A rank hands its events to rank 0 with each ``released``
answer, as it does its stage's counters, so rank 0 holds the whole trace when
a run returns.

When its stage has nothing to do a rank sleeps in ``zmq.poll`` on the control
socket and the data plane's wake-up pipe together (p2p.py's receive thread
writes to it), so neither plane's input waits for the other's timeout.

Slots are released explicitly. Every rank answers a ``SequenceFinished`` with
``released`` once its stage has freed the slot, and ``run()`` returns only when
every rank has released every sequence of the run — also when the run failed
(an exception or an interrupt: the router ends every sequence first). Control
messages from one rank arrive in order, so after its ``released`` no
prediction of that sequence can follow: nothing of an earlier run is left
to filter out of the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..coordinator import Coordinator
from ..events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    ProtocolError,
    SequenceFinished,
    Shutdown,
    Verified,
)
from ..stage import Stage
from ..stage_stats import StageStats
from ..trace import TraceRecorder
from ..transport import Transport, TransportError
from ..transport.control import decode_event, encode_event
from .routing import ActionRouter

_PREDICTIONS = (FinalPrediction, EarlyPrediction)
log = logging.getLogger("adadecode.runner")


@dataclass
class RemoteStage:
    """Rank 0's view of the stage on another rank: its layers and its exit heads."""

    index: int
    start: int
    end: int
    heads: tuple[int, ...] | None  # head layers loaded there, None without heads
    stats: StageStats = field(default_factory=StageStats)  # as of the rank's last `released` answer
    clock_rtt_ns: int = 0  # its clock measurement's round trip, tracing: its events' error is at most half


class DistributedRunner:
    def __init__(self, stage: Stage, transport: Transport, step_timeout_s: float = 600.0, trace: bool = False):
        """``step_timeout_s``: one stage step longer than this is a hang (a wedged kernel or
        collective); shorter ones are computing, however long, since heartbeats have a thread.
        ``trace``: record a trace (on every rank alike)."""
        if stage.index != transport.rank:
            raise ValueError(f"rank {transport.rank} was given stage {stage.index}; rank i runs stage i")
        self.stage = stage
        self.t = transport
        self.rank, self.world_size = transport.rank, transport.world_size
        self.timeout_s = transport.data.timeout_s
        self.step_timeout_s = step_timeout_s
        # Seconds inside stage.next_action(), per stage. Rank 0 holds every stage's (the
        # others' from their `released` answers); other ranks hold their own.
        self.busy_s = [0.0] * self.world_size
        self.unsent = 0  # activations made stale by their own step's rollback, dropped before sending
        self.router = ActionRouter(stage.receive, self._to_every_stage)
        self.trace = TraceRecorder(time.perf_counter_ns) if trace else None
        self.clock_rtt_ns = 0  # round trip of the clock measurement (ranks > 0, tracing)
        stage.trace = self.router.trace = self.trace
        # seq -> ranks that have not confirmed freeing its slot (rank 0's own stage frees at once)
        self._unreleased: dict[int, set[int]] = {}
        self._broken: str | None = None  # why the ranks' slots are in doubt: no further run
        self._warned_at: dict[int, float] = {}
        self._shutdown = False
        # Rank 0: every stage, remote ones as RemoteStage (what Engine needs of a stage).
        self.stages: list = [stage]
        if self.rank == 0 and self.world_size > 1:
            info = self._collect_stage_info()
            for r in range(1, self.world_size):
                heads = info[r]["heads"]
                self.stages.append(RemoteStage(
                    r, info[r]["start"], info[r]["end"], tuple(heads) if heads else None,
                    clock_rtt_ns=info[r].get("clock_rtt_ns", 0),
                ))
        elif self.rank > 0:
            if self.trace is not None:
                self._sync_clock()
            heads = list(stage.heads.layers) if stage.heads is not None else None
            self.t.control.send(
                "stage", {"start": stage.start, "end": stage.end, "heads": heads, "clock_rtt_ns": self.clock_rtt_ns}
            )

    def _next_output(self):
        control = self.t.control
        if control is not None:
            control.busy_since = time.monotonic()
        t0 = time.perf_counter()
        try:
            return self.stage.next_action()
        finally:
            self.busy_s[self.rank] += time.perf_counter() - t0
            if control is not None:
                control.busy_since = None

    # --- rank 0 -------------------------------------------------------------------------

    def run(self, coord: Coordinator, on_verified: Callable[[Verified], None] | None = None, feed=None) -> None:
        """Drive ``coord`` and every rank's stage until each sequence of ``coord`` has finished
        (with a ``feed``, runtime/serving.py: until the feed says stop, taking in new sequences).

        Returns once every rank has freed the slot of every sequence of ``coord``. On any
        failure the sequences are ended and their slots freed everywhere before the error
        goes on; should that fail too (a rank is gone), later runs are refused.
        """
        if self.rank != 0:
            raise RuntimeError(f"run() drives the coordinator, which lives on rank 0, not rank {self.rank}")
        if self._shutdown:
            raise RuntimeError("the pipeline was shut down; start a new job")
        if self._broken is not None:
            raise TransportError(f"the pipeline cannot run again: {self._broken}; start a new job")
        self._unreleased = {}  # filled as SequenceFinished goes out to the ranks
        try:
            self._drive(coord, on_verified, feed)
        except BaseException as exc:
            self._abandon(coord, exc)
            raise
        try:
            self._await_releases()
        except BaseException as e:
            self._broken = f"the cache slots of the last run may still be taken ({type(e).__name__}: {e})"
            raise

    def released(self, seq: int) -> bool:
        """Whether every rank has confirmed freeing ``seq``'s slot (its ``released`` answer)."""
        return not self._unreleased.get(seq)

    def _drive(self, coord: Coordinator, on_verified, feed) -> None:
        last_progress = time.monotonic()
        while True:
            if self._take_control(coord, 0.0):
                last_progress = time.monotonic()
            if feed is not None:
                feed.admit(coord)
            if self.router.pump(coord, on_verified) is DONE:
                if feed is None:
                    return
                # idle: wait for work, but come back soon while releases are still due
                pending = any(self._unreleased.values())
                wait_s = 0.01 if pending else (self.t.control.heartbeat_s if self.t.control else 0.1)
                if not feed.wait(wait_s):
                    return
                last_progress = time.monotonic()
                continue
            out = self._next_output()
            if out is not WAITING and out is not DONE:
                last_progress = time.monotonic()
                if isinstance(out, Activations):
                    # Predictions that came in during that compute go first: a rollback they
                    # cause may make these activations stale, and then they are not sent.
                    self._take_control(coord, 0.0)
                    self.router.pump(coord, on_verified)
                self._ship_rank0(coord, out)
                continue
            if self.t.control is None:
                raise ProtocolError(
                    "pipeline stalled: the coordinator is waiting but stage 0 has no work "
                    "(a dropped item or a protocol bug)"
                )
            t0 = self.trace.clock() if self.trace is not None else 0
            got = self._take_control(coord, self.t.control.heartbeat_s)
            if self.trace is not None:
                self.trace.span("wait", self.rank, t0)
            if got or self._computing():
                last_progress = time.monotonic()  # a rank inside a long step is progress, not a stall
            elif time.monotonic() - last_progress > self.timeout_s:
                raise ProtocolError(
                    f"pipeline stalled: no stage produced anything for {self.timeout_s:g} s while the "
                    "coordinator waits, no rank is computing, yet every rank is alive "
                    "(a dropped item or a protocol bug)"
                )

    def _computing(self) -> bool:
        """Whether another rank is inside a stage step (its pulse says so); a long one is logged,
        one past ``step_timeout_s`` is a hang."""
        now, computing = time.monotonic(), False
        for r in range(1, self.world_size):
            seconds = self.t.control.busy_for(r)
            computing |= seconds > 0
            if seconds > self.step_timeout_s:
                raise TransportError(
                    f"{self.t.control.describe(r)} has been inside one stage step for {seconds:.0f} s, past "
                    f"transport.step_timeout_s = {self.step_timeout_s:g} s: it hangs (raise the limit for "
                    "very long prompts on slow hardware)"
                )
            if seconds > self.timeout_s and now - self._warned_at.get(r, float("-inf")) > self.timeout_s:
                log.warning("rank %d has been inside one stage step for %.0f s; still waiting", r, seconds)
                self._warned_at[r] = now
        return computing

    def _take_control(self, coord: Coordinator | None, timeout_s: float) -> bool:
        """Hand arrived predictions to ``coord`` and note releases; True if a prediction came.

        Without ``coord`` (waiting for releases after the run), predictions of the run's
        sequences are work still draining and are dropped.
        """
        if self.t.control is None:
            return False
        got = False
        for sender, kind, body in self.t.control.recv(timeout_s):
            if kind == "released":
                seq, busy, *extra = body  # [seq, busy seconds, stage counters, trace events or None]
                self.busy_s[sender] = float(busy)
                if extra:
                    self.stages[sender].stats = StageStats.from_dict(extra[0])
                    if extra[1] and self.trace is not None:
                        self.trace.merge(extra[1])
                self._unreleased.get(seq, set()).discard(sender)  # a second answer is harmless
                continue
            if kind != "ev":
                raise TransportError(f"rank {sender} sent an unexpected `{kind}` control message")
            event = decode_event(body)
            if not isinstance(event, _PREDICTIONS):
                raise TransportError(f"rank {sender} sent {type(event).__name__}, which only rank 0 sends")
            if coord is not None:
                self.router.predict(coord, event)
                got = True
            elif event.seq not in self._unreleased:
                raise ProtocolError(f"rank {sender} sent {event} for sequence {event.seq}, which is not running")
        return got

    def _to_every_stage(self, event) -> None:
        self.stage.receive(event)
        if self.t.control is not None:
            if isinstance(event, SequenceFinished):  # each rank must confirm freeing the slot
                self._unreleased[event.seq] = set(range(1, self.world_size))
            self.t.control.broadcast("ev", encode_event(event))

    def _ship_rank0(self, coord: Coordinator, out) -> None:
        if isinstance(out, Activations):
            if self.world_size == 1:
                raise ProtocolError("stage 0 of a one-stage pipeline produced activations")
            if self.stage.is_stale(out):
                self.unsent += 1
            else:
                self._send(out)
        elif isinstance(out, _PREDICTIONS):
            self.router.predict(coord, out)
        else:
            raise TypeError(f"stage 0 produced an unexpected {type(out).__name__}")

    def _await_releases(self) -> None:
        """Wait until every rank has freed the slot of every sequence of the run."""
        deadline = time.monotonic() + self.timeout_s
        while any(self._unreleased.values()):
            if time.monotonic() > deadline:
                waiting = {seq: sorted(ranks) for seq, ranks in self._unreleased.items() if ranks}
                raise TransportError(
                    f"ranks did not confirm freeing the cache slots of sequences {waiting} "
                    f"(sequence: ranks) within {self.timeout_s:g} s (transport.timeout_s)"
                )
            self._take_control(None, 0.05)
        self._unreleased = {}

    def _abandon(self, coord: Coordinator, exc: BaseException) -> None:
        """After ``exc``: end every sequence and free its slot on every rank (best effort)."""
        self.router.release(coord, exc)
        if self.t.control is None:
            return
        if isinstance(exc, TransportError):  # a rank is gone or broke the protocol: no answer will come
            self._broken = f"a rank was lost ({exc})"
            return
        try:
            self._await_releases()
        except BaseException as e:  # noqa: BLE001 - the original error is the one to report
            self._broken = f"the cache slots of a failed run may still be taken ({type(e).__name__}: {e})"
            exc.add_note(f"freeing the cache slots of the failed run failed too: {type(e).__name__}: {e}")

    def _collect_stage_info(self) -> dict[int, dict]:
        """Rank 0: each rank's layers and heads (its first message)."""
        waiting, got = set(range(1, self.world_size)), {}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            for sender, kind, body in self.t.control.recv(0.05):
                if kind == "clock":  # a tracing rank measures its clock against ours: answer at once
                    self.t.control.send(sender, "clock", [body, time.perf_counter_ns()])
                    continue
                if kind != "stage":
                    raise TransportError(f"rank {sender} sent `{kind}` before describing its stage")
                got[sender] = body
                waiting.discard(sender)
            if waiting and time.monotonic() > deadline:
                raise TransportError(
                    f"ranks {sorted(waiting)} did not describe their stage within {self.timeout_s:g} s"
                )
        return got

    def close(self) -> None:
        """Rank 0: stop every stage and wait for each rank's goodbye (orderly shutdown)."""
        if self.rank != 0 or self._shutdown:
            return
        self._shutdown = True
        self.stage.receive(Shutdown())
        while self.stage.next_action() is not DONE:
            pass  # outputs queued before the shutdown are moot
        control = self.t.control
        if control is None:
            return
        control.broadcast("ev", encode_event(Shutdown()))
        self.t.data.send_stop()
        deadline = time.monotonic() + self.timeout_s
        while len(control.said_bye) < self.world_size - 1:
            control.recv(0.05)  # late `released` answers of a failed run are moot now
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.world_size)) - control.said_bye)
                raise TransportError(f"ranks {missing} did not confirm the shutdown within {self.timeout_s:g} s")
        self.t.data.flush(self.timeout_s)

    # --- ranks 1.. ------------------------------------------------------------------------

    def serve(self) -> None:
        """Ranks other than 0: run this stage until rank 0 sends ``Shutdown``."""
        if self.rank == 0:
            raise RuntimeError("rank 0 drives the pipeline with run() and close(), not serve()")
        while True:
            self._take_input()
            out = self._next_output()
            if out is DONE:
                break
            if out is WAITING:
                self._wait_for_input()
                continue
            if isinstance(out, Activations):
                self._take_input()  # a Rollback or SequenceFinished that came during the step goes first
                if self.stage.is_stale(out):
                    self.unsent += 1
                    continue
            self._ship(out)
        self.t.data.send_stop()
        self.t.data.flush(self.timeout_s)
        self.t.control.send("bye")

    def _take_input(self) -> bool:
        """Hand every message that has arrived to the stage; True if there was any."""
        control, got = self.t.control, False
        for kind, body in control.recv(0.0):
            got = True
            if kind != "ev":
                raise TransportError(f"rank {self.rank}: unexpected control message `{kind}` from rank 0")
            event = decode_event(body)
            if self._shutdown:
                continue  # a stopped stage takes nothing more
            self._shutdown = isinstance(event, Shutdown)
            self.stage.receive(event)
            if isinstance(event, SequenceFinished):  # the slot is free now: say so, with the counters
                events = self.trace.drain() if self.trace is not None else None
                control.send("released", [event.seq, self.busy_s[self.rank], self.stage.stats.as_dict(), events])
        for act in self.t.data.poll():
            got = True
            if self.trace is not None:
                self.trace.record("recv", self.rank, act.seq, act.epoch, act.pos, act.layer, act.hidden.shape[0])
            if not self._shutdown:
                self.stage.receive(act)
        self.t.data.reap()
        return got

    def _wait_for_input(self) -> None:
        """Sleep until the control socket or the data plane has input (or a heartbeat is due)."""
        fd = None if self.t.data.stopped else self.t.data.fileno()
        t0 = self.trace.clock() if self.trace is not None else 0
        self.t.control.wait(self.t.control.heartbeat_s, fd)
        if self.trace is not None:
            self.trace.span("wait", self.rank, t0)

    def _sync_clock(self, rounds: int = 16) -> None:
        """This rank's clock offset to rank 0's (tracing, at start-up): rank 0 answers each ping
        with its clock at once; the round trip ``rtt`` bounds the error of ``t0 - (t1 + t2) / 2``
        by ``rtt / 2``, so the shortest of ``rounds`` is kept."""
        best = None
        deadline = time.monotonic() + self.timeout_s
        for _ in range(rounds):
            t1 = time.perf_counter_ns()
            self.t.control.send("clock", t1)
            answer = None
            while answer is None:
                if time.monotonic() > deadline:
                    raise TransportError(f"rank 0 did not answer the clock measurement within {self.timeout_s:g} s")
                for kind, body in self.t.control.recv(0.05):
                    if kind != "clock":
                        raise TransportError(f"rank {self.rank}: unexpected control message `{kind}` at start-up")
                    if body[0] == t1:
                        answer = body[1]
            t2 = time.perf_counter_ns()
            if best is None or t2 - t1 < best[0]:
                best = (t2 - t1, answer - (t1 + t2) // 2)
        self.clock_rtt_ns, self.trace.offset_ns = best

    def _send(self, act: Activations) -> None:
        if self.trace is not None:
            self.trace.record("send", self.rank, act.seq, act.epoch, act.pos, act.layer, act.hidden.shape[0])
        self.t.data.send(act)

    def _ship(self, out) -> None:
        if isinstance(out, Activations) and self.t.data.next_rank is not None:
            self._send(out)
        elif isinstance(out, _PREDICTIONS):
            self.t.control.send("ev", encode_event(out))
        else:
            raise TypeError(f"stage {self.rank} produced an unexpected {type(out).__name__}")
