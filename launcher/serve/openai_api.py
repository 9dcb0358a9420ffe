"""The OpenAI API as `adadecode serve` speaks it: request and response schemas, and errors.

Pydantic models for ``POST /v1/completions``, ``POST /v1/chat/completions`` and
``GET /v1/models``, shaped like OpenAI's (and vLLM's). The rule for fields
(docs/serving.md#request-fields):

- a field that would change the output and that adadecode does not do (``suffix``,
  tools, ``logit_bias``, ...: ``UNSUPPORTED``) is refused by ``check_supported``
  with a message naming the field and what to send instead; its neutral value
  (``logit_bias: {}``) is accepted;
- a field that cannot change the output (``user``, ``metadata``, ``store``, ...:
  ``IGNORED``) is accepted whatever its value and named in the response header
  ``X-Adadecode-Ignored-Fields`` (``ignored_fields``);
- an unknown field is refused (HTTP 400 naming it): what it would do is unknown;
- types are not coerced (``"max_tokens": "5"`` is an error, as in OpenAI's API).

``n`` choices of each prompt, and a list of prompts on /v1/completions, are decoded as
``n`` x prompts sequences, choice ``j`` of prompt ``i`` at index ``i * n + j``; sampled
choice ``j`` uses the seed ``seed + j`` (``choice_seed``), as vLLM derives it.

Sampling: ``temperature``, ``top_p``, ``seed``, ``presence_penalty`` and
``frequency_penalty``, with the extensions ``top_k``, ``min_p``, ``repetition_penalty``
(vLLM's) and ``sampling_mode`` (seeded, speculative); each absent field takes the
server's ``sampling`` section (temperature 0, greedy, by default; no penalty).

Log probabilities: ``logprobs: k`` (/v1/completions) and ``logprobs: true`` with
``top_logprobs: k`` (chat), of the final layer's raw distribution (launcher/serve/logprobs.py);
``echo`` (/v1/completions) returns the prompt before the output and, with ``logprobs``, the
prompt's log probabilities from its prefill; ``max_tokens: 0`` with ``echo`` decodes nothing.

Extensions (top-level fields; the ``openai`` client sends them with ``extra_body``):
``early_exit`` (off, eager, deferred; default: the server's ``decoding.early_exit``),
vLLM's ``ignore_eos`` and ``min_tokens`` (they act on verified tokens, in
runtime/stopping.py) and ``stream_options.continuous_usage_stats``; and
``early_exit_thresholds`` (refused: per-request thresholds are not supported by the
runtime yet; the server's ``decoding.thresholds`` apply).

No decoding logic lives here: launcher/serve/app.py turns a validated request into
a ``runtime.serving.Request``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from adadecode.runtime.params import MAX_LOGPROBS
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .logprobs import ChatLogprobs, CompletionLogprobs

EarlyExit = Literal["off", "eager", "deferred"]

# Each verified token is checked against every stop string on the serving thread: bounded, as
# OpenAI bounds them (4), with room for the lists that chat templates' stop words need.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        message, param = printable(message, 4000), None if param is None else printable(param, 200)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        error = ErrorInfo(message=self.message, type=kind,
                          param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def printable(text: str, limit: int) -> str:
    """``text`` safe to echo in an error: lone surrogates and other unencodable characters
    escaped (``\\ud800``), so the UTF-8 response can always be written, and cut to ``limit``."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in a parsed JSON body that is not valid Unicode text (a
    lone surrogate such as ``"\\ud800"``, which JSON can spell but UTF-8 cannot encode)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the request body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _first_surrogate(key) is not None:
            return f"{path}.<key>" if path else "<key>"
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        if (found := _first_surrogate(item, where)) is not None:
            return found
    return None


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one last chunk with the request's usage (and no choices) before ``data: [DONE]``."""
    continuous_usage_stats: bool = False
    """Extension (as in vLLM): every chunk with a choice carries that choice's usage so far."""


class _GenerationRequest(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    """The served model's name (GET /v1/models); absent: the served model."""
    max_tokens: int | None = None
    """Most tokens to generate; absent: the server's decoding.max_new_tokens, capped to what fits the cache."""
    stop: str | list[str] | None = None
    """Stop string(s): the output ends before the first one (finish_reason `stop`)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    """Seed of the sampling noise: the token at position p depends on (seed, p) only; absent: sampling.seed."""
    temperature: float | None = None
    """0: greedy decoding; absent: the server's sampling.temperature (default 0, unlike OpenAI's 1)."""
    top_p: float | None = None
    """Nucleus sampling, in (0, 1]; absent: sampling.top_p."""
    top_k: int | None = None
    """Extension (as in vLLM): keep the k most likely tokens, 0: off; absent: sampling.top_k."""
    min_p: float | None = None
    """Extension (as in vLLM): keep tokens at least min_p times as likely as the top one; absent: sampling.min_p."""
    sampling_mode: Literal["seeded", "speculative"] | None = None
    """Extension: seeded (same tokens with early exit on or off) or speculative; absent: sampling.mode."""
    n: int | None = Field(default=None, ge=1)
    """Choices of each prompt, each its own sequence; sampled choice j uses the seed seed + j."""
    ignore_eos: bool = False
    """Extension (as in vLLM): EOS is an ordinary token; the output runs to max_tokens (or a stop string)."""
    min_tokens: int = Field(default=0, ge=0)
    """Extension (as in vLLM): EOS and stop strings do not end the output before this many tokens."""
    frequency_penalty: float | None = None
    """Subtracted from a token's logit per occurrence in the output, in [-2, 2]; absent: sampling.frequency_penalty."""
    presence_penalty: float | None = None
    """Subtracted from the logit of every token present in the output, in [-2, 2]; absent: sampling.presence_penalty."""
    repetition_penalty: float | None = None
    """Extension (as in vLLM): divides positive logits (multiplies negative ones) of prompt and output tokens."""
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    use_beam_search: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # Ignored (IGNORED): they cannot change the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    request_id: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    early_exit: EarlyExit | None = None
    """Extension: early exit for this request (off, eager, deferred); absent: the server's default."""
    early_exit_thresholds: Any = None
    """Extension, refused: per-request thresholds are not supported by the runtime yet."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        if (where := _first_surrogate(data)) is not None:
            raise ValueError(f"`{where}` holds a lone surrogate, which is not text; send valid Unicode (UTF-8)")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return v
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty (an empty one would stop at once)")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS} are accepted")
        if (longest := max(len(s) for s in stops)) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string of {longest} characters; at most {MAX_STOP_CHARS} are accepted")
        return v

    def stop_strings(self) -> tuple[str, ...] | None:
        """The request's stop strings; None when the field is absent (the server's default applies)."""
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def ignored_fields(self) -> list[str]:
        """The fields of this request that the server accepts and ignores, in the order of ``IGNORED``."""
        return [name for name in IGNORED if name in self.model_fields_set]


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: Any = Field(...)
    """A string, a list of token ids, or a list of prompts (strings or lists of token ids)."""
    echo: bool = False
    """Return the prompt before the output (with logprobs: the prompt's log probabilities too)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each output token's log probability and this many most likely alternatives."""
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _prompts(v)

    def prompts(self) -> list[str | list[int]]:
        return self.prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; give one of the two."""
    logprobs: bool = False
    """Each output token's log probability (choices[i].logprobs.content)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With logprobs: this many most likely alternatives of each token."""
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    # Ignored (IGNORED): they cannot change the output.
    parallel_tool_calls: bool | None = None
    prediction: Any = None

    def chat_messages(self) -> list[dict]:
        """The messages as the tokenizer's chat template takes them."""
        out = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text()}
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out

    def requested_max_tokens(self) -> int | None:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ApiError(400, f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one of them",
                           "max_completion_tokens")
        return a if a is not None else b


def _is_token_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(v) -> list:
    """The completions prompts, as OpenAI takes them: a string, a list of token ids, or a
    non-empty list of prompts, each a string or a list of token ids."""
    if isinstance(v, str) or _is_token_ids(v):
        return [v]
    if isinstance(v, list) and v and all(isinstance(p, str) or isinstance(p, list) for p in v):
        bad = next((i for i, p in enumerate(v) if not (isinstance(p, str) or _is_token_ids(p))), None)
        if bad is None:
            return v
        raise ValueError(f"prompt {bad} of the list is not a string or a non-empty list of token ids (integers)")
    raise ValueError("expected a string, a non-empty list of token ids (integers), or a list of such prompts")


# Fields accepted whatever their value, and ignored: they cannot change the output. A response
# to a request that sends any names them in the header X-Adadecode-Ignored-Fields.
IGNORED = ("user", "metadata", "store", "service_tier", "request_id", "prompt_cache_key", "safety_identifier",
           "parallel_tool_calls", "prediction")

# What a refused field means, and which of its values are neutral (accepted, since they change nothing).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "suffix": (lambda v: v is None, "insertion (suffix) is not supported; leave it out"),
    "logit_bias": (lambda v: not v, "logit bias is not supported; leave it out"),
    "use_beam_search": (lambda v: not v, "beam search is not supported; leave use_beam_search out"),
    "stop_token_ids": (lambda v: not v, "stop token ids are not supported (EOS and stop strings are); leave it out"),
    "include_stop_str_in_output": (lambda v: not v, "stop strings are never output; leave it out"),
    "skip_special_tokens": (lambda v: v is None or v is True,
                            "special tokens are always skipped in the text; leave skip_special_tokens out"),
    "early_exit_thresholds": (lambda v: v is None, (
        "per-request thresholds are not supported by the runtime yet (the server's decoding.thresholds apply); "
        "leave the field out")),
    "tools": (lambda v: v is None, "tool calling is not supported; leave tools out"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not supported; leave tool_choice out"),
    "functions": (lambda v: v is None, "function calling is not supported; leave functions out"),
    "function_call": (lambda v: v is None or v == "none", "function calling is not supported; leave it out"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "structured output (JSON mode, schemas) is not supported; leave response_format out"),
    "modalities": (lambda v: v is None or v == ["text"], "text is the only output modality; leave modalities out"),
    "audio": (lambda v: v is None, "audio output is not supported; leave it out"),
    "reasoning_effort": (lambda v: v is None, "reasoning effort is not supported; leave it out"),
}


def check_supported(request: _GenerationRequest) -> None:
    """Raise ``ApiError(400)`` naming the first field this server does not honour."""
    for name, (neutral, why) in UNSUPPORTED.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if not neutral(value):
                raise ApiError(400, f"`{name}` = {_show(value)} is not supported: {why}", name)
    if request.best_of is not None and request.best_of != request.choices():
        raise ApiError(400, f"`best_of` = {request.best_of} is not supported: every candidate decoded is returned; "
                            "leave best_of out (or send it equal to n)", "best_of")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "`top_logprobs` needs `logprobs: true`; send both", "top_logprobs")


def choice_seed(seed: int, choice: int) -> int:
    """The sampling seed of choice ``choice`` (0-based) of a prompt whose request has ``seed``;
    a request with n = 1 and this seed gives the same choice alone (vLLM derives it so)."""
    return seed + choice


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(errors: list[dict], endpoint: str) -> ApiError:
    """The first of pydantic's (or FastAPI's) validation errors as one OpenAI-style 400.

    A field with several accepted types (``stop``: a string or a list) fails once per type;
    the deepest of those errors is the one that says what is wrong.
    """
    if not errors:
        return ApiError(400, f"invalid request to {endpoint}")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed JSON")
        return ApiError(400, f"the request body is not valid JSON ({detail}); send a JSON object", None, "invalid_json")
    fields = [[p for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)] for e in errors]
    if not fields[0]:
        if first.get("type") == "missing":
            return ApiError(400, f"the request has no body; send a JSON object to {endpoint}")
        if first.get("type") == "value_error":  # a check of the whole body (text that is not Unicode)
            return ApiError(400, str(first.get("msg", "")).removeprefix("Value error, "), None, "invalid_text")
        return ApiError(400, f"the request body must be a JSON object ({endpoint}): {first.get('msg', '')}")
    same = [i for i, f in enumerate(fields) if f[:1] == fields[0][:1]]
    i = max(same, key=lambda j: len(fields[j]))
    e, loc = errors[i], fields[i]
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if k else str(p)) for k, p in enumerate(loc))
    param = str(loc[0])
    if e.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field `{path}`: {endpoint} does not take it (the fields it takes, refuses and "
                             "ignores: docs/serving.md#request-fields); remove it", param, "unknown_field")
    if e.get("type") == "missing":
        return ApiError(400, f"`{path}` is required", param)
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    got = f" (got {_show(e['input'])})" if "input" in e and not isinstance(e["input"], dict) else ""
    return ApiError(400, f"`{path}`: {msg}{got}", param)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _is_type_tag(part) -> bool:
    """Whether a location part names a member of a union (``str``, ``list[str]``), not a field."""
    return isinstance(part, str) and ("[" in part or part.lower() in _TYPE_NAMES or part[:1].isupper())


# -------------------------------------------------------------------------- responses


def finish_reason(reason: str) -> str:
    """The runtime's end reason as OpenAI's: eos and stop strings are `stop`, the length limit `length`."""
    return "length" if reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _omit_none(v) -> bool:
    return v is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completion, or one streamed chunk of it (same object type, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adadecode"
    max_model_len: int
    """Extension (as vLLM's): KV cache positions per sequence, prompt plus output."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
