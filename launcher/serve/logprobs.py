"""Log probabilities in OpenAI's shapes: ``/v1/completions``' ``logprobs`` and ``/v1/chat/completions``'.

The numbers come from the runtime (``runtime.sampling.TokenLogprobs``): the final layer's raw
distribution (``log_softmax`` of its float32 logits, before penalties, temperature and filters,
vLLM's default), verified like every token, so they are the same whatever the early-exit mode
and stage count. Here they only get their shapes. A token's text is its id decoded alone (as
vLLM does); a token that ends inside a character decodes to U+FFFD, and its ``bytes`` (chat) are
that text's UTF-8. A log probability of ``-inf`` (an fp32 underflow) is sent as -9999.0, the
value OpenAI uses, since JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from adadecode.runtime.sampling import TokenLogprobs
from pydantic import BaseModel

FLOOR = -9999.0


class CompletionLogprobs(BaseModel):
    """A completion choice's ``logprobs`` (OpenAI's legacy shape); with ``echo`` the prompt's
    tokens come first, the first with ``null`` (it has no context)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class TokenTexts:
    """Each token id's text, decoded alone once (``decode``: the tokenizer's, on a list of ids)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode([token])
        return text


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def completion_logprobs(
    texts: TokenTexts, entries: Sequence[TokenLogprobs | int], offset: int = 0
) -> CompletionLogprobs:
    """``entries``: a ``TokenLogprobs`` per token, or a bare id for a token without one (the
    prompt's first, with ``echo``). ``offset``: the text offset of the first token (a stream's
    earlier tokens' text). The top alternatives include the chosen token, as in vLLM."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        token = e if isinstance(e, int) else e.token
        text = texts(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if isinstance(e, int):
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_value(e.logprob))
        top = {texts(i): _value(lp) for i, lp in e.top}
        top.setdefault(text, _value(e.logprob))
        out.top_logprobs.append(top)
    return out


def text_length(logprobs: CompletionLogprobs) -> int:
    """The text offset after ``logprobs``' tokens (where a stream's next chunk starts)."""
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprobs]) -> ChatLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = texts(token)
        return TopLogprob(token=text, logprob=_value(logprob), bytes=list(text.encode("utf-8")))

    content = []
    for e in entries:
        chosen = top(e.token, e.logprob)
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[top(i, lp) for i, lp in e.top]))
    return ChatLogprobs(content=content)
