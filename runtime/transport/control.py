"""Control plane: zmq between rank 0 (coordinator and stage 0) and every other rank.

Rank 0 binds one ROUTER socket; every other rank connects one DEALER to it.
Predictions (``FinalPrediction``, ``EarlyPrediction``) travel in;
``Rollback`` / ``SequenceFinished`` / ``Shutdown`` travel out (``StepRequest``
never does: stage 0 lives on rank 0). zmq gives the any-source receive that
NCCL lacks and keeps these small messages off the tensor path. A rank answers
each ``SequenceFinished`` with ``released`` once its stage has freed the
sequence's slot: rank 0 reuses nothing before every rank has said so.

Where it binds: rank 0 binds one ephemeral port on one address only —
loopback when every rank runs on this host, otherwise the address of the
interface that routes to ``MASTER_ADDR`` (or ``transport.control_addr``). The
endpoint reaches the other ranks through the torch.distributed rendezvous,
never through a fixed port.

Which messages are kept: rank 0 draws a random 32-byte key per job and hands
it out over the process group together with the endpoint. Every message
carries an HMAC-SHA256 of its payload under that key (16 bytes), and messages
whose tag does not verify, or whose claimed sender does not match the socket
identity, are dropped and counted. The key itself never crosses zmq. (CURVE
would also encrypt, but needs a key exchange of its own and costs more per
message; nothing here is secret, only unauthenticated input must not be
obeyed.)

Liveness does not depend on compute: heartbeats go over a second socket pair
(rank 0's ``pulse`` ROUTER, one DEALER per rank), sent and received by a
thread of their own every ``heartbeat_s``, whatever the rank's loop is doing —
a stage step may take minutes (a long prefill on a slow machine). A peer whose
heartbeats stop for ``0.8 * timeout_s`` is declared hung: a stopped or wedged
process stops its pulse thread too. Each heartbeat says how long the rank has
been inside its current stage step, so rank 0 can tell a pipeline that
computes from one that stalls. A peer whose TCP connection drops without a
goodbye is declared dead at once (zmq's socket monitor reports the
disconnect). A rank that fails sends its error before closing, so rank 0 can
name the cause; rank 0 then tells every other rank to stop. The remaining
fifth of ``timeout_s`` is left for an orderly exit, so every rank is gone
within ``timeout_s``. Once a peer is lost, every later ``recv`` raises the same
error at once.

Wire format: frames ``[tag, payload]`` (rank 0 prepends the peer identity),
payload = JSON ``[sender_rank, kind, body]``; kinds: ``hello``, ``ev`` (an
event, ``[class name, *fields]``; a ``SamplingParams`` field as
``{"SamplingParams": [*fields]}``), ``stage`` (a rank's layers and heads),
``released`` (``[seq, busy seconds, stage counters, trace events or null]``: the
rank freed ``seq``'s slot), ``clock`` (a tracing rank's ping at start-up, answered
``[ping, rank 0's clock]``), ``bye``, ``err``, ``abort``; on the pulse sockets, ``hb`` (seconds inside the current
stage step, 0 when idle).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from dataclasses import fields

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..events import (
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
)
from ..sampling import SamplingParams
from .errors import JobAborted, TransportError

log = logging.getLogger("adadecode.control")

CONTROL_EVENTS = (StepRequest, Rollback, SequenceFinished, Shutdown, FinalPrediction, EarlyPrediction)
_BY_NAME = {cls.__name__: cls for cls in CONTROL_EVENTS}
TAG_BYTES = 16
SILENCE_FRACTION = 0.8  # of timeout_s; the rest is left for the orderly exit
PULSE_HWM = 4  # heartbeats queued for a peer that is not there are dropped, not hoarded


def encode_event(event) -> list:
    cls = type(event)
    if _BY_NAME.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__name__} has no control-plane encoding; add it to CONTROL_EVENTS")
    return [cls.__name__, *(_encode_value(getattr(event, f.name)) for f in fields(cls))]


def _encode_value(value):
    if isinstance(value, SamplingParams):
        return {"SamplingParams": [getattr(value, f.name) for f in fields(SamplingParams)]}
    return value


def _decode_value(value):
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        if list(value) != ["SamplingParams"] or not isinstance(value["SamplingParams"], list):
            raise TransportError(f"unknown control-plane value {value!r:.80}")
        try:
            return SamplingParams(*value["SamplingParams"])
        except (TypeError, ValueError) as e:
            raise TransportError(f"invalid sampling parameters on the control plane: {e}") from e
    return value


def decode_event(item: list):
    if not isinstance(item, list) or not item or item[0] not in _BY_NAME:
        raise TransportError(f"unknown control-plane event {item!r:.80}")
    cls = _BY_NAME[item[0]]
    return cls(*(_decode_value(v) for v in item[1:]))


def _tcp(host: str) -> str:
    return f"tcp://[{host}]" if ":" in host else f"tcp://{host}"


class _Endpoint:
    """What both ends share: signing, the socket monitor, the pulse (heartbeats), closing."""

    def __init__(self, rank: int, key: bytes, timeout_s: float):
        self.rank = rank
        self.key = key
        self.timeout_s = timeout_s
        self.heartbeat_s = min(1.0, timeout_s / 10)
        self.silence_s = SILENCE_FRACTION * timeout_s
        self.dropped = 0  # messages whose tag did not verify
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.mon: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.pulse: _Pulse | None = None
        # Set by the runner around each stage step (monotonic time); the pulse reports it.
        self.busy_since: float | None = None
        self._lost: str | None = None  # why a peer was lost: raised again by every later recv

    def _open(self, kind: int, host: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a control message for want of queue space
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        self.mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.mon, zmq.POLLIN)
        self.sock = sock
        return sock

    def _pulse_socket(self, kind: int, host: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, PULSE_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def _lose(self, reason: str) -> TransportError:
        """Remember the first peer lost; every later ``recv`` raises the same."""
        if self._lost is None:
            self._lost = reason
        return TransportError(self._lost)

    def _pack(self, kind: str, body) -> list[bytes]:
        payload = json.dumps([self.rank, kind, body], separators=(",", ":")).encode()
        return [hmac.new(self.key, payload, hashlib.sha256).digest()[:TAG_BYTES], payload]

    def _unpack(self, tag: bytes, payload: bytes):
        """``(sender, kind, body)``, or None for a message that is not from this job."""
        want = hmac.new(self.key, payload, hashlib.sha256).digest()[:TAG_BYTES]
        if not hmac.compare_digest(want, tag):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("rank %d: dropped %d control message(s) not signed by this job", self.rank, self.dropped)
            return None
        try:
            sender, kind, body = json.loads(payload)
        except ValueError:
            self.dropped += 1
            return None
        return sender, kind, body

    def wait(self, timeout_s: float, fd: int | None = None) -> None:
        """Block until a message, a monitor event or input on ``fd`` may be there, at most ``timeout_s``."""
        if fd is None:
            self.poller.poll(max(0, int(timeout_s * 1000)))
            return
        poller = zmq.Poller()
        for sock in (self.sock, self.mon):
            poller.register(sock, zmq.POLLIN)
        poller.register(fd, zmq.POLLIN)
        poller.poll(max(0, int(timeout_s * 1000)))

    def _disconnected_fds(self) -> list[int]:
        fds = []
        while self.mon is not None and self.mon.poll(0):
            event = parse_monitor_message(self.mon.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fds.append(int(event["value"]))
        return fds

    def close(self, linger_s: float = 0.0) -> None:
        """Stop the pulse, close the socket (waiting up to ``linger_s`` to flush) and the context."""
        if self.pulse is not None:
            self.pulse.stop()
            self.pulse = None
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(linger=int(linger_s * 1000))
            self.sock = None
        if self.mon is not None:
            self.mon.close(linger=0)
            self.mon = None
        self.ctx.term()


class ControlServer(_Endpoint):
    """Rank 0's end: one ROUTER, one identity per rank (and the pulse's own ROUTER)."""

    def __init__(self, world_size: int, key: bytes, host: str, timeout_s: float):
        super().__init__(0, key, timeout_s)
        self.world_size = world_size
        try:
            sock = self._open(zmq.ROUTER, host)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished rank raises instead of vanishing
            port = sock.bind_to_random_port(_tcp(host))
        except zmq.ZMQError as e:
            self.close()
            raise TransportError(f"rank 0 cannot bind the control plane on {host}: {e}; "
                                 "set --transport.control_addr to an address of this host") from e
        self.endpoint = f"{_tcp(host)}:{port}"
        pulse = self._pulse_socket(zmq.ROUTER, host)
        try:
            self.pulse_endpoint = f"{_tcp(host)}:{pulse.bind_to_random_port(_tcp(host))}"
        except zmq.ZMQError as e:
            pulse.close(linger=0)
            self.close()
            raise TransportError(f"rank 0 cannot bind the heartbeat socket on {host}: {e}") from e
        self.pulse = _Pulse(self, pulse, [b"rank%d" % r for r in range(1, world_size)])
        self.peers: dict[int, dict] = {}  # rank -> {"pid", "host"} from its hello
        self._ready_at = time.monotonic()
        self.said_bye: set[int] = set()
        self._fd_rank: dict[int, int] = {}
        self._backlog: list[tuple[int, str, object]] = []
        self._errors: dict[int, str] = {}  # rank -> the error it reported before exiting

    def describe(self, rank: int) -> str:
        p = self.peers.get(rank)
        return f"rank {rank} (pid {p['pid']} on {p['host']})" if p else f"rank {rank}"

    def wait_for_peers(self) -> None:
        """Block until every rank has said hello, or raise after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while len(self.peers) < self.world_size - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.world_size)) - set(self.peers))
                raise TransportError(
                    f"ranks {missing} did not join the control plane at {self.endpoint} within "
                    f"{self.timeout_s:g} s (transport.timeout_s)"
                )
            self._backlog += self.recv(0.1)  # messages sent right after a hello wait for the runner
        self._ready_at = time.monotonic()

    def busy_for(self, rank: int) -> float:
        """Seconds ``rank`` has been inside its current stage step, as of its last heartbeat (0: idle)."""
        return self.pulse.busy_for.get(rank, 0.0)

    def send(self, rank: int, kind: str, body=None) -> None:
        try:
            self.sock.send_multipart([b"rank%d" % rank, *self._pack(kind, body)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise TransportError(f"{self.describe(rank)} is unreachable on the control plane: {e}") from e

    def broadcast(self, kind: str, body=None) -> None:
        for r in range(1, self.world_size):
            self.send(r, kind, body)

    def recv(self, timeout_s: float = 0.0) -> list[tuple[int, str, object]]:
        """Messages that arrived (waiting up to ``timeout_s`` for the first); raises on a lost rank."""
        if self._lost is not None:
            raise TransportError(self._lost)
        if timeout_s > 0 and not self._backlog:
            self.wait(timeout_s)
        out, self._backlog = self._backlog + self._drain(), []
        gone = [self._fd_rank.get(fd) for fd in self._disconnected_fds()]
        if self._errors and not gone and self.mon.poll(100):
            gone = [self._fd_rank.get(fd) for fd in self._disconnected_fds()]  # a death behind the error?
        if gone:
            out += self._drain()  # a goodbye, or an error naming the cause, may be queued still
        # The first cause wins: a rank that died unannounced, else a rank's own error report
        # (which is often the consequence: "receiving from rank 1 failed").
        for rank in gone:
            if rank is not None and rank not in self.said_bye and rank not in self._errors:
                raise self._lose(
                    f"{self.describe(rank)} closed its control connection without saying goodbye: the process died"
                )
        if self._errors:
            rank, reason = next(iter(self._errors.items()))
            raise self._lose(f"{self.describe(rank)} failed: {reason}")
        now = time.monotonic()
        for r in self.peers:
            silent = now - max(self.pulse.last_seen.get(r, 0.0), self._ready_at)
            if r not in self.said_bye and silent > self.silence_s:
                raise self._lose(
                    f"{self.describe(r)} has sent nothing for {silent:.1f} s "
                    f"({SILENCE_FRACTION:g} x transport.timeout_s = {self.silence_s:g} s): it hangs or is unreachable"
                )
        return out

    def _drain(self) -> list[tuple[int, str, object]]:
        out = []
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            if len(frames) != 3:
                self.dropped += 1
                continue
            msg = self._unpack(frames[1].bytes, frames[2].bytes)
            if msg is None:
                continue
            sender, kind, body = msg
            if frames[0].bytes != b"rank%d" % sender or not 0 < sender < self.world_size:
                self.dropped += 1  # signed, but claims another rank's identity
                continue
            if kind == "hello":
                self.peers[sender] = {"pid": body["pid"], "host": body["host"]}
                try:  # the connection's fd, to name the rank when the monitor reports its disconnect
                    self._fd_rank[frames[0].get(zmq.SRCFD)] = sender
                except zmq.ZMQError:  # a libzmq without SRCFD: deaths are found by silence instead
                    pass
            elif kind == "bye":
                self.said_bye.add(sender)
            elif kind == "err":
                self._errors.setdefault(sender, body)
            else:
                out.append((sender, kind, body))

    def abort(self, reason: str) -> None:
        """Tell every rank still there to stop; best effort, never raises."""
        for r in range(1, self.world_size):
            if r in self.said_bye:
                continue
            try:
                self.send(r, "abort", reason)
            except TransportError:
                pass


class ControlClient(_Endpoint):
    """A non-zero rank's end: one DEALER connected to rank 0."""

    def __init__(self, rank: int, endpoint: str, key: bytes, timeout_s: float, pulse_endpoint: str):
        super().__init__(rank, key, timeout_s)
        host = endpoint.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
        sock = self._open(zmq.DEALER, host)
        sock.setsockopt(zmq.IDENTITY, b"rank%d" % rank)
        sock.connect(endpoint)
        self.endpoint = endpoint
        pulse = self._pulse_socket(zmq.DEALER, host)
        pulse.setsockopt(zmq.IDENTITY, b"rank%d" % rank)
        pulse.connect(pulse_endpoint)
        self._started = time.monotonic()
        self.pulse = _Pulse(self, pulse, None)
        self.send("hello", {"pid": os.getpid(), "host": socket.gethostname()})

    def send(self, kind: str, body=None) -> None:
        try:
            self.sock.send_multipart(self._pack(kind, body), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise TransportError(f"rank {self.rank}: sending to rank 0 failed: {e}") from e

    def recv(self, timeout_s: float = 0.0) -> list[tuple[str, object]]:
        """Messages from rank 0 (waiting up to ``timeout_s`` for the first); raises when it is lost."""
        if self._lost is not None:
            raise TransportError(self._lost)
        if timeout_s > 0:
            self.wait(timeout_s)
        out = []
        while True:
            try:
                tag, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not two frames
                self.dropped += 1
                continue
            msg = self._unpack(tag, payload)
            if msg is None or msg[0] != 0:
                continue
            _, kind, body = msg
            if kind == "abort":
                self._lost = f"stopped by rank 0: {body}"
                raise JobAborted(self._lost)
            out.append((kind, body))
        if self._disconnected_fds():
            raise self._lose("rank 0 (the coordinator) closed its control connection: the process died")
        # Rank 0's pulse beats between generations too: its silence always counts.
        silent = time.monotonic() - max(self.pulse.last_seen.get(0, 0.0), self._started)
        if silent > self.silence_s:
            raise self._lose(
                f"rank 0 (the coordinator) has sent nothing for {silent:.1f} s "
                f"({SILENCE_FRACTION:g} x transport.timeout_s = {self.silence_s:g} s): it hangs or is unreachable"
            )
        return out


class _Pulse:
    """Heartbeats on a thread and a socket of their own, so that liveness never waits for compute.

    Every ``heartbeat_s`` it sends each peer (``peers``: ROUTER identities; None: the one
    peer of a DEALER) the seconds this rank has been inside its current stage step (0 when
    idle), and it records when each peer's heartbeat last arrived and what it said. A stopped
    or wedged process stops this thread too; a long computation does not (torch releases the
    GIL while it computes, and Python code hands it over every few milliseconds).
    """

    def __init__(self, endpoint: _Endpoint, sock: zmq.Socket, peers: list[bytes] | None):
        self.ep, self.sock, self.peers = endpoint, sock, peers
        self.last_seen: dict[int, float] = {}  # written by the thread only
        self.busy_for: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"adadecode-pulse-{endpoint.rank}", daemon=True)
        self._thread.start()  # the socket moves to the thread here (a full barrier), and stays there

    def _loop(self) -> None:
        try:
            due = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= due:
                    self._beat(now)
                    due = now + self.ep.heartbeat_s
                if self.sock.poll(int(1000 * min(due - now, 0.1))):  # wakes up for stop() too
                    self._drain()
        except zmq.ZMQError as e:  # the context is going away: nothing to report to
            log.debug("rank %d: pulse thread ends: %s", self.ep.rank, e)
        finally:
            self.sock.close(linger=0)

    def _beat(self, now: float) -> None:
        since = self.ep.busy_since
        frames = self.ep._pack("hb", 0.0 if since is None else round(now - since, 3))
        for peer in self.peers if self.peers is not None else [None]:
            try:
                self.sock.send_multipart(frames if peer is None else [peer, *frames], flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected (yet, or any more): nothing to queue a heartbeat for
                pass

    def _drain(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != (3 if self.peers is not None else 2):
                self.ep.dropped += 1
                continue
            msg = self.ep._unpack(frames[-2], frames[-1])
            if msg is None or msg[1] != "hb":
                continue
            sender = msg[0]
            if self.peers is not None and frames[0] != b"rank%d" % sender or self.peers is None and sender != 0:
                self.ep.dropped += 1  # signed, but claims another rank's identity
                continue
            self.last_seen[sender] = time.monotonic()
            self.busy_for[sender] = float(msg[2])

    def stop(self) -> None:
        """End the thread (it closes its socket); a few tenths of a second at most. Should it be
        stuck, terminating the context still ends it: its next zmq call raises ETERM."""
        self._stop.set()
        self._thread.join(1.0)
