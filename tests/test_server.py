"""The HTTP server (launcher/serve/) on a tiny random model that speaks text
(the bundled SmolLM2's tokenizer and chat template over random weights of its vocabulary size).

- In process (a ServingLoop over a 2-stage Engine, uvicorn on loopback): /health answers 503
  while loading; a fuzz of 1000 malformed or hostile requests gives 0 crashes, 0 leaked slots
  and a correct greedy answer afterwards; a full queue gives 429.
- Processes (marked ``distributed``): `adadecode serve --stages 2 --port 0` driven with the
  official ``openai`` client — completions and chat, streamed and not, stop strings,
  ``max_tokens``, usage, many requests at once, every output equal to the same prompt
  decoded alone; ``/v1/models``, ``/health``, ``/metrics`` parsed with ``prometheus_client``;
  a client that goes away frees its slot; SIGTERM stops every rank cleanly; a rank killed with
  requests in flight gives every waiting client an error, ``/health`` 503, and every
  process exits within ``transport.timeout_s``.

Every wait has a deadline. The module takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from helpers import save_identity_heads, save_tiny_chat_model

ROOT = Path(__file__).resolve().parent.parent
MAX_LEN = 128  # model.max_seq_len of the servers here
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3,"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model directory, exit heads at layer 3 that emit for every token (threshold 0: most
    early tokens are rolled back), and a one-process reference engine (prompts decoded alone)."""
    from adadecode.runtime.engine import Engine

    path = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), seed=3)
    heads = save_identity_heads(path, tmp_path_factory.mktemp("heads"), {3: 0.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the servers' ranks use the 2 cores
    engine = Engine.load(str(path), heads=None, max_seq_len=MAX_LEN, device="cpu", dtype="float32")
    yield path, heads, engine
    torch.set_num_threads(threads)


def metrics_of(url: str) -> dict:
    """``/metrics`` parsed with prometheus_client's parser: {sample name + labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_until(predicate, seconds: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def assert_all_slots_free(url: str, slots: int) -> dict:
    def free():
        m = metrics_of(url)
        ok = (m["adadecode:num_requests_running"] == 0 and m["adadecode:num_requests_waiting"] == 0
              and m["adadecode:free_cache_slots"] == slots)
        return m if ok else None

    return wait_until(free, 30, "every cache slot to be free")


# ------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def inproc(tiny):
    """A 2-stage in-process engine (4 slots, 64 positions, early exit at layer 3) behind a real
    uvicorn on loopback; the greedy reference is decoded on the same engine before serving."""
    from adadecode.launcher.serve.app import Frontend, ServeDefaults, build_app
    from adadecode.launcher.serve.http_server import HttpServer
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.serving import ServingLoop

    path, heads, _ = tiny
    engine = Engine.load(str(path), stages=2, split_points=[3], heads=str(heads), max_seq_len=64, num_slots=4,
                         device="cpu", dtype="float32")
    reference = engine.generate(PROMPTS[0], max_new_tokens=8)
    frontend = Frontend(ServeDefaults("tiny", max_tokens=8, max_seq_len=64))
    http = HttpServer(build_app(frontend), "127.0.0.1", 0).start()
    loop = ServingLoop(engine, max_num_seqs=4, max_queue=8).start()
    frontend.attach(engine, loop)
    try:
        yield http.url, engine, loop, reference, http
    finally:
        frontend.shutdown()
        http.stop()


def test_health_is_503_while_loading_and_requests_are_refused():
    from adadecode.launcher.serve.app import Frontend, ServeDefaults, build_app
    from adadecode.launcher.serve.http_server import HttpServer

    frontend = Frontend(ServeDefaults("tiny", max_tokens=8))
    http = HttpServer(build_app(frontend), "127.0.0.1", 0).start()
    try:
        health = httpx.get(f"{http.url}/health")
        assert health.status_code == 503 and "still loading" in health.json()["error"]["message"]
        r = httpx.post(f"{http.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{http.url}/v1/models").json()["data"][0]["id"] == "tiny"
        assert metrics_of(http.url)["adadecode:healthy"] == 0
    finally:
        http.stop()


def _raw(url: str, data: bytes, read: int = 0, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the server, read up to ``read`` bytes, and hang up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while len(got) < read:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def _post(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def hostile_requests(rng: random.Random, long_prompt: str):
    """(kind, how) pairs: ``how`` is ("http", method, path, body bytes, headers) or ("raw", bytes, read)."""
    J = "application/json"

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    ok = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 4)}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": rng.randint(1, 4)}
    wrong = rng.choice([
        ("max_tokens", "5"), ("max_tokens", 5.5), ("max_tokens", True), ("max_tokens", -1), ("max_tokens", 0),
        ("stop", 5), ("stop", [1]), ("stop", [""]), ("stop", {"a": 1}), ("stream", "yes"),
        ("prompt", 5), ("prompt", []), ("prompt", [1, "a"]), ("prompt", [-1]), ("prompt", [10**9]),
        ("prompt", [[1, 2], []]), ("prompt", None), ("prompt", {"text": "x"}), ("temperature", "hot"),
        ("early_exit", "always"), ("stream_options", {"include_usage": "yes"}), ("seed", "x"), ("model", 7),
        ("stream_options", {"continuous_usage_stats": True}), ("user", 1), ("logit_bias", [1]),
    ])
    unsupported = rng.choice([
        ("repetition_penalty", -1.3), ("logprobs", -1), ("stop_token_ids", [5]), ("best_of", 3), ("suffix", "x"),
        ("temperature", -0.7), ("top_p", 1.5), ("top_k", -1), ("presence_penalty", 3.0),
        ("early_exit_thresholds", [0.5]), ("logit_bias", {"1": 5}),
    ])
    bad_chat = rng.choice([
        {"messages": "hi"}, {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x", "extra": 1}]}, {"messages": [{"role": "user", "content": "x"}],
                                                                       "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4},
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
    ])
    edge = rng.choice([
        ("temperature", 1e-300), ("temperature", 1e-40), ("temperature", 1e308), ("temperature", math.nan),
        ("temperature", math.inf), ("top_p", math.nan), ("min_p", -math.inf), ("top_k", 2**63), ("top_k", 10**30),
        ("top_k", 10**6), ("seed", 2**64), ("seed", -1), ("prompt", "\ud800"), ("prompt", "ok \udfff"),
        ("stop", ["\ud800"]), ("model", "\ud800"), ("stop", ["a"] * 1000), ("stop", ["x" * 1000]),
        ("messages", [{"role": "user", "content": "\ud800"}]), ("user", "\udc00"),
    ])
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    stream = body({**ok, "max_tokens": 40, "stream": True, "n": rng.choice([1, 2])})  # n = 2: both cancelled
    choices = [
        ("ok", ("http", "POST", "/v1/completions", body(ok), J)),
        ("ok-chat-stream", ("http", "POST", "/v1/chat/completions", body({**chat, "stream": True}), J)),
        ("bad-json", ("http", "POST", "/v1/completions", rng.choice([b"{", b"{'prompt': 1}", b"", b"[]", b"null",
                                                                        b'"x"', b"1e999", junk]), J)),
        ("deep-json", ("http", "POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, J)),
        ("wrong-type", ("http", "POST", "/v1/completions", body({**ok, wrong[0]: wrong[1]}), J)),
        ("unsupported", ("http", "POST", "/v1/completions", body({**ok, unsupported[0]: unsupported[1]}), J)),
        ("unknown-field", ("http", "POST", "/v1/completions", body({**ok, f"x{rng.randint(0, 99)}": 1}), J)),
        ("bad-chat", ("http", "POST", "/v1/chat/completions", body(bad_chat), J)),
        ("huge-max-tokens", ("http", "POST", "/v1/completions",
                             body({**ok, "max_tokens": 10 ** rng.randint(2, 40)}), J)),
        ("over-the-cache", ("http", "POST", "/v1/completions", body({"prompt": long_prompt}), J)),
        ("over-the-cache", ("http", "POST", "/v1/completions", body({"prompt": list(range(1, 70))}), J)),
        ("wrong-model", ("http", "POST", "/v1/completions", body({**ok, "model": "gpt-4"}), J)),
        ("wrong-route", ("http", rng.choice(["GET", "PUT", "DELETE"]), rng.choice(["/v1/completions", "/v1/x", "/"]),
                         b"", J)),
        ("form-body", ("http", "POST", "/v1/completions", b"prompt=hi", "application/x-www-form-urlencoded")),
        ("edge", ("http", "POST", "/v1/chat/completions" if edge[0] == "messages" else "/v1/completions",
                  body({**ok, edge[0]: edge[1]}), J)),
        ("not-utf8", ("http", "POST", "/v1/completions", b'{"prompt": "\xff\xfe\xc3("}', J)),
        ("huge-body", ("http", "POST", "/v1/completions", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', J)),
        ("no-content-type", ("http", "POST", "/v1/completions", body(ok), None)),
        ("cut-off-body", ("raw", _post("/v1/completions", stream)[: rng.randint(10, 200)], 0)),
        ("length-lies", ("raw", _post("/v1/completions", b'{"prompt": "hi"}')[:-3].replace(
            b"Content-Length: 16", b"Content-Length: 4000"), 0)),
        ("garbage", ("raw", junk + b"\r\n\r\n", 256)),
        ("vanish-mid-stream", ("raw", _post("/v1/completions", stream), rng.randint(200, 1200))),
        ("vanish-before-answer", ("raw", _post("/v1/chat/completions", body({**chat, "max_tokens": 30})), 0)),
    ]
    return rng.choice(choices)


def fuzz(url: str, count: int, seed: int) -> dict[str, set]:
    """Send ``count`` hostile requests; assert that none gets a 5xx and that every refusal is an
    OpenAI-shaped error that says what is wrong. Returns the statuses seen for each kind."""
    rng = random.Random(seed)
    long_prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(120))
    seen: dict[str, set] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            kind, how = hostile_requests(rng, long_prompt)
            if how[0] == "raw":
                _raw(url, how[1], how[2])
                seen.setdefault(kind, set()).add("sent")
                continue
            _, method, path, content, ctype = how
            r = client.request(method, path, content=content, headers={"Content-Type": ctype} if ctype else {})
            seen.setdefault(kind, set()).add(r.status_code)
            assert r.status_code < 500, (kind, content[:200], r.status_code, r.text)
            if r.status_code != 200:
                error = r.json()["error"]
                assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}
    return seen


def test_fuzz_1000_hostile_requests_crash_nothing_and_leak_no_slot(inproc):
    url, engine, loop, reference, http = inproc
    seen = fuzz(url, 1000, seed=11)
    assert http.thread.is_alive() and loop.healthy, loop.error
    # every refusal is a 4xx that says what is wrong, every well-formed request a 200
    assert seen["ok"] == {200} and seen["ok-chat-stream"] == {200}
    for kind in ("bad-json", "deep-json", "wrong-type", "unsupported", "unknown-field", "bad-chat", "over-the-cache",
                 "edge", "not-utf8"):
        assert seen[kind] == {400}, (kind, seen[kind])
    assert seen["wrong-model"] == {404} and seen["form-body"] == {415} and seen["wrong-route"] <= {404, 405}
    assert seen["huge-body"] == {413} and seen["no-content-type"] == {415}
    m = assert_all_slots_free(url, 4)
    assert m['adadecode:requests_finished_total{finished_reason=cancelled}'] > 0  # the clients that vanished
    for stage in engine.stages:
        assert stage.slots == {} and not stage.queued, stage.index
    after = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8}, timeout=30).json()
    assert after["choices"][0]["text"] == reference.text
    assert after["usage"]["completion_tokens"] == len(reference.tokens)


def test_idle_connections_and_clients_that_never_read_do_not_stop_a_normal_request(inproc):
    """200 connections that send nothing and 50 streams whose clients never read a byte (a
    small receive buffer) take neither the server nor a slot: a normal request is served
    (retried on 429 while the streams hold the queue) with the greedy answer, in time."""
    url, engine, loop, reference, http = inproc
    host, port = url.removeprefix("http://").split(":")
    stream = json.dumps({"prompt": PROMPTS[1], "max_tokens": 40, "stream": True}).encode()
    idle, deaf = [], []
    try:
        for _ in range(200):
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        for _ in range(50):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(_post("/v1/completions", stream))
            deaf.append(sock)
        start, answer = time.monotonic(), None
        while answer is None:
            assert time.monotonic() - start < 60, "a normal request was not served within 60 s"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8}, timeout=60)
            assert r.status_code in (200, 429), r.text
            answer = r.json() if r.status_code == 200 else time.sleep(0.2)
        assert answer["choices"][0]["text"] == reference.text
        assert http.thread.is_alive() and loop.healthy, loop.error
    finally:
        for sock in idle + deaf:
            sock.close()
    assert_all_slots_free(url, 4)
    for stage in engine.stages:
        assert stage.slots == {} and not stage.queued, stage.index


def test_a_full_queue_answers_429_and_the_rest_are_served(inproc):
    """The loop held inside the model: 4 slots and 8 queue places fill up, the rest get 429."""
    url, engine, loop, reference, _ = inproc
    model = engine.stages[0].model  # every new token is embedded on stage 0, on the loop's thread
    real, gate = model.embed, threading.Event()
    model.embed = lambda *a, **k: (gate.wait(30), real(*a, **k))[1]
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8},
                                   timeout=60) for _ in range(16)]
            wait_until(lambda: sum(f.done() for f in futures) >= 4, 30, "the requests past the queue to be refused")
            gate.set()
            answers = [f.result() for f in futures]
    finally:
        gate.set()
        model.embed = real
    refused = [a for a in answers if a.status_code == 429]
    served = [a for a in answers if a.status_code == 200]
    assert len(refused) >= 4 and len(refused) + len(served) == 16, [a.status_code for a in answers]
    assert "serve.max_queue" in refused[0].json()["error"]["message"]
    assert all(a.json()["choices"][0]["text"] == reference.text for a in served)
    assert_all_slots_free(url, 4)


def test_the_kv_cache_is_checked_against_free_memory():
    from adadecode.launcher.config import ConfigError, load_config
    from adadecode.launcher.dist_env import read_dist_env
    from adadecode.launcher.distributed import plan_launch
    from adadecode.launcher.launch import stage_split
    from adadecode.launcher.serve.command import check_cache_memory

    cfg = load_config(["--pipeline.stages=2", "--serve.max_num_seqs=16", "--model.device=cpu"])
    plan = plan_launch(cfg, read_dist_env())
    config, _ = stage_split(cfg)
    ranges = [(0, 19), (19, 30)]
    check_cache_memory(cfg, plan, config, ranges, free=lambda device: (1 << 40, "plenty"))
    # SmolLM2-135M: 30 layers x 2 x 3 heads x 64 x 2048 positions x 4 bytes = 94 MiB per slot
    expected = (r"serve.max_num_seqs = 16 needs 1.41 GiB of KV cache on cpu \(2 stage\(s\), 16 slots x 2048 positions "
                r"in float32\), but only 0.50 GiB is free \(test\); lower --serve.max_num_seqs \(at most 5 fit\)")
    with pytest.raises(ConfigError, match=expected):
        check_cache_memory(cfg, plan, config, ranges, free=lambda device: (1 << 29, "test"))


# --------------------------------------------------------------------------- processes


class ServerProcess:
    """`adadecode serve --port 0 ...` as a child process group; stderr collected by a thread."""

    def __init__(self, *args: str):
        # the eager path: `serve` compiles by default, which takes minutes on this CPU
        cmd = [sys.executable, "-m", "adadecode.launcher.cli", "serve", "--port", "0", "--pipeline.compile=off", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self.rank0: int | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if (m := re.match(r"adadecode: serving \S+ on (http://\S+) \(pid (\d+)\)", line)):
                self.url, self.rank0 = m.group(1), int(m.group(2))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, seconds: float = 120) -> ServerProcess:
        wait_until(lambda: self.url or self.proc.poll() is not None, seconds, "the server to listen", 0.1)
        assert self.url, self.stderr

        def healthy():
            assert self.proc.poll() is None, self.stderr
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, seconds, "/health to answer 200", 0.2)
        return self

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the spawned ranks (children of the launcher)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        out = {}
        for pid in map(int, children):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK="))
            out[rank] = pid
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def served(tiny):
    """`adadecode serve --stages 2`: stages [0, 5) and [5, 6) (the automatic split: the LM head of
    a 49152-token vocabulary weighs), 4 slots, a queue of 8, early exit at layer 3 available."""
    path, heads, engine = tiny
    server = ServerProcess(
        "--stages", "2", "--model", str(path), "--model.max_seq_len", str(MAX_LEN), "--max-new-tokens", "16",
        "--decoding.heads", str(heads), "--serve.max_num_seqs=4",
        "--serve.max_queue=16", "--serve.served_model_name=tiny", "--transport.timeout_s=20",
    )
    try:
        yield server.wait_ready(), engine
    finally:
        server.kill()


def client_of(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)




@pytest.mark.distributed
def test_models_and_health(served):
    server, engine = served
    models = client_of(server).models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].max_model_len == MAX_LEN
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.distributed
def test_completions_streamed_or_not_equal_each_prompt_decoded_alone(served):
    server, engine = served
    client = client_of(server)
    for prompt in PROMPTS[:2]:
        alone = engine.generate(prompt, max_new_tokens=12)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12)
        assert r.choices[0].text == alone.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (alone.prompt_tokens, len(alone.tokens))
        assert r.usage.total_tokens == alone.prompt_tokens + len(alone.tokens)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.tokens)
    ids = engine.encode(PROMPTS[2])  # a prompt of token ids, as OpenAI's API allows
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=5)
    assert r.choices[0].text == engine.generate(ids, max_new_tokens=5).text


@pytest.mark.distributed
def test_chat_streamed_or_not_uses_the_chat_template(served):
    server, engine = served
    client = client_of(server)
    alone = engine.generate(CHAT, max_new_tokens=10)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == alone.text
    assert r.usage.prompt_tokens == len(engine.encode(CHAT, chat=True)) and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None  # no include_usage


@pytest.mark.distributed
def test_stop_strings_and_max_tokens(served):
    server, engine = served
    client = client_of(server)
    full = engine.generate(PROMPTS[0], max_new_tokens=12).text
    cut = full.find(" ", 6)  # a word boundary in the middle of the output
    stop = full[cut : cut + 4]
    alone = engine.generate(PROMPTS[0], max_new_tokens=12, stop=[stop, "never-seen"])
    assert alone.finish_reason == "stop" and alone.text == full[: full.find(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, stop=[stop, "never-seen"])
    assert r.choices[0].text == alone.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(alone.tokens)
    streamed = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == alone.text
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=3).text


@pytest.mark.distributed
def test_many_requests_in_flight_each_equal_their_prompt_alone(served):
    """12 requests at once (4 slots, the rest queued): every output is the one of its prompt
    decoded alone."""
    server, engine = served
    client = client_of(server)
    alone = {p: engine.generate(p, max_new_tokens=16) for p in PROMPTS}
    jobs = PROMPTS * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=16), jobs))
    for prompt, r in zip(jobs, answers, strict=True):
        assert r.choices[0].text == alone[prompt].text, prompt
        assert r.usage.completion_tokens == len(alone[prompt].tokens), prompt


@pytest.mark.distributed
def test_sampled_requests_equal_seeded_sampling_alone(served):
    """temperature / top_p / seed and the top_k, min_p, sampling_mode extensions reach the
    runtime: seeded sampling, several requests at once, early exit off, eager or deferred,
    streamed or not, gives the tokens of the same parameters decoded alone in one process."""
    from adadecode.runtime.sampling import SamplingParams

    server, engine = served
    client = client_of(server)
    cases = [(p, SamplingParams(0.9, top_p=0.95, seed=seed), mode) for p in PROMPTS[:2] for seed in (0, 7)
             for mode in ("off", "eager", "deferred")]
    cases.append((PROMPTS[2], SamplingParams(1.2, top_k=20, min_p=0.01, seed=3), "eager"))
    alone = {(p, sp): engine.generate(p, max_new_tokens=16, sampling=sp) for p, sp, _ in cases}
    assert len({tuple(alone[(PROMPTS[0], SamplingParams(0.9, top_p=0.95, seed=s))].tokens) for s in (0, 7)}) == 2

    def ask(case):
        prompt, sp, mode = case
        extra = {"early_exit": mode, "top_k": sp.top_k, "min_p": sp.min_p, "sampling_mode": sp.mode}
        kw = dict(model="tiny", prompt=prompt, max_tokens=16, temperature=sp.temperature, top_p=sp.top_p,
                  seed=sp.seed, extra_body=extra)
        if mode == "deferred":  # streamed
            chunks = list(client.completions.create(stream=True, **kw))
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    for (prompt, sp, mode), text in zip(cases, answers, strict=True):
        assert text == alone[(prompt, sp)].text, (prompt, sp, mode)


@pytest.mark.distributed
def test_early_exit_requests_equal_their_prompt_alone(served):
    """Early exit per request (the `early_exit` extension): eager and deferred, several at once,
    give the tokens of the prompt decoded alone (with early exit off)."""
    server, engine = served
    client = client_of(server)
    alone = {p: engine.generate(p, max_new_tokens=16) for p in PROMPTS}
    jobs = [(p, mode) for p in PROMPTS for mode in ("eager", "deferred")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model="tiny", prompt=job[0], max_tokens=16, extra_body={"early_exit": job[1]}), jobs))
    for (prompt, mode), r in zip(jobs, answers, strict=True):
        assert (r.choices[0].text, r.usage.completion_tokens) == (alone[prompt].text, len(alone[prompt].tokens)), mode


@pytest.mark.distributed
def test_refusals_name_the_field_and_the_numbers(served):
    import openai

    server, _ = served
    client = client_of(server)
    cases = [
        (dict(suffix="x"), r"insertion \(suffix\) is not supported"),
        (dict(temperature=-0.8), r"sampling parameter temperature = -0.8 is invalid: expected 0 \(greedy decoding\) "
                                 r"or a number in \[0.01, 100\]"),
        (dict(temperature=1e-300), r"sampling parameter temperature = 1e-300 is invalid"),
        (dict(extra_body={"top_k": 2**63}), r"sampling parameter top_k = 9223372036854775808 is invalid"),
        (dict(extra_body={"top_k": 10**6}), r"`top_k` = 1000000 is larger than the vocabulary \(49152 tokens\)"),
        (dict(top_p=0), r"sampling parameter top_p = 0.0 is invalid: expected a number in \(0, 1\]"),
        (dict(extra_body={"top_k": -2}), "sampling parameter top_k = -2 is invalid"),
        (dict(extra_body={"sampling_mode": "nucleus"}), "sampling_mode"),
        (dict(logprobs=-1), "logprobs"),
        (dict(extra_body={"early_exit_thresholds": [0.5]}), "per-request thresholds are not supported"),
        (dict(extra_body={"frobnicate": 1}), "unknown field `frobnicate`"),
        (dict(max_tokens=1000), r"the prompt \(5 tokens\) plus max_tokens \(1000\) needs 1005 positions but the KV "
                                r"cache holds 128"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=PROMPTS[0], **kwargs)
        assert re.search(message, e.value.message), (kwargs, e.value.message)
    with pytest.raises(openai.NotFoundError, match="the model `gpt-4` does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPTS[0])


@pytest.mark.distributed
def test_fuzz_of_a_two_rank_server_stops_no_rank_and_leaks_nothing(served):
    """Every field at its edges (tiny, huge, NaN and infinite numbers, top_k past int64, lone
    surrogates, bytes that are not UTF-8, a 10 MB body, 1,000 stop strings, no Content-Type,
    deep JSON, clients that vanish mid-stream) against 2 ranks: no 5xx, every rank alive,
    no slot or queue entry left, and the same answer as before."""
    server, engine = served
    before = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 12},
                        timeout=60).json()["choices"][0]["text"]
    ranks = server.ranks()
    seen = fuzz(server.url, 300, seed=19)
    assert seen["edge"] == {400} and seen["not-utf8"] == {400} and seen["huge-body"] == {413}, seen
    assert server.proc.poll() is None, server.stderr
    for rank, pid in ranks.items():
        assert Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text(), rank
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert_all_slots_free(server.url, 4)
    after = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 12},
                       timeout=60).json()["choices"][0]["text"]
    assert after == before


@pytest.mark.distributed
def test_metrics(served):
    """/metrics has vLLM's names, our early-exit, slot and stage metrics, and parses with
    prometheus_client."""
    server, engine = served
    client = client_of(server)
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4)
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, extra_body={"early_exit": "eager"})
    m = assert_all_slots_free(server.url, 4)
    assert m["adadecode:requests_finished_total{finished_reason=length}"] >= 2
    assert m["adadecode:cache_slots"] == 4 and m["adadecode:healthy"] == 1
    assert m["adadecode:prompt_tokens_total"] > 0 and m["adadecode:generation_tokens_total"] >= 4
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_time_per_output_token_seconds"):
        assert m[f"adadecode:{name}_count"] >= 1, name
    assert 0 < m["adadecode:stage_busy_fraction{stage=0}"] <= 1 and m["adadecode:stage_busy_seconds_total{stage=1}"] > 0
    # heads at layer 3 with threshold 0 emit for every token; most early tokens are rolled back
    assert m["adadecode:early_tokens_emitted_total{layer=3}"] > 0
    assert m["adadecode:early_tokens_rolled_back_total{layer=3}"] > 0


@pytest.mark.distributed
def test_sigterm_stops_every_rank_cleanly(served):
    server, _ = served
    ranks = server.ranks()
    os.kill(server.rank0, signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.stderr
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values())


def test_sigterm_is_handled_before_ready_is_printed(tiny, monkeypatch):
    """A scheduler (or a test) may answer `ready` with SIGTERM at once: by then rank 0 must end
    serving in order, not die of the default action with the other ranks waiting on it."""
    from adadecode.launcher.cli import parse
    from adadecode.launcher.serve import command
    from adadecode.launcher.serve.app import Frontend, ServeDefaults
    from adadecode.runtime.engine import Engine

    path, _, _ = tiny
    cfg = parse(["serve", "--model", str(path), "--pipeline.compile=off", "--serve.max_num_seqs=1"])[1]
    engine = Engine.load(str(path), heads=None, max_seq_len=MAX_LEN, device="cpu", dtype="float32")
    frontend = Frontend(ServeDefaults("tiny", max_tokens=8, max_seq_len=MAX_LEN))
    at_ready = []

    def print_and_note(*args, **kwargs):
        if args and str(args[0]).startswith("adadecode: ready"):
            at_ready.append(signal.getsignal(signal.SIGTERM))
            frontend.done.set()  # and end at once

    monkeypatch.setattr(command, "print", print_and_note, raising=False)  # the module's name for print
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert command.serve_requests(frontend, engine, cfg) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(at_ready) == 1 and at_ready[0] not in (signal.SIG_DFL, previous)


@pytest.mark.distributed
def test_sigterm_to_every_process_as_a_scheduler_sends_it_ends_serving_in_order(tiny):
    """SIGTERM to the launcher and every rank at once (Slurm's scancel, `kill -TERM -PGID`, a
    container stop reaching the launcher, which passes it on): rank 1 waits for rank 0, which
    ends serving in order, and every process exits 0."""
    path, _, _ = tiny
    server = ServerProcess("--stages", "2", "--model", str(path), "--model.max_seq_len", str(MAX_LEN),
                           "--max-new-tokens", "16", "--transport.timeout_s=20").wait_ready()
    try:
        ranks = server.ranks()
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            status = server.proc.wait(30)
        except subprocess.TimeoutExpired:  # seen once under CI's load, not reproduced: keep what it said
            pytest.fail(f"still running 30 s after SIGTERM; its stderr:\n{server.stderr}")
        assert status == 0, server.stderr
        assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values())
        assert "rank 1: SIGTERM: serving ends when rank 0 ends it" in server.stderr
    finally:
        server.kill()


@pytest.mark.distributed
def test_clients_that_go_away_free_their_slots_on_every_rank(tiny):
    """Streams dropped after their first chunk, and requests dropped while queued, are cancelled:
    every slot is free again, and the server goes on serving."""
    path, _, engine = tiny
    server = ServerProcess(
        "--stages", "2", "--model", str(path), "--model.max_seq_len", str(MAX_LEN), "--max-new-tokens=16",
        "--decoding.heads=none", "--serve.max_num_seqs=2", "--serve.served_model_name=tiny", "--transport.timeout_s=8",
    )
    try:
        server.wait_ready()

        def hang_up(i):
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=10,
                              json={"prompt": PROMPTS[i % 4], "max_tokens": 100, "stream": True}) as r:
                next(r.iter_lines())  # the first chunk (a queued one: once admitted); then hang up

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(hang_up, range(4)))
        m = assert_all_slots_free(server.url, 2)
        assert m["adadecode:requests_finished_total{finished_reason=cancelled}"] == 4
        r = client_of(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8)
        assert r.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=8).text
    finally:
        server.kill()


@pytest.mark.distributed
def test_a_killed_rank_fails_every_waiting_request_and_every_process_exits(tmp_path):
    # requests of 1,000 tokens (about 3 s each here): none may finish before the kill, however
    # slowly the five get under way on a loaded machine
    path = save_tiny_chat_model(tmp_path / "model", seed=3, max_position_embeddings=1024)
    timeout = 15.0
    server = ServerProcess(
        "--stages", "2", "--model", str(path), "--model.max_seq_len=1024", "--decoding.heads=none",
        "--serve.max_num_seqs=2", f"--transport.timeout_s={timeout}",
    )
    try:
        server.wait_ready()
        first_chunk, outcomes = threading.Event(), {}

        def stream(i):
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                                  json={"prompt": PROMPTS[i % 4], "max_tokens": 1000, "stream": True}) as r:
                    for line in r.iter_lines():
                        first_chunk.set()
                        if line.startswith('data: {"error"'):
                            outcomes[i] = "error event"
                        elif line == "data: [DONE]":
                            outcomes.setdefault(i, "completed")
            except httpx.TransportError as e:
                outcomes[i] = f"connection error {e!r}"

        def plain(i):
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": PROMPTS[i % 4], "max_tokens": 1000})
            outcomes[i] = r.status_code

        # Streams first, so that they hold both slots; then the plain requests, which queue
        # behind them (were they first, one could finish before the kill and rightly get a 200).
        threads = [threading.Thread(target=stream if i < 3 else plain, args=(i,)) for i in range(5)]
        for t in threads[:3]:
            t.start()
        assert first_chunk.wait(60)
        for t in threads[3:]:
            t.start()
        wait_until(lambda: sum(v for k, v in metrics_of(server.url).items()
                               if k in ("adadecode:num_requests_running", "adadecode:num_requests_waiting")) == 5,
                   30, "all 5 requests to be running or waiting")
        rank1 = server.ranks()[1]
        killed_at = time.monotonic()
        os.kill(rank1, signal.SIGKILL)

        def health():
            try:
                return httpx.get(f"{server.url}/health", timeout=2).status_code == 503
            except httpx.TransportError:
                return False

        wait_until(health, timeout, "/health to answer 503")
        for t in threads:
            t.join(timeout)
        assert all(not t.is_alive() for t in threads), outcomes
        # admitted requests fail with the loop (500 or 503, as the loop's error is set), queued ones with 503
        assert outcomes.keys() == set(range(5)), outcomes
        assert [outcomes[i] for i in range(3)] == ["error event"] * 3, outcomes
        assert {outcomes[3], outcomes[4]} <= {500, 503}, outcomes
        code = server.proc.wait(timeout)
        elapsed = time.monotonic() - killed_at
    finally:
        server.kill()
    assert elapsed < timeout, elapsed
    assert code == 2, server.stderr
    assert re.search(r"adadecode: error: rank 0: serving stopped: TransportError: rank 1 \(pid \d+ on .*\) closed its "
                     "control connection", server.stderr), server.stderr
