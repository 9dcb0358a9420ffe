"""What the control plane and the rendezvous let in (docs/security.md).

A peer without the job's key is refused at the zmq handshake, before anything it sends is
read; without CURVE (a libzmq built without it, ``curve`` False here) its messages are read
within bounds and dropped. A job message replayed, or taken from another channel, is refused.
The rendezvous store listens on MASTER_ADDR, not on every interface.

Sockets on 127.0.0.1 only; every wait has a deadline of a few seconds.
"""

from __future__ import annotations

import datetime
import logging
import socket
import struct
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import zmq
from adadecode.runtime.events import FinalPrediction
from adadecode.runtime.transport import _init_process_group, _listen, store_address
from adadecode.runtime.transport import control as control_mod
from adadecode.runtime.transport.control import (
    DRAIN_MESSAGES,
    FRAME_BYTES,
    ControlClient,
    ControlServer,
    _Signer,
    encode_event,
)

pytestmark = pytest.mark.distributed

KEY = b"k" * 32
PREDICTION = encode_event(FinalPrediction(0, 1, 10, 42))


@pytest.fixture(params=[True, False], ids=["curve", "no-curve"])
def pair(request, monkeypatch):
    if request.param and not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    monkeypatch.setattr(control_mod, "CURVE", request.param)
    server = ControlServer(2, KEY, "127.0.0.1", 5.0)
    client = ControlClient(1, server.endpoint, KEY, 5.0, server.pulse_endpoint)
    server.wait_for_peers()
    yield server, client, request.param
    client.close()
    server.close()


def _recv_until(endpoint, n: int = 1, seconds: float = 3.0) -> list:
    got, deadline = [], time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        got += endpoint.recv(0.05)
    return got


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _zmtp_null_peer(port: int) -> socket.socket:
    """A raw TCP peer that speaks ZMTP 3.0 with the NULL mechanism (no key), as a DEALER."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3.0)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    return s


def _closed_by_peer(s: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            if s.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def test_an_oversized_message_from_outside_is_refused_and_rank_0_goes_on(pair):
    """A frame that announces 64 MiB: with CURVE the connection ends at the NULL greeting;
    without, at the frame's header (MAXMSGSIZE). Either way rank 0 reads none of it."""
    server, client, _ = pair
    rogue = _zmtp_null_peer(_port(server.endpoint))
    try:
        try:  # a frame of 64 MiB, of which only the first MiB is ever sent
            rogue.sendall(b"\x02" + struct.pack(">Q", 64 << 20) + b"x" * (1 << 20))
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert _closed_by_peer(rogue, 3.0)
    finally:
        rogue.close()
    client.send("ev", PREDICTION)
    assert _recv_until(server) == [(1, "ev", PREDICTION)]
    assert server.drops["unsigned"] == 0


def test_a_job_message_longer_than_a_frame_arrives_whole(pair):
    """A `released` answer with many trace events goes as several frames of one message."""
    server, client, _ = pair
    events = [["compute", 1, 10**12 + i, 10**12 + i + 5, 0, 1, i, 1, 4, 8, "plain"] for i in range(60_000)]
    client.send("released", [0, 1.5, {}, events])
    client.send("ev", PREDICTION)
    got = _recv_until(server, 2, 5.0)
    assert [kind for _, kind, _ in got] == ["released", "ev"]
    assert got[0][2][3] == events and len(client.signer.pack("x", events)) - 1 > 2  # payload frames
    assert all(len(f) <= FRAME_BYTES for f in client.signer.pack("x", events))
    assert server.dropped == 0 and server.recv(0.0) == []  # and rank 1 is still there


def test_an_unsigned_flood_is_dropped_and_a_real_message_gets_through(pair):
    server, client, curve = pair
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.SNDHWM, 0)
    n = 5000
    try:
        rogue.connect(server.endpoint)
        forged = b'[1,1,"ev",' + repr(PREDICTION).replace("'", '"').encode() + b"]"
        for _ in range(n):
            try:  # never block: a DEALER with no peer blocks, and CURVE drops the rogue between reconnects
                rogue.send_multipart([b"\0" * 16, forged], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        time.sleep(0.5)  # the flood is queued (or refused) before the real message is sent
        client.send("ev", PREDICTION)
        deadline, got, calls, most = time.monotonic() + 3.0, [], 0, 0
        while not got and time.monotonic() < deadline:
            before = server.dropped
            got = server.recv(0.05)
            calls, most = calls + 1, max(most, server.dropped - before)
        assert got == [(1, "ev", PREDICTION)]
        assert most <= DRAIN_MESSAGES and calls <= 3  # one call reads a bounded share, in turn with rank 1
        if curve:  # nothing of the flood was read: its connections were refused at the handshake
            assert server.drops["unsigned"] == 0 and server.drops["handshake"] >= 1
        else:
            assert server.drops["unsigned"] >= 1
    finally:
        rogue.close(0)
        ctx.term()


def test_a_replayed_message_is_refused(pair):
    server, client, _ = pair
    first = client.signer.pack("ev", PREDICTION)
    second = client.signer.pack("ev", encode_event(FinalPrediction(0, 1, 11, 43)))
    client.sock.send_multipart(first)
    client.sock.send_multipart(first)  # the same message again
    client.sock.send_multipart(second)
    client.sock.send_multipart(first)  # an older one after a newer one
    got = _recv_until(server, 2)
    time.sleep(0.2)
    got += server.recv(0.0)
    assert [body for _, _, body in got] == [PREDICTION, encode_event(FinalPrediction(0, 1, 11, 43))]
    assert server.drops["replay"] == 2

    # rank 0's messages to a rank, likewise
    abort = server.signer.pack("ev", PREDICTION)
    for _ in range(2):
        server.sock.send_multipart([b"rank1", *abort])
    assert _recv_until(client, 2, 1.0) == [("ev", PREDICTION)] and client.drops["replay"] == 1


def test_a_message_of_another_channel_does_not_verify(pair):
    """The pulse channel signs with a key of its own: a heartbeat is no control message."""
    server, client, _ = pair
    heartbeat = _Signer(KEY, "pulse", 1).pack("hb", 0.0)
    client.sock.send_multipart(heartbeat)
    time.sleep(0.2)
    assert server.recv(0.0) == [] and server.drops["unsigned"] == 1


def test_numbers_start_again_with_a_new_key():
    """A new job draws a new key: its messages are numbered from 1 again, and the old job's
    messages do not verify under it."""
    old, new = _Signer(b"a" * 32, "control", 1), _Signer(b"b" * 32, "control", 1)
    for _ in range(3):
        stale = old.pack("ev", PREDICTION)
    assert new.unpack(stale) == "unsigned"
    assert new.unpack(new.pack("ev", PREDICTION))[:3] == (1, 1, "ev")


# --------------------------------------------------------------- the rendezvous store


def _listeners(port: int) -> list[str]:
    """Local addresses listening on TCP ``port`` (/proc/net/tcp and tcp6, state 0A)."""
    found = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                raw = bytes.fromhex(addr)
                # /proc/net prints each 32-bit word in host byte order (little-endian here)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
@pytest.mark.parametrize("master_addr", ["127.0.0.1", "localhost"])
def test_the_rendezvous_store_listens_on_loopback_only(master_addr):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _init_process_group("gloo", 0, 1, master_addr, port, datetime.timedelta(seconds=30))
    try:
        assert _listeners(port) == ["127.0.0.1"]  # torch's own store: "0.0.0.0" or "::", every interface
    finally:
        dist.destroy_process_group()


def test_store_address_narrows_to_what_master_addr_names(caplog):
    assert store_address("127.0.0.1") == "127.0.0.1"
    assert store_address("::1") == "::1"
    assert store_address("localhost") in ("127.0.0.1", "::1")
    with caplog.at_level(logging.INFO, logger="adadecode.transport"):
        assert store_address("node07") is None  # may resolve here to 127.0.1.1, elsewhere to the LAN
    assert "host name" in caplog.text


def test_an_address_not_of_this_host_falls_back_to_every_interface(caplog):
    with caplog.at_level(logging.WARNING, logger="adadecode.transport"):
        assert _listen("192.0.2.1", 0) == (None, 0)  # TEST-NET-1: never an address of this host
    assert "not an address of rank 0's host" in caplog.text


def test_a_taken_port_is_named():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(Exception, match=r"MASTER_PORT=\d+.*set MASTER_PORT to a free port"):
            _listen("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
