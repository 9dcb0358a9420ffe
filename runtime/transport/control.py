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

Who may talk (docs/security.md): rank 0 draws a random 32-byte key per job
and hands it out over the process group together with the endpoint; the key
itself never crosses zmq. Three things hang off it:

- Connections: both of rank 0's ports are CURVE servers whose key pair, and
  the one client key pair the ranks share, are derived from the job key; a ZAP
  handler admits that client key only. A peer without the key is refused at
  the handshake, before zmq buffers a byte of its messages. (That is the only
  place it can be refused cheaply: libzmq bounds a frame with
  ``MAXMSGSIZE`` and a queue with ``RCVHWM``, but a multipart message that never
  ends grows without bound — 150 MB from one raw TCP peer, measured.) CURVE
  also encrypts; it adds about 10 us to a round trip on loopback.
- Messages: each carries an HMAC-SHA256 (16 bytes) under a key of its channel
  (control or pulse, so a message never verifies on the other), and a number
  that grows per sender and channel. A message whose tag does not verify,
  whose claimed sender is not the socket identity, or whose number is not above
  the last one taken from that sender (a replay) is dropped, counted in
  ``drops`` by reason, and warned about at most every ``WARN_EVERY_S``. A new
  job has a new key, so numbers start again at 1 with it.
- Bounds: a frame holds at most ``FRAME_BYTES`` of payload (longer payloads,
  such as a rank's trace events, go as several frames of one message) and zmq
  disconnects a peer that sends a longer one (``MAXMSGSIZE``). A receive
  queue holds ``RCVHWM`` messages per peer; on TCP a full queue stops zmq
  reading from that peer (flow control), it never drops, so the bound costs a
  job's own messages nothing. Sends keep an unbounded queue (``SNDHWM`` 0): a
  DEALER at its high-water mark would fail a ``NOBLOCK`` send, and a ROUTER
  with ``ROUTER_MANDATORY`` would refuse it. One ``recv`` takes at most
  ``DRAIN_MESSAGES`` messages or ``DRAIN_BYTES``; the rest waits, in order, for
  the next call, and the ROUTER takes one message per peer in turn.

Without CURVE in libzmq (``zmq.has("curve")`` false) rank 0 says so once
and keeps the rest: unsigned input is still never obeyed, but it is received.

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

Wire format: frames ``[tag, *payload]`` (rank 0 prepends the peer identity),
payload = JSON ``[sender_rank, number, kind, body]`` cut into frames of at most
``FRAME_BYTES``; kinds: ``hello``, ``ev`` (an
event, ``[class name, *fields]``; a ``SamplingParams`` field as
``{"SamplingParams": [*fields]}``, a ``TokenLogprobs`` as ``{"TokenLogprobs": [token, logprob,
[[id, logprob], ...]]}``, floats as JSON writes them, which read back bit for bit), ``stage``
(a rank's layers and heads),
``released`` (``[seq, busy seconds, stage counters, trace events or null]``: the
rank freed ``seq``'s slot), ``clock`` (a tracing rank's ping at start-up, answered
``[ping, rank 0's clock]``), ``bye``, ``err``, ``abort``; on the pulse sockets, ``hb`` (seconds inside the current
stage step, 0 when idle).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from ..events import (
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
)
from ..sampling import SamplingParams, TokenLogprobs
from .errors import JobAborted, TransportError

log = logging.getLogger("adadecode.control")

ControlEvent = StepRequest | Rollback | SequenceFinished | Shutdown | FinalPrediction | EarlyPrediction
CONTROL_EVENTS: tuple[type[ControlEvent], ...] = (
    StepRequest, Rollback, SequenceFinished, Shutdown, FinalPrediction, EarlyPrediction
)
_BY_NAME: dict[str, type[ControlEvent]] = {cls.__name__: cls for cls in CONTROL_EVENTS}
TAG_BYTES = 16
SILENCE_FRACTION = 0.8  # of timeout_s; the rest is left for the orderly exit
PULSE_HWM = 4  # heartbeats queued for a peer that is not there are dropped, not hoarded
# A payload frame: events are ~100 bytes, a `released` answer with trace events grows with the
# tokens since the last one (~0.5 KB per token and stage), so long payloads are cut, not refused.
FRAME_BYTES = 1 << 20
MAX_WIRE_FRAME = FRAME_BYTES + 4096  # zmq.MAXMSGSIZE: CURVE adds ~40 bytes to each frame on the wire
RCVHWM = 1024  # messages queued per peer before zmq stops reading from it (TCP flow control, no drop)
DRAIN_MESSAGES = 256  # per recv(): a flood cannot keep one call, nor the loop around it, forever
DRAIN_BYTES = 16 << 20
# What a closed connection can have left queued: its RCVHWM (with slack for what zmq had decoded).
# A ROUTER takes one message per peer in turn, so LAST_WORDS x peers reaches the end of any queue.
LAST_WORDS = 2 * RCVHWM
WARN_EVERY_S = 10.0  # dropped messages are counted always, warned about at most this often
CURVE = zmq.has("curve")  # pyzmq's wheels bundle it; a libzmq built without it cannot refuse peers
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# Why an endpoint's sockets and pulse are there when used: both constructors make them or raise,
# and only close() takes them away, after which the endpoint is not used.
_CLOSED = "the control plane is used between its constructor and close()"


def encode_event(event: ControlEvent) -> list[object]:
    cls = type(event)
    if _BY_NAME.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__name__} has no control-plane encoding; add it to CONTROL_EVENTS")
    return [cls.__name__, *(_encode_value(getattr(event, f.name)) for f in fields(cls))]


def _encode_value(value: object) -> object:
    if isinstance(value, SamplingParams):
        return {"SamplingParams": [getattr(value, f.name) for f in fields(SamplingParams)]}
    if isinstance(value, TokenLogprobs):
        return {"TokenLogprobs": [value.token, value.logprob, [list(t) for t in value.top]]}
    if isinstance(value, tuple):  # as JSON will carry it, so an encoded event equals what arrives
        return [_encode_value(v) for v in value]
    return value


def _decode_value(value: object) -> object:
    if isinstance(value, list):
        return tuple(_decode_value(v) if isinstance(v, dict) else v for v in value)
    if isinstance(value, dict):
        if list(value) == ["TokenLogprobs"]:
            try:
                token, logprob, top = value["TokenLogprobs"]
                return TokenLogprobs(int(token), float(logprob), tuple((int(i), float(lp)) for i, lp in top))
            except (TypeError, ValueError) as e:
                raise TransportError(f"invalid log probabilities on the control plane: {e}") from e
        if list(value) != ["SamplingParams"] or not isinstance(value["SamplingParams"], list):
            raise TransportError(f"unknown control-plane value {value!r:.80}")
        try:
            return SamplingParams(*value["SamplingParams"])
        except (TypeError, ValueError) as e:
            raise TransportError(f"invalid sampling parameters on the control plane: {e}") from e
    return value


def decode_event(item: object) -> ControlEvent:
    if not isinstance(item, list) or not item or item[0] not in _BY_NAME:
        raise TransportError(f"unknown control-plane event {item!r:.80}")
    cls = _BY_NAME[item[0]]
    # Values from the wire: their types are not checked against the event's fields (nor were
    # they ever: a dataclass does not check them either), so they go in as Any.
    values: list[Any] = [_decode_value(v) for v in item[1:]]
    return cls(*values)


def _tcp(host: str) -> str:
    return f"tcp://[{host}]" if ":" in host else f"tcp://{host}"


def _derive(key: bytes, label: str) -> bytes:
    return hmac.new(key, b"adadecode/" + label.encode(), hashlib.sha256).digest()


class _Signer:
    """One channel's signatures and message numbers, at one end.

    The channel's HMAC key is derived from the job key and the channel's name, so a message
    taken from one channel never verifies on another. ``last`` holds, per sender, the highest
    number taken: a message must carry a higher one (zmq keeps one sender's messages in order
    on a connection, and across its reconnects).
    """

    def __init__(self, key: bytes, channel: str, rank: int):
        self.key = _derive(key, "hmac/" + channel)
        self.rank = rank
        self._numbers = itertools.count(1)
        self.last: dict[int, int] = {}

    def pack(self, kind: str, body: object) -> list[bytes]:
        """``[tag, *payload frames]``."""
        payload = json.dumps([self.rank, next(self._numbers), kind, body], separators=(",", ":")).encode()
        tag = hmac.new(self.key, payload, hashlib.sha256).digest()[:TAG_BYTES]
        return [tag, *(payload[i:i + FRAME_BYTES] for i in range(0, max(len(payload), 1), FRAME_BYTES))]

    def unpack(self, frames: list) -> tuple[int, int, str, object] | str:
        """``(sender, number, kind, body)``, or the reason to drop the message. The frames'
        count and the tag's length are checked before anything is hashed."""
        if len(frames) < 2 or len(frames[0]) != TAG_BYTES:
            return "frames"
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for frame in frames[1:]:
            mac.update(frame)
        if not hmac.compare_digest(mac.digest()[:TAG_BYTES], bytes(frames[0])):
            return "unsigned"
        try:
            sender, number, kind, body = json.loads(b"".join(frames[1:]))
        except (ValueError, TypeError):
            return "malformed"
        if type(sender) is not int or type(number) is not int or not isinstance(kind, str):
            return "malformed"
        return sender, number, kind, body

    def take(self, sender: int, number: int) -> bool:
        """Whether ``number`` is new from ``sender`` (and remember it); False: a replay."""
        if number <= self.last.get(sender, 0):
            return False
        self.last[sender] = number
        return True


class _ZapPolicy:
    """The ZAP handler's rule: the job's client key, and no other."""

    def __init__(self, client_public: bytes):
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.client_public)


class _Endpoint:
    """What both ends share: signing, bounds, the socket monitor, the pulse (heartbeats), closing."""

    def __init__(self, rank: int, key: bytes, timeout_s: float):
        self.rank = rank
        self.key = key
        self.timeout_s = timeout_s
        self.heartbeat_s = min(1.0, timeout_s / 10)
        self.silence_s = SILENCE_FRACTION * timeout_s
        self.signer = _Signer(key, "control", rank)
        # Messages dropped, by reason: "handshake" (a connection refused before any message),
        # "frames", "unsigned", "malformed", "identity" (signed, but claims another rank), "replay".
        self.drops: Counter[str] = Counter()
        self._drops_lock = threading.Lock()  # the pulse thread drops too
        self._warned_at = float("-inf")
        # CURVE key pairs (z85): rank 0's, and the one every other rank uses.
        self.curve = CURVE
        server_secret, client_secret = (z85.encode(_derive(key, "curve/" + who)) for who in ("server", "client"))
        self._server_keys = (zmq.curve_public(server_secret), server_secret)
        self._client_keys = (zmq.curve_public(client_secret), client_secret)
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.sock: zmq.Socket | None = None
        self.mon: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.pulse: _Pulse | None = None
        # Set by the runner around each stage step (monotonic time); the pulse reports it.
        self.busy_since: float | None = None
        self._lost: str | None = None  # why a peer was lost: raised again by every later recv

    @property
    def dropped(self) -> int:
        """Messages (and refused connections) dropped so far, for any reason."""
        return sum(self.drops.values())

    def _drop(self, reason: str) -> None:
        with self._drops_lock:
            self.drops[reason] += 1
            now = time.monotonic()
            if now - self._warned_at < WARN_EVERY_S:
                return
            self._warned_at = now
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.drops.items()))
        log.warning("rank %d: dropped control traffic that is not this job's, or replayed (%s so far)",
                    self.rank, counts)

    def _secure(self, sock: zmq.Socket, server: bool, host: str) -> None:
        """Bounds, CURVE and address family, before the socket binds or connects."""
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_FRAME)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        if not self.curve:
            return
        if server:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._server_keys[1])
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit everyone
        else:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._server_keys[0])
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self._client_keys[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._client_keys[1])

    def _open(self, kind: int, host: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, 0)  # a send never fails for want of queue space (see Bounds)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        self._secure(sock, kind == zmq.ROUTER, host)
        self.mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.mon, zmq.POLLIN)
        self.sock = sock
        return sock

    def _pulse_socket(self, kind: int, host: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, PULSE_HWM)
        sock.setsockopt(zmq.RCVHWM, PULSE_HWM)
        self._secure(sock, kind == zmq.ROUTER, host)
        return sock

    def _lose(self, reason: str) -> TransportError:
        """Remember the first peer lost; every later ``recv`` raises the same."""
        if self._lost is None:
            self._lost = reason
        return TransportError(self._lost)

    def _is_peer(self, sender: int, identity: bytes | None) -> bool:
        raise NotImplementedError

    def _open_message(
        self, frames: list, signer: _Signer, identity: bytes | None = None
    ) -> tuple[int, str, object] | None:
        """``(sender, kind, body)`` of a message of this job, or None (dropped and counted).
        ``identity``: the ROUTER's peer identity, which must name the signed sender."""
        msg = signer.unpack(frames)
        if isinstance(msg, str):
            self._drop(msg)
            return None
        sender, number, kind, body = msg
        if not self._is_peer(sender, identity):
            self._drop("identity")
            return None
        if not signer.take(sender, number):
            self._drop("replay")
            return None
        return sender, kind, body

    def _incoming(
        self, max_messages: int = DRAIN_MESSAGES, max_bytes: float = DRAIN_BYTES
    ) -> Iterator[list[zmq.Frame]]:
        """The messages waiting on the socket, as frames, up to ``max_messages`` or ``max_bytes``
        (at least one): whatever arrives, one call ends, and what is left stays queued in order."""
        sock = self.sock
        assert sock is not None, _CLOSED
        for _ in range(max_messages):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            yield frames
            max_bytes -= sum(len(f) for f in frames)
            if max_bytes <= 0:
                return

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
            elif event["event"] & _HANDSHAKE_FAILED:
                self._drop("handshake")
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
        if self.auth is not None:  # its sockets live in the context: before term()
            self.auth.stop()
            self.auth = None
        self.ctx.term()


class ControlServer(_Endpoint):
    """Rank 0's end: one ROUTER, one identity per rank (and the pulse's own ROUTER)."""

    def __init__(self, world_size: int, key: bytes, host: str, timeout_s: float):
        super().__init__(0, key, timeout_s)
        self.world_size = world_size
        try:
            if self.curve:  # bound before the ports are: no connection is ever let in unchecked
                self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("adadecode.control.zap"))
                self.auth.start()
                self.auth.configure_curve_callback("*", _ZapPolicy(self._client_keys[0]))
            else:
                log.warning(
                    "libzmq was built without CURVE: the control plane cannot refuse a connection without "
                    "the job's key, only its messages (install pyzmq's wheels, which bundle it)"
                )
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

    def _is_peer(self, sender: int, identity: bytes | None) -> bool:
        return 0 < sender < self.world_size and identity == b"rank%d" % sender

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
        assert self.pulse is not None, _CLOSED
        return self.pulse.busy_for.get(rank, 0.0)

    def send(self, rank: int, kind: str, body: object = None) -> None:
        assert self.sock is not None, _CLOSED
        try:
            self.sock.send_multipart([b"rank%d" % rank, *self.signer.pack(kind, body)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise TransportError(f"{self.describe(rank)} is unreachable on the control plane: {e}") from e

    def broadcast(self, kind: str, body: object = None) -> None:
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
        if self._errors and not gone:
            assert self.mon is not None, _CLOSED
            if self.mon.poll(100):
                gone = [self._fd_rank.get(fd) for fd in self._disconnected_fds()]  # a death behind the error?
        if gone:  # a goodbye, or an error naming the cause, may be queued still
            out += self._drain(LAST_WORDS * self.world_size, float("inf"))
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
        assert self.pulse is not None, _CLOSED
        now = time.monotonic()
        for r in self.peers:
            silent = now - max(self.pulse.last_seen.get(r, 0.0), self._ready_at)
            if r not in self.said_bye and silent > self.silence_s:
                raise self._lose(
                    f"{self.describe(r)} has sent nothing for {silent:.1f} s "
                    f"({SILENCE_FRACTION:g} x transport.timeout_s = {self.silence_s:g} s): it hangs or is unreachable"
                )
        return out

    def _drain(
        self, max_messages: int = DRAIN_MESSAGES, max_bytes: float = DRAIN_BYTES
    ) -> list[tuple[int, str, object]]:
        out: list[tuple[int, str, object]] = []
        for frames in self._incoming(max_messages, max_bytes):
            if len(frames) < 3:
                self._drop("frames")
                continue
            msg = self._open_message(frames[1:], self.signer, frames[0].bytes)
            if msg is None:
                continue
            sender, kind, body = msg
            if kind == "hello":
                assert isinstance(body, dict), "a signed hello is a rank's {pid, host} (ControlClient.__init__)"
                self.peers[sender] = {"pid": body["pid"], "host": body["host"]}
                try:  # the connection's fd, to name the rank when the monitor reports its disconnect
                    self._fd_rank[frames[0].get(zmq.SRCFD)] = sender
                except zmq.ZMQError:  # a libzmq without SRCFD: deaths are found by silence instead
                    pass
            elif kind == "bye":
                self.said_bye.add(sender)
            elif kind == "err":
                self._errors.setdefault(sender, str(body))  # a str from the rank; only ever formatted
            else:
                out.append((sender, kind, body))
        return out

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

    def _is_peer(self, sender: int, identity: bytes | None) -> bool:
        return sender == 0  # rank 0 is the only peer a DEALER has

    def send(self, kind: str, body: object = None) -> None:
        assert self.sock is not None, _CLOSED
        try:
            self.sock.send_multipart(self.signer.pack(kind, body), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise TransportError(f"rank {self.rank}: sending to rank 0 failed: {e}") from e

    def _drain(self, max_messages: int = DRAIN_MESSAGES, max_bytes: float = DRAIN_BYTES) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for frames in self._incoming(max_messages, max_bytes):
            msg = self._open_message(frames, self.signer)
            if msg is None:
                continue
            _, kind, body = msg
            if kind == "abort":
                self._lost = f"stopped by rank 0: {body}"
                raise JobAborted(self._lost)
            out.append((kind, body))
        return out

    def recv(self, timeout_s: float = 0.0) -> list[tuple[str, object]]:
        """Messages from rank 0 (waiting up to ``timeout_s`` for the first); raises when it is lost."""
        if self._lost is not None:
            raise TransportError(self._lost)
        if timeout_s > 0:
            self.wait(timeout_s)
        out = self._drain()
        if self._disconnected_fds():
            self._drain(LAST_WORDS, float("inf"))  # an abort naming the cause may be queued still
            raise self._lose("rank 0 (the coordinator) closed its control connection: the process died")
        # Rank 0's pulse beats between generations too: its silence always counts.
        assert self.pulse is not None, _CLOSED
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
        self.signer = _Signer(endpoint.key, "pulse", endpoint.rank)  # used by the thread only
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
        frames = self.signer.pack("hb", 0.0 if since is None else round(now - since, 3))
        for peer in self.peers if self.peers is not None else [None]:
            try:
                self.sock.send_multipart(frames if peer is None else [peer, *frames], flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected (yet, or any more): nothing to queue a heartbeat for
                pass

    def _drain(self) -> None:
        for _ in range(DRAIN_MESSAGES):  # then beat: a flood must not stop this rank's heartbeats
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = None
            if self.peers is not None:
                if len(frames) < 3:
                    self.ep._drop("frames")
                    continue
                identity, frames = frames[0], frames[1:]
            msg = self.ep._open_message(frames, self.signer, identity)
            if msg is None:
                continue
            sender, kind, body = msg
            if kind != "hb" or not isinstance(body, (int, float)):
                self.ep._drop("malformed")
                continue
            self.last_seen[sender] = time.monotonic()
            self.busy_for[sender] = float(body)

    def stop(self) -> None:
        """End the thread (it closes its socket); a few tenths of a second at most. Should it be
        stuck, terminating the context still ends it: its next zmq call raises ETERM."""
        self._stop.set()
        self._thread.join(1.0)
