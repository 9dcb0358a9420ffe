"""DistributedRunner: one Stage per rank, the Coordinator on rank 0 next to stage 0.

A thin shell around the state machines, like vLLM's worker loop: it moves
events and makes no decoding decision. Each rank runs the same loop, one stage
output at a time:

1. take in everything that has arrived — control messages first, then the
   data plane's completed receives — and hand it to ``stage.receive`` (on
   rank 0: predictions to ``coord.receive``, then the coordinator's commands to
   stage 0 and, for ``Rollback`` / ``SequenceFinished``, out to every rank);
2. call ``stage.next_action()`` once (timed: ``busy_s``);
3. ship what it returned at once: ``Activations`` to the next rank over p2p,
   ``FinalPrediction`` / ``EarlyPrediction`` from any stage to the coordinator.

Draining before every ``next_action()`` matters: a stage runs deferred work
only when it has nothing fresh, so it must see fresh work as soon as it exists.
``(seq, epoch)`` on every event makes the order in which the two planes
deliver irrelevant (DESIGN.md, Transport).

When its stage has nothing to do a rank sleeps in ``zmq.poll`` on the control
socket and the data plane's wake-up pipe together (p2p.py's receive thread
writes to it), so neither plane's input waits for the other's timeout.

Predictions for a sequence that an earlier ``run()`` finished are stale work
still draining from the pipeline and are dropped here; anything else goes to
the Coordinator, which owns the rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..coordinator import Coordinator
from ..events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
    Verified,
)
from ..stage import Stage
from ..transport import Transport, TransportError
from ..transport.control import decode_event, encode_event

_PREDICTIONS = (FinalPrediction, EarlyPrediction)


@dataclass
class RemoteStage:
    """Rank 0's view of the stage on another rank: its layers, its exit heads, the policy to relay.

    ``Engine.generate`` sets ``policy`` on every stage it holds; for a remote
    stage the runner carries the new value over before the run starts.
    """

    index: int
    start: int
    end: int
    heads: tuple[int, ...] | None  # head layers loaded there, None without heads
    policy: str = "off"


class DistributedRunner:
    def __init__(self, stage: Stage, transport: Transport):
        if stage.index != transport.rank:
            raise ValueError(f"rank {transport.rank} was given stage {stage.index}; rank i runs stage i")
        self.stage = stage
        self.t = transport
        self.rank, self.world_size = transport.rank, transport.world_size
        self.timeout_s = transport.data.timeout_s
        # Seconds inside stage.next_action(), per stage. Rank 0 holds every stage's
        # (the others' refreshed at the end of each run); other ranks hold their own.
        self.busy_s = [0.0] * self.world_size
        self._retired: set[int] = set()  # sequences of earlier runs: their predictions are stale
        self._shutdown = False
        self._round = 0
        # Rank 0: every stage, remote ones as RemoteStage (what Engine needs of a stage).
        self.stages: list = [stage]
        self._relayed: dict[int, str] = {}
        if self.rank == 0 and self.world_size > 1:
            info = self._collect("stage", range(1, self.world_size))
            for r in range(1, self.world_size):
                heads = info[r]["heads"]
                self.stages.append(RemoteStage(r, info[r]["start"], info[r]["end"], tuple(heads) if heads else None))
                self._relayed[r] = info[r]["policy"]
                self.stages[r].policy = info[r]["policy"]
        elif self.rank > 0:
            heads = list(stage.heads.layers) if stage.heads is not None else None
            info = {"start": stage.start, "end": stage.end, "heads": heads, "policy": stage.policy}
            self.t.control.send("stage", info)

    def _next_output(self):
        t0 = time.perf_counter()
        out = self.stage.next_action()
        self.busy_s[self.rank] += time.perf_counter() - t0
        return out

    # --- rank 0 -------------------------------------------------------------------------

    def run(self, coord: Coordinator, on_verified: Callable[[Verified], None] | None = None) -> None:
        """Drive ``coord`` and every rank's stage until each sequence of ``coord`` has finished."""
        if self.rank != 0:
            raise RuntimeError(f"run() drives the coordinator, which lives on rank 0, not rank {self.rank}")
        if self._shutdown:
            raise RuntimeError("the pipeline was shut down; start a new job")
        self._relay_policies()
        seqs = set(coord.sequences)
        last_progress = time.monotonic()
        try:
            while True:
                if self._take_predictions(coord, 0.0):
                    last_progress = time.monotonic()
                if self._dispatch(coord, on_verified) is DONE:
                    break
                out = self._next_output()
                if out is not WAITING and out is not DONE:
                    last_progress = time.monotonic()
                    if isinstance(out, Activations):
                        # Predictions that came in during that compute go first: a rollback they
                        # cause then reaches later stages before these (maybe stale) activations,
                        # which are dropped on arrival instead of run.
                        self._take_predictions(coord, 0.0)
                        self._dispatch(coord, on_verified)
                    self._ship_rank0(coord, out)
                    continue
                if self.t.control is None:
                    raise RuntimeError(
                        "pipeline stalled: the coordinator is waiting but stage 0 has no work "
                        "(a dropped item or a protocol bug)"
                    )
                if self._take_predictions(coord, self.t.control.heartbeat_s):
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > self.timeout_s:
                    raise TransportError(
                        f"pipeline stalled: no stage produced anything for {self.timeout_s:g} s while the "
                        "coordinator waits, yet every rank is alive (a dropped item or a protocol bug)"
                    )
        finally:
            self._retired |= seqs
        self._sync_busy()

    def _take_predictions(self, coord: Coordinator, timeout_s: float) -> bool:
        if self.t.control is None:
            return False
        got = False
        for sender, kind, body in self.t.control.recv(timeout_s):
            if kind != "ev":
                continue  # a late `synced`
            event = decode_event(body)
            if not isinstance(event, _PREDICTIONS):
                raise TransportError(f"rank {sender} sent {type(event).__name__}, which only rank 0 sends")
            if event.seq not in self._retired:
                coord.receive(event)
                got = True
        return got

    def _dispatch(self, coord: Coordinator, on_verified):
        """Carry out the coordinator's commands; return its sentinel."""
        action = coord.next_action()
        while action is not WAITING and action is not DONE:
            if isinstance(action, StepRequest):
                self.stage.receive(action)
            elif isinstance(action, (Rollback, SequenceFinished)):
                self.stage.receive(action)
                if self.t.control is not None:
                    self.t.control.broadcast("ev", encode_event(action))
            elif isinstance(action, Verified):
                if on_verified is not None:
                    on_verified(action)
            else:
                raise TypeError(f"coordinator produced an unexpected {type(action).__name__}")
            action = coord.next_action()
        return action

    def _ship_rank0(self, coord: Coordinator, out) -> None:
        if isinstance(out, Activations) and self.world_size > 1:
            self.t.data.send(out)
        elif isinstance(out, _PREDICTIONS):
            coord.receive(out)
        else:
            raise TypeError(f"stage 0 produced an unexpected {type(out).__name__}")

    def _relay_policies(self) -> None:
        """Carry each remote stage's ``policy`` (set by ``Engine.generate``) to its rank."""
        changed = {s.index: s.policy for s in self.stages[1:] if s.policy != self._relayed.get(s.index)}
        if not changed:
            return
        self._round += 1
        for r, policy in changed.items():
            self.t.control.send(r, "policy", [self._round, policy])
        self._collect("policy_ok", changed)
        self._relayed.update(changed)

    def _sync_busy(self) -> None:
        """Collect every rank's busy seconds (one round trip at the end of a run)."""
        if self.t.control is None:
            return
        self._round += 1
        self.t.control.broadcast("sync", self._round)
        for r, busy in self._collect("synced", range(1, self.world_size)).items():
            self.busy_s[r] = float(busy)

    def _collect(self, kind: str, ranks) -> dict[int, object]:
        """Rank 0: wait for one ``kind`` reply from each of ``ranks`` (``[round, value]`` for rounds)."""
        waiting, got = set(ranks), {}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            for sender, k, body in self.t.control.recv(0.05):
                if k != kind:
                    continue  # stale predictions of finished sequences
                if kind != "stage":
                    round_, body = body
                    if round_ != self._round:
                        continue
                got[sender] = body
                waiting.discard(sender)
            if waiting and time.monotonic() > deadline:
                raise TransportError(f"ranks {sorted(waiting)} did not answer `{kind}` within {self.timeout_s:g} s")
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
            control.recv(0.05)
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
            else:
                self._ship(out)
        self.t.data.send_stop()
        self.t.data.flush(self.timeout_s)
        self.t.control.send("bye")

    def _take_input(self) -> bool:
        """Hand every message that has arrived to the stage; True if there was any."""
        control, got = self.t.control, False
        for kind, body in control.recv(0.0):
            got = True
            if kind == "sync":
                control.send("synced", [body, self.busy_s[self.rank]])
            elif kind == "policy":
                self.stage.policy = body[1]
                control.send("policy_ok", [body[0], body[1]])
            elif kind == "ev":
                event = decode_event(body)
                if not self._shutdown:  # a stopped stage takes nothing more
                    self._shutdown = isinstance(event, Shutdown)
                    self.stage.receive(event)
            else:
                raise TransportError(f"rank {self.rank}: unexpected control message `{kind}` from rank 0")
        for act in self.t.data.poll():
            got = True
            if not self._shutdown:
                self.stage.receive(act)
        self.t.data.reap()
        return got

    def _wait_for_input(self) -> None:
        """Sleep until the control socket or the data plane has input (or a heartbeat is due)."""
        fd = None if self.t.data.stopped else self.t.data.fileno()
        self.t.control.wait(self.t.control.heartbeat_s, fd)

    def _ship(self, out) -> None:
        if isinstance(out, Activations) and self.t.data.next_rank is not None:
            self.t.data.send(out)
        elif isinstance(out, _PREDICTIONS):
            self.t.control.send("ev", encode_event(out))
        else:
            raise TypeError(f"stage {self.rank} produced an unexpected {type(out).__name__}")
