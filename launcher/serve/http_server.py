"""uvicorn for `adadecode serve`: the server thread, its listening socket, and the connection guard.

``HttpServer`` runs an ASGI app (launcher/serve/app.py) on uvicorn's asyncio loop in a
thread of its own, on a socket bound at construction (so a busy port is a one-line error
before anything loads). ``guarded_protocol`` is uvicorn's h11 protocol with the read and
send deadlines of ``HttpLimits``: what one connection may hold of the server.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may hold of the server (serve.max_connections, serve.read_timeout_s,
    serve.send_timeout_s): past ``max_connections`` open connections or running requests, uvicorn
    answers 503; a connection that has not sent a whole request (head and body) within
    ``read_timeout_s`` of opening it, or of the request's head, is closed; one that reads
    nothing of its response for ``send_timeout_s`` is dropped (its request is cancelled)."""

    max_connections: int = 512
    read_timeout_s: float = 30.0
    send_timeout_s: float = 60.0


def guarded_protocol(limits: HttpLimits) -> type:
    """uvicorn's h11 protocol with the read and send deadlines of ``limits``.

    Why at the transport: a client that sends nothing, or half a head, never reaches the app,
    and one that stops reading blocks the app inside ``send`` with its buffers full; only the
    connection sees either. Each deadline aborts the connection, which the app sees as a
    disconnect (the request is cancelled and its slot freed as for any client that leaves).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._send_timer = None
            self._read_timer = self.loop.call_later(limits.read_timeout_s, self._read_deadline, None)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not None and self.cycle is not cycle:  # a new request's head: its body is due
                self._read_timer.cancel()
                self._read_timer = self.loop.call_later(limits.read_timeout_s, self._read_deadline, self.cycle)

        def _read_deadline(self, cycle) -> None:
            if self.cycle is cycle and (cycle is None or (cycle.more_body and not cycle.response_complete)):
                self.transport.abort()

        def pause_writing(self) -> None:  # the client's socket is full: it is not reading
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(limits.send_timeout_s, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def connection_lost(self, exc) -> None:
            self._read_timer.cancel()
            if self._send_timer is not None:
                self._send_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class HttpServer:
    """uvicorn serving ``app`` in a thread of its own, on a socket bound at construction."""

    def __init__(self, app, host: str, port: int, *, log_level: str = "warning", limits: HttpLimits = HttpLimits()):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, log_level=log_level.lower(), access_log=log_level.upper() in ("DEBUG", "INFO"),
            lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=5, http=guarded_protocol(limits),
            limit_concurrency=limits.max_connections,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="adadecode-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one); a clear error when it cannot be."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = info[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another port with `--port N` "
            "(`--port 0`: any free one) or another address with `--host`", key="serve.port",
        ) from None
    sock.set_inheritable(False)
    return sock
