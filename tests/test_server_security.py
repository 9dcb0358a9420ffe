"""The server's own defences, without a model: the API key, the start-up warning, the default
served name, and the connection deadlines (launcher/serve/).

The tests with a model behind the server (the hostile fuzz of a 2-rank server, idle and
never-reading clients beside a normal request, sampling bounds over HTTP) are in
tests/test_server.py, next to the servers they reuse. Every socket here is on loopback and
every wait has a deadline.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from adadecode.launcher.config import load_config
from adadecode.launcher.serve.app import Frontend, ServeDefaults, build_app
from adadecode.launcher.serve.command import http_frontend, is_loopback, served_name
from adadecode.launcher.serve.http_server import HttpLimits, HttpServer

KEY = "sk-test-0123456789"


@pytest.fixture
def keyed():
    """A server started with a key (the model still loading: /health answers 503)."""
    http = HttpServer(build_app(Frontend(ServeDefaults("tiny", max_tokens=8, api_key=KEY))), "127.0.0.1", 0).start()
    try:
        yield http.url
    finally:
        http.stop()


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                                          ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/nothing")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {KEY}x", KEY, f"bearer {KEY}", f"Basic {KEY}"])
def test_without_the_key_every_route_but_health_is_401(keyed, method, path, auth):
    headers = {} if auth is None else {"Authorization": auth}
    r = httpx.request(method, f"{keyed}{path}", headers=headers, json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert "Authorization: Bearer" in error["message"] and KEY not in r.text


def test_with_the_key_requests_pass_and_health_needs_none(keyed):
    ok = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed}/v1/models", headers=ok, timeout=10).json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{keyed}/metrics", headers=ok, timeout=10).status_code == 200
    assert httpx.get(f"{keyed}/health", timeout=10).status_code == 503  # loading, but not 401
    r = httpx.post(f"{keyed}/v1/completions", headers=ok, json={"prompt": "x"}, timeout=10)
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


def test_metrics_public_opens_metrics_only():
    defaults = ServeDefaults("tiny", max_tokens=8, api_key=KEY, metrics_public=True)
    http = HttpServer(build_app(Frontend(defaults)), "127.0.0.1", 0).start()
    try:
        assert httpx.get(f"{http.url}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"{http.url}/v1/models", timeout=10).status_code == 401
    finally:
        http.stop()


def test_the_key_comes_from_the_environment_and_is_never_printed(monkeypatch, capsys):
    from adadecode.launcher.cli import main

    monkeypatch.setenv("ADADECODE_API_KEY", KEY)
    cfg = load_config(["--serve.port=0"])
    with http_frontend(cfg) as frontend:
        assert frontend.defaults.api_key == KEY
    assert main(["serve", "--api-key", KEY, "--print-config"]) == 0
    out = capsys.readouterr()
    assert KEY not in out.out + out.err and "api_key: '<redacted" in out.out


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_without_a_key_warns(monkeypatch, capsys):
    """Binds every interface for a moment (no traffic is sent): the warning names the fix."""
    monkeypatch.delenv("ADADECODE_API_KEY", raising=False)
    with http_frontend(load_config(["--serve.host=0.0.0.0", "--serve.port=0"])):
        pass
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without an API key" in err and "ADADECODE_API_KEY" in err
    for flags in (["--serve.port=0"], ["--serve.host=0.0.0.0", "--serve.port=0", f"--serve.api_key={KEY}"]):
        with http_frontend(load_config(flags)):
            pass
        assert "warning" not in capsys.readouterr().err


def test_the_served_name_is_never_a_path(tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"")
    assert served_name("bundled:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert served_name(str(tmp_path / "my-model")) == "my-model"
    assert served_name(str(tmp_path / "my-model") + "/") == "my-model"
    assert served_name(str(tmp_path / "m.Q8_0.gguf")) == "m.Q8_0"
    assert served_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub id


# ------------------------------------------------------------------ connection deadlines


class _Firehose:
    """An ASGI app that streams ``size`` bytes, as the server streams tokens (Starlette's
    StreamingResponse, which stops the generator when the client disconnects); it records
    how each stream ended and how much it had sent."""

    def __init__(self, size: int):
        self.size, self.ended = size, []

    async def __call__(self, scope, receive, send):
        from starlette.responses import StreamingResponse

        async def body():
            sent, chunk = 0, b"x" * (1 << 16)
            try:
                while sent < self.size:
                    yield chunk
                    sent += len(chunk)
                self.ended.append(("complete", sent))
            except BaseException as e:  # cancelled: the client went away, or was dropped
                self.ended.append((type(e).__name__, sent))
                raise

        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):  # the whole request first, as the server's routes do
            pass
        await StreamingResponse(body(), media_type="text/plain")(scope, receive, send)


@pytest.fixture
def firehose():
    app = _Firehose(1 << 28)
    http = HttpServer(app, "127.0.0.1", 0, limits=HttpLimits(max_connections=64, read_timeout_s=1.0,
                                                            send_timeout_s=1.0)).start()
    try:
        yield http, app
    finally:
        http.stop()


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reads and drops what it sends meanwhile)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open past {seconds} s") from None
    return time.monotonic() - start


@pytest.mark.parametrize("sent", [b"", b"POST / HTTP/1.1\r\nHost: x\r\n",
                                  b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"],
                         ids=["silent", "half-a-head", "half-a-body"])
def test_a_connection_that_sends_no_whole_request_is_closed(firehose, sent):
    http, _ = firehose
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as sock:
        sock.sendall(sent)
        assert _closed_within(sock, 10) < 5


def test_a_client_that_never_reads_is_dropped(firehose):
    """Without the send deadline the stream would wait for the client forever, holding its
    task (and in the server its request); with it the connection is cut after ~1 s."""
    http, app = firehose
    connections = http.server.server_state.connections
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 20
        while not (app.ended and not connections) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.ended, "the stream is still blocked on a client that does not read"
        assert not connections, "the server still holds the connection of a client that does not read"
    # and the server still serves a client that reads
    with httpx.stream("GET", f"{http.url}/", timeout=10) as r:
        assert r.status_code == 200 and len(next(r.iter_bytes())) > 0


def test_past_max_connections_new_requests_get_503_not_a_hang():
    http = HttpServer(build_app(Frontend(ServeDefaults("tiny", max_tokens=8))), "127.0.0.1", 0,
                      limits=HttpLimits(max_connections=4, read_timeout_s=5.0)).start()
    socks = []
    try:
        for _ in range(4):
            socks.append(socket.create_connection(("127.0.0.1", http.port), timeout=5))
        time.sleep(0.2)
        assert httpx.get(f"{http.url}/health", timeout=10).status_code == 503
        for s in socks:
            s.close()
        socks.clear()
        deadline = time.monotonic() + 10
        while httpx.get(f"{http.url}/v1/models", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover once the connections closed"
            time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
        http.stop()
