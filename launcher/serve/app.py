"""The OpenAI-compatible app of `adadecode serve`: FastAPI routes and the bridge to the serving loop.

Theory of operation. The server is a thin shell around ``runtime.serving.ServingLoop``,
which owns scheduling, verification and the cache slots; nothing here decodes. A
request is validated (launcher/serve/openai_api.py), tokenized, submitted to the loop, and
its events are turned into an OpenAI response or a stream of server-sent events.

Threads (one process, rank 0):

- the main thread loads the model (under torchrun / ``--stages N``: joins the pipeline
  through ``launcher.distributed.run_rank``), then waits for a signal or a failure
  (launcher/serve/command.py);
- ``adadecode-http``: uvicorn's asyncio loop (launcher/serve/http_server.py), started
  *before* loading so that ``GET /health`` answers 503 while the model loads; it parses,
  submits and streams;
- ``adadecode-tokenize``: one worker that runs the tokenizer (and chat template), so a
  long prompt never blocks the event loop and encodes never run concurrently;
- ``adadecode-serving``: the ``ServingLoop``, which drives the runner.

How events reach the asyncio loop: ``ServingLoop.submit`` takes a callback that the
serving thread calls with each ``TextDelta`` and the one ``Finished``; the callback
stamps the time and hands the event to its batch's ``asyncio.Queue`` with
``call_soon_threadsafe`` (it never blocks and never raises into the loop). ``submit``,
``cancel`` and ``metrics`` are the only calls made on the loop from this side.

One HTTP request is a ``_Batch`` of sequences: ``n`` choices of each of its prompts,
each submitted to the loop as a request of its own, choice ``j`` of prompt ``i`` at
index ``i * n + j``; their events arrive, interleaved, on the batch's one queue.

Cancellation: every batch has a task listening for the client's
``http.disconnect``; a client that goes away (streaming or not, admitted or still
queued) has every sequence of its batch ``cancel``-ed at once, and the loop frees
their slots on every stage. A stream whose writer is cancelled (Starlette does it on
disconnect) cancels too, and so does the failure of one sequence of a batch (the
others would be thrown away).

Failure: when the loop stops with an error (a rank was lost), every request still
waiting gets an error (HTTP 503, or an error event in a stream), ``/health`` turns 503,
and after ``failed_linger_s`` the server shuts down and the process exits with the
error (status 2), as ``adadecode generate`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from adadecode.runtime.params import MAX_SEED
from adadecode.runtime.sampling import SamplingParams
from adadecode.runtime.serving import (
    Finished,
    QueueFull,
    Request,
    RequestTooLong,
    ServingLoop,
    ServingStopped,
    TextDelta,
)
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from .logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, completion_logprobs, text_length
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .openai_api import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    check_supported,
    choice_seed,
    describe_validation_error,
    finish_reason,
    new_id,
    now,
)

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine

log = logging.getLogger("adadecode.server")

T = TypeVar("T")
IGNORED_HEADER = "X-Adadecode-Ignored-Fields"


@dataclass(frozen=True)
class ServeDefaults:
    """What the server needs before the model is loaded, and each request's defaults."""

    model_name: str  # served_model_name, or the model source
    max_tokens: int  # decoding.max_new_tokens: a request without max_tokens, capped to what fits
    early_exit: str = "off"  # decoding.early_exit
    stop: tuple[str, ...] = ()  # decoding.stop: a request without `stop`
    # the sampling section: each field a request leaves out
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_seq_len: int = 2048  # model.max_seq_len, for /v1/models and the body size limit
    failed_linger_s: float = 5.0  # after a rank is lost: keep answering 503 this long, then exit
    api_key: str = ""  # serve.api_key / ADADECODE_API_KEY: every route but /health needs it; empty: none
    metrics_public: bool = False  # serve.metrics_public: /metrics answers without the key


class Frontend:
    """The bridge between HTTP requests (asyncio) and the ``ServingLoop`` (its own thread)."""

    def __init__(self, defaults: ServeDefaults):
        self.defaults = defaults
        self.engine = None
        self.loop = None  # the ServingLoop, once the model has loaded
        self.state = "loading"  # loading -> ready -> failed | stopping
        self.error: str | None = None
        self.metrics = ServerMetrics(lambda: self.loop.metrics() if self.loop is not None else None)
        self.done = threading.Event()  # set when serving must end: a signal, or a lost rank
        self._outstanding: dict[int, _Submission] = {}
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="adadecode-tokenize")
        self._encoding = 0  # requests admitted to the tokenizer and not yet submitted

    # --- main thread ------------------------------------------------------------------------

    def attach(self, engine: Engine, loop: ServingLoop) -> None:
        """Serve with ``engine`` through the started ``loop``: /health turns 200."""
        self.engine, self.loop = engine, loop
        self.metrics.serving_started()
        self.state = "ready"

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests, end every request in flight, stop the loop."""
        if self.state == "ready":
            self.state = "stopping"
            self.error = reason
        if self.loop is not None:
            for sub in list(self._outstanding.values()):
                self.loop.cancel(sub.rid)
            self.loop.stop()
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # --- asyncio thread ---------------------------------------------------------------------

    def health(self) -> ApiError | None:
        """None when every rank is up and the loop serves; else the 503 to answer."""
        if self.state == "loading":
            return ApiError(503, "the model is still loading; retry when GET /health answers 200")
        if self.state == "ready" and self.loop.healthy:
            return None
        return ApiError(503, f"not serving: {self.error or self.loop.error or 'the serving loop stopped'}")

    async def watch(self) -> None:
        """Notice a loop that stopped with an error (a lost rank): fail what waits, then end serving."""
        while True:
            await asyncio.sleep(0.2)
            if self.state == "ready" and not self.loop.healthy:
                self.state, self.error = "failed", self.loop.error or "the serving loop stopped"
                log.error("serving stopped: %s", self.error)
                # The loop fails the requests it admitted; queued ones are ended here.
                for sub in list(self._outstanding.values()):
                    sub.fail(self.error)
                await asyncio.sleep(self.defaults.failed_linger_s)
                self.done.set()
                return

    async def encode(self, fn: Callable[[], T]) -> T:
        """Tokenize on the tokenizer thread, once the request is admitted: a full server
        answers 429 before any work, so a burst cannot build an unbounded tokenizer backlog."""
        if (refused := self.health()) is not None:
            raise refused
        waiting, limit = self.loop.num_waiting, self.loop.max_queue
        if self._encoding + waiting >= limit:
            raise ApiError(429, f"the server is busy: {waiting} requests are waiting for a slot and "
                                f"{self._encoding} are being tokenized (serve.max_queue = {limit}); "
                                "try again later", None, "queue_full")
        self._encoding += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer, fn)
        finally:
            self._encoding -= 1

    def check_batch(self, size: int, param: str) -> None:
        """Refuse a request of ``size`` sequences (n x prompts) that the queue could never hold
        (HTTP 400), before any tokenizing."""
        if (refused := self.health()) is not None:
            raise refused
        if size > self.loop.max_queue:
            raise ApiError(400, f"this request asks for {size} sequences (n x prompts) but the server queues at "
                                f"most {self.loop.max_queue} (serve.max_queue); send fewer choices or prompts", param)

    async def submit(self, requests: list[Request], http: HttpRequest, names: list[str] | None = None) -> _Batch:
        """Queue every one of ``requests`` (one HTTP request's sequences), or none of them:
        raise ``ApiError`` when one is refused. ``names``: what to call each in an error."""
        if (refused := self.health()) is not None:
            raise refused
        waiting, limit = self.loop.num_waiting, self.loop.max_queue
        if waiting + len(requests) > limit:  # all submissions come from this thread: the queue only shrinks
            raise ApiError(429, f"the server is busy: {waiting} requests are waiting for a slot and this one needs "
                                f"{len(requests)} places (serve.max_queue = {limit}); try again later",
                           None, "queue_full")
        batch = _Batch(self, asyncio.get_running_loop())
        try:
            for i, request in enumerate(requests):
                try:
                    batch.add(self.loop.submit(request, batch.on_event(i)))
                except (ValueError, QueueFull, ServingStopped) as e:
                    raise _refusal(e, names[i] if names else None) from None
        except BaseException:
            batch.close()
            raise
        batch.watcher = asyncio.create_task(_cancel_on_disconnect(http, batch))
        return batch


def _refusal(e: Exception, name: str | None) -> ApiError:
    """The HTTP error for the loop's refusal of one sequence (``name``: which one, when there are several)."""
    message = f"{name}: {e}" if name else str(e)
    if isinstance(e, RequestTooLong):
        return ApiError(400, message, "max_tokens", "context_length_exceeded")
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy: {e}", None, "queue_full")
    if isinstance(e, ServingStopped):
        return ApiError(503, f"not serving: {e}")
    param = next((p for p in ("early_exit", "min_tokens", "max_tokens", "prompt") if p in str(e)), None)
    return ApiError(400, message, param)


class _Batch:
    """The sequences of one HTTP request, as the asyncio side sees them: their events, each
    tagged with its choice index, interleaved in arrival order on one queue."""

    def __init__(self, frontend: Frontend, aio: asyncio.AbstractEventLoop):
        self.frontend, self.aio = frontend, aio
        self.queue: asyncio.Queue = asyncio.Queue()
        self.subs: list[_Submission] = []
        self.watcher: asyncio.Task | None = None
        self.closed = False

    def on_event(self, index: int) -> Callable[[object], None]:
        """The loop's callback for choice ``index``: called on the serving thread, it stamps and
        hands over, and never raises."""

        def on_event(event) -> None:
            t = time.monotonic()
            try:
                self.aio.call_soon_threadsafe(self.queue.put_nowait, (t, index, event))
            except RuntimeError:  # the event loop has closed: nobody waits for this request any more
                pass

        return on_event

    def add(self, rid: int) -> None:
        sub = _Submission(self, len(self.subs), rid)
        self.subs.append(sub)
        self.frontend._outstanding[rid] = sub

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """``(index, TextDelta)`` ... ``(index, Finished)`` of every choice, interleaved; ends
        after the last ``Finished``. Observes the latency histograms."""
        remaining = len(self.subs)
        while remaining:
            t, index, event = await self.queue.get()
            self.subs[index].observe(t, event)
            remaining -= isinstance(event, Finished)
            yield index, event

    def close(self) -> None:
        """The response is over: stop watching the client; cancel every sequence not ended."""
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        for sub in self.subs:
            sub.close()


class _Submission:
    """One sequence of a batch: its id in the loop, and its latency observations."""

    def __init__(self, batch: _Batch, index: int, rid: int):
        self.batch, self.index, self.rid = batch, index, rid
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.finished = False

    def observe(self, t: float, event) -> None:
        m = self.batch.frontend.metrics
        if isinstance(event, TextDelta):
            if self.first is None:
                self.first = t
                m.ttft.observe(t - self.arrival)
            else:
                m.itl.observe(t - self.last)
            self.last = t
            return
        self.finished = True
        self.batch.frontend._outstanding.pop(self.rid, None)  # ended: nothing left to cancel or fail
        if event.reason not in ("failed", "cancelled"):
            m.e2e.observe(t - self.arrival)
            if self.first is not None and event.completion_tokens > 1:
                m.tpot.observe((t - self.first) / (event.completion_tokens - 1))

    def fail(self, error: str) -> None:
        """End the sequence from the asyncio side (the loop stopped without reporting it)."""
        event = Finished(self.rid, "failed", 0, 0, "", error)
        self.batch.queue.put_nowait((time.monotonic(), self.index, event))

    def close(self) -> None:
        """Cancel the sequence if it has not ended."""
        frontend = self.batch.frontend
        if frontend._outstanding.pop(self.rid, None) is not None and frontend.loop is not None:
            frontend.loop.cancel(self.rid)


async def _cancel_on_disconnect(http: HttpRequest, batch: _Batch) -> None:
    """Wait for the client to go away (the body was read already); then cancel its sequences."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    if not all(sub.finished for sub in batch.subs):
        log.info("client of request %s went away: cancelled", ", ".join(str(sub.rid) for sub in batch.subs))
        batch.close()


# ------------------------------------------------------------------------------ the app


def build_app(frontend: Frontend) -> FastAPI:
    """The FastAPI app: routes, OpenAI-shaped errors, a request body limit."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(frontend.watch())
        try:
            yield
        finally:
            watcher.cancel()

    app = FastAPI(title="adadecode", summary="OpenAI-compatible serving with verified early exit",
                  lifespan=lifespan)
    d = frontend.defaults
    app.add_middleware(BodyLimit, max_bytes=max(1 << 20, 64 * d.max_seq_len))
    if d.api_key:  # added last: the outermost layer, so nothing runs for a request without the key
        public = ("/health", "/metrics") if d.metrics_public else ("/health",)
        app.add_middleware(ApiKeyAuth, key=d.api_key, public=public,
                           on_refused=lambda: frontend.metrics.rejected.labels("401").inc())

    def error_response(e: ApiError) -> JSONResponse:
        if e.status >= 400:
            frontend.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error_response(describe_validation_error(list(e.errors()), request.url.path))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        message = str(e.detail)
        if e.status_code in (404, 405):
            message = (f"no route {request.method} {request.url.path}: this server answers POST /v1/completions, "
                       "POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics")
        return error_response(ApiError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.error("internal error on %s", request.url.path, exc_info=e)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health():
        refused = frontend.health()
        return error_response(refused) if refused else {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        max_len = frontend.engine.max_seq_len if frontend.engine is not None else d.max_seq_len
        return ModelList(data=[ModelCard(id=d.model_name, created=now(), max_model_len=max_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(_json_body)])
    async def completions(body: CompletionRequest, http: HttpRequest, response: Response):
        _check_model(body.model, d.model_name)
        check_supported(body)
        engine = _engine(frontend)
        prompts, n = body.prompts(), body.choices()
        frontend.check_batch(len(prompts) * n, "n" if n > 1 else "prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await frontend.encode(lambda: [engine.encode(p) for p in texts]) if texts else [])
        where = (lambda i: f"prompt[{i}]") if len(prompts) > 1 else (lambda i: "prompt")
        ids = [next(encoded) if isinstance(p, str) else _token_ids(p, engine.args.vocab_size, where(i))
               for i, p in enumerate(prompts)]
        batch = await _submit(frontend, body, ids, body.max_tokens, http, where if len(prompts) > 1 else None)
        rid, created, headers = new_id("cmpl"), now(), _ignored(body)
        texts = TokenTexts(engine._decode)
        echoed = [p if isinstance(p, str) else engine._decode(p) for p in prompts] if body.echo else []
        offsets = [0] * (len(prompts) * n)  # a stream's text offset of each choice so far

        def echo(i: int, prompt_lps) -> tuple[str, CompletionLogprobs | None]:
            """Choice ``i``'s prompt text and, with logprobs, the prompt's (its first token has none)."""
            if body.logprobs is None:
                return echoed[i // n], None
            return echoed[i // n], completion_logprobs(texts, [ids[i // n][0], *prompt_lps])

        def chunk(i: int, text: str, reason: str | None = None, usage: Usage | None = None, lps=None,
                  prompt_lps=None) -> str:
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(texts, lps or [], offsets[i])
                offsets[i] = text_length(logprobs) or offsets[i]
            if prompt_lps is not None:  # echo: the prompt first, in the choice's first chunk
                prompt_text, prompt_logprobs = echo(i, prompt_lps)
                text = prompt_text + text
                if prompt_logprobs is not None and logprobs is not None:
                    logprobs = _joined(prompt_logprobs, logprobs)
                    offsets[i] = text_length(logprobs)
            choice = CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reason)
            return _sse(CompletionResponse(id=rid, created=created, model=d.model_name, choices=[choice], usage=usage))

        def usage_chunk(usage: Usage) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=d.model_name, choices=[], usage=usage)

        if body.stream:
            return _stream(batch, chunk, final=lambda i, reason, usage, lps: chunk(i, "", reason, usage, lps),
                           usage_chunk=usage_chunk if body.include_usage() else None,
                           continuous=body.continuous_usage(), prompt_tokens=_per_choice(ids, n), n=n,
                           headers=headers, echo=body.echo)
        outs = await _collect(batch, frontend)
        response.headers.update(headers)
        choices = []
        for i, out in enumerate(outs):
            text, logprobs = out.text, None
            if body.logprobs is not None:
                logprobs = completion_logprobs(texts, out.logprobs)
            if body.echo:
                prompt_text, prompt_logprobs = echo(i, out.prompt_logprobs)
                text = prompt_text + text
                if prompt_logprobs is not None and logprobs is not None:
                    logprobs = _joined(prompt_logprobs, logprobs)
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                            finish_reason=finish_reason(out.end.reason)))
        return CompletionResponse(id=rid, created=created, model=d.model_name, choices=choices, usage=_usage(outs, n))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(_json_body)])
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest, response: Response):
        _check_model(body.model, d.model_name)
        check_supported(body)
        engine = _engine(frontend)
        n = body.choices()
        frontend.check_batch(n, "n")
        messages = body.chat_messages()
        try:
            ids = await frontend.encode(lambda: engine.encode(messages, chat=True))
        except ValueError as e:  # no chat template
            raise ApiError(400, f"{e}; use /v1/completions", "messages") from None
        except TemplateError as e:  # the template refused these messages (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        batch = await _submit(frontend, body, [ids], body.requested_max_tokens(), http)
        rid, created, headers = new_id("chatcmpl"), now(), _ignored(body)

        texts = TokenTexts(engine._decode)

        def chunk(i: int, text: str | None, reason: str | None = None, usage: Usage | None = None,
                  lps=None, role: bool = False) -> str:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            logprobs = chat_logprobs(texts, lps) if body.logprobs and not role else None
            choice = ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=reason)
            return _sse(ChatCompletionChunk(id=rid, created=created, model=d.model_name, choices=[choice], usage=usage))

        def usage_chunk(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=d.model_name, choices=[], usage=usage)

        if body.stream:
            return _stream(batch, chunk, final=lambda i, reason, usage, lps: chunk(i, None, reason, usage, lps),
                           opening=lambda i, usage: chunk(i, "", None, usage, role=True),
                           usage_chunk=usage_chunk if body.include_usage() else None,
                           continuous=body.continuous_usage(), prompt_tokens=_per_choice([ids], n), n=n,
                           headers=headers)
        outs = await _collect(batch, frontend)
        response.headers.update(headers)
        return ChatCompletionResponse(
            id=rid, created=created, model=d.model_name,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=out.text),
                                logprobs=chat_logprobs(texts, out.logprobs) if body.logprobs else None,
                                finish_reason=finish_reason(out.end.reason)) for i, out in enumerate(outs)],
            usage=_usage(outs, n),
        )

    return app


def _json_body(http: HttpRequest) -> None:
    kind = http.headers.get("content-type", "no Content-Type").split(";")[0].strip().lower()
    if kind != "application/json":  # FastAPI reads no JSON from a body that does not say it is JSON
        raise ApiError(415, f"the request body is sent as `{kind}`; send JSON with `Content-Type: application/json`")


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ApiError(404, f"the model `{model}` does not exist: this server serves `{served}` (GET /v1/models)",
                       "model", "model_not_found")


def _engine(frontend: Frontend):
    if (refused := frontend.health()) is not None:
        raise refused
    return frontend.engine


def _token_ids(prompt: list[int], vocab_size: int, where: str = "prompt") -> list[int]:
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"`{where}`: token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    return list(prompt)


def _ignored(body) -> dict[str, str]:
    """The response header naming the fields of ``body`` that were accepted and ignored, if any."""
    names = body.ignored_fields()
    return {IGNORED_HEADER: ", ".join(names)} if names else {}


async def _submit(frontend: Frontend, body, prompts: list[list[int]], max_tokens: int | None, http: HttpRequest,
                  where: Callable[[int], str] | None = None) -> _Batch:
    """Submit ``n`` choices of each prompt, prompt-major (choice j of prompt i at index i * n + j)."""
    n = body.choices()
    sampling = _sampling(body, frontend.defaults.sampling)
    if sampling is not None and choice_seed(sampling.seed, n - 1) > MAX_SEED:
        raise ApiError(400, f"`seed` = {sampling.seed} with n = {n}: choice j samples with the seed seed + j, and "
                            f"the last one is past {MAX_SEED}; send a smaller seed", "seed")
    requests = [_request(body, ids, max_tokens, frontend, sampling, j, where(i) if where else "prompt")
                for i, ids in enumerate(prompts) for j in range(n)]
    names = [where(k // n) for k in range(len(requests))] if where else None
    return await frontend.submit(requests, http, names)


def _per_choice(prompts: list[list[int]], n: int) -> list[int]:
    """The prompt tokens of each choice index."""
    return [len(ids) for ids in prompts for _ in range(n)]


def _usage(outs: list[_Output], n: int) -> Usage:
    """Every choice's tokens, and each prompt's once (as vLLM and OpenAI count n > 1)."""
    return Usage.of(sum(o.end.prompt_tokens for o in outs[::n]), sum(o.end.completion_tokens for o in outs))


def _joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """``then``'s tokens after ``first``'s, their text offsets moved past ``first``'s text."""
    shift = text_length(first) - (then.text_offset[0] if then.text_offset else 0)
    return CompletionLogprobs(tokens=first.tokens + then.tokens,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              top_logprobs=first.top_logprobs + then.top_logprobs,
                              text_offset=first.text_offset + [o + shift for o in then.text_offset])


def _request(body, ids: list[int], max_tokens: int | None, frontend: Frontend, sampling: SamplingParams | None,
             choice: int = 0, where: str = "prompt") -> Request:
    """The loop's request for choice ``choice`` of the prompt ``ids``: the body's fields, the
    server's defaults where the body has none; ``sampling``: the request's (``_sampling``)."""
    d, max_len = frontend.defaults, frontend.engine.max_seq_len
    if max_tokens == 0 and not getattr(body, "echo", False):
        raise ApiError(400, "`max_tokens` must be >= 1, got 0 (0 is for echo: the prompt, and its log "
                            "probabilities with logprobs, without decoding)", "max_tokens")
    if max_tokens is None:  # as much as the default allows and the cache holds
        if len(ids) >= max_len:
            param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            raise ApiError(400, f"the {where} ({len(ids)} tokens) leaves no room for output in the KV cache "
                                f"({max_len} positions); shorten it", param, "context_length_exceeded")
        max_tokens = min(d.max_tokens, max_len - len(ids))
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"`min_tokens` = {body.min_tokens} is more than the {max_tokens} tokens the {where} "
                                "may have (max_tokens absent: the server's default, capped to the cache); send "
                                "max_tokens too", "min_tokens")
    elif body.min_tokens > max_tokens:
        raise ApiError(400, f"`min_tokens` = {body.min_tokens} is more than max_tokens ({max_tokens}); send at most "
                            "max_tokens", "min_tokens")
    stop = body.stop_strings()
    vocab = frontend.engine.args.vocab_size
    if body.top_k is not None and body.top_k > vocab:
        raise ApiError(400, f"`top_k` = {body.top_k} is larger than the vocabulary ({vocab} tokens); "
                            "send at most the vocabulary size, or 0 to keep every token", "top_k")
    if sampling is not None and choice:
        sampling = dataclasses.replace(sampling, seed=choice_seed(sampling.seed, choice))
    return Request(tuple(ids), max_tokens, stop=d.stop if stop is None else stop,
                   early_exit=body.early_exit or d.early_exit, sampling=sampling,
                   min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)


# request field -> SamplingParams field
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "seed": "seed", "sampling_mode": "mode", "repetition_penalty": "repetition_penalty",
                    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def _sampling(body, default: SamplingParams) -> SamplingParams | None:
    """The request's sampling: its own fields over the server's, and the log probabilities it asks
    for; None when that is plain greedy decoding."""
    given = {
        ours: getattr(body, theirs) for theirs, ours in _SAMPLING_FIELDS.items() if getattr(body, theirs) is not None
    }
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
    else:  # echo with logprobs: the prompt's too; max_tokens 0: the prefill is all that runs
        logprobs = body.logprobs
        prompt_logprobs = (logprobs or 0) if body.echo and (logprobs is not None or body.max_tokens == 0) else None
    try:
        params = dataclasses.replace(default, **given, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as e:  # it names the parameter (sampling_mode is checked by its schema already)
        param = next((theirs for theirs, ours in _SAMPLING_FIELDS.items() if f"parameter {ours} =" in str(e)), None)
        raise ApiError(400, str(e).replace("parameter mode =", "parameter sampling_mode ="), param) from None
    return None if params.plain_greedy else params


def _end_error(end: Finished, frontend: Frontend) -> ApiError:
    if end.reason == "failed":
        status = 500 if frontend.health() is None else 503
        return ApiError(status, f"the request failed: {end.error}")
    return ApiError(503, f"the request was cancelled: {frontend.error or 'the server is shutting down'}")


@dataclass
class _Output:
    """One choice, collected: its text, end, and log probabilities (when asked for)."""

    text: str
    end: Finished
    logprobs: list = field(default_factory=list)  # TokenLogprobs per output token
    prompt_logprobs: tuple = ()  # the prompt's tokens 1 ..


async def _collect(batch: _Batch, frontend: Frontend) -> list[_Output]:
    """Every choice's text, end and log probabilities, by index; the first failed or cancelled
    one fails the request (and cancels the rest)."""
    parts: list[list[str]] = [[] for _ in batch.subs]
    logprobs: list[list] = [[] for _ in batch.subs]
    prompt: dict[int, tuple] = {}
    ends: dict[int, Finished] = {}
    try:
        async for i, event in batch.events():
            parts[i].append(event.text)
            if isinstance(event, Finished):
                if event.reason in ("failed", "cancelled"):
                    raise _end_error(event, frontend)
                ends[i] = event
            else:
                logprobs[i].extend(event.logprobs)
                prompt[i] = prompt.get(i) or event.prompt_logprobs
    finally:
        batch.close()
    return [_Output("".join(p), ends[i], logprobs[i], prompt.get(i, ())) for i, p in enumerate(parts)]


def _stream(batch: _Batch, chunk: Callable[..., str], *, final: Callable[[int, str, Usage | None, list], str],
            opening: Callable[[int, Usage | None], str] | None = None,
            usage_chunk: Callable[[Usage], object] | None = None, continuous: bool = False,
            prompt_tokens: list[int], n: int, headers: dict[str, str], echo: bool = False) -> StreamingResponse:
    """Server-sent events, the choices interleaved as their tokens come, each chunk naming its
    choice's ``index``: ``opening`` of each choice (chat: the role), ``chunk`` per text delta, the
    ``final`` chunk of each choice with its finish reason, the usage of all
    (stream_options.include_usage), then ``data: [DONE]``. With ``continuous``
    (stream_options.continuous_usage_stats) every chunk carries its choice's usage so far. Log
    probabilities go with the chunk that carries their tokens' text (held-back text: a later one,
    at the latest the final); with ``echo`` the first chunk of each choice starts with the prompt
    (``chunk``'s ``prompt_lps``). A request that fails mid-stream ends with an error event, then
    ``data: [DONE]``."""

    async def events():
        used = [0] * len(prompt_tokens)  # completion tokens of each choice so far
        held: list[list] = [[] for _ in prompt_tokens]  # log probabilities not sent yet
        echoing = [echo] * len(prompt_tokens)  # the prompt not sent yet

        def usage(i: int) -> Usage | None:
            return Usage.of(prompt_tokens[i], used[i]) if continuous else None

        def text_chunk(i: int, text: str, prompt_lps=()) -> str:
            lps, held[i] = held[i], []
            if echoing[i]:
                echoing[i] = False
                return chunk(i, text, None, usage(i), lps, prompt_lps)
            return chunk(i, text, None, usage(i), lps)

        try:
            if opening is not None:
                for i in range(len(used)):
                    yield opening(i, usage(i))
            async for i, event in batch.events():
                if isinstance(event, TextDelta):
                    used[i] += len(event.tokens)
                    held[i].extend(event.logprobs)
                    if event.text or echoing[i]:  # text may be held back: a partial character, a stop string
                        yield text_chunk(i, event.text, event.prompt_logprobs)
                    continue
                if event.reason in ("failed", "cancelled"):
                    yield f"data: {json.dumps(_end_error(event, batch.frontend).body(), ensure_ascii=False)}\n\n"
                    break
                used[i] = event.completion_tokens
                if event.text or echoing[i]:
                    yield text_chunk(i, event.text)
                lps, held[i] = held[i], []
                yield final(i, finish_reason(event.reason), usage(i), lps)
            else:
                if usage_chunk is not None:
                    yield _sse(usage_chunk(Usage.of(sum(prompt_tokens[::n]), sum(used))))
            yield "data: [DONE]\n\n"
        finally:
            batch.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class ApiKeyAuth:
    """Refuse every request without ``Authorization: Bearer <key>`` (HTTP 401), except on the
    ``public`` paths. The comparison takes the same time wherever the first wrong byte is."""

    def __init__(self, app, key: str, public: tuple[str, ...], on_refused: Callable[[], None] = lambda: None):
        self.app, self.public, self.on_refused = app, public, on_refused
        self.expected = b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        given = b"".join(v for k, v in scope.get("headers") or () if k == b"authorization")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.on_refused()
        message = ("a valid API key is required: send the header `Authorization: Bearer <key>` with the key "
                   "this server was started with (serve.api_key / ADADECODE_API_KEY)")
        response = JSONResponse(ApiError(401, message, None, "invalid_api_key").body(), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (HTTP 413) before they are read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        message = (f"the request body is over {self.max_bytes} bytes, the limit of this server "
                   "(64 bytes per KV cache position, at least 1 MiB); send a shorter prompt")
        if length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse(ApiError(413, message).body(), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)
