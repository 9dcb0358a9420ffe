"""Request-level parameters: one definition, no torch, shared by the config, the engine, the
server and the runtime.

The bounds are what the sampler and the data plane handle, stated as OpenAI's and vLLM's
servers state theirs: every value inside them decodes; every value outside is refused with
a ``ValueError`` naming the parameter, before it reaches a rank.

- ``temperature``: 0 (greedy) or in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``. Below 1e-2 the
  division by T makes the logits overflow fp32 (at 1e-300 they turn inf/NaN) and draws
  stop being distinguishable from greedy anyway (vLLM raises such values to 1e-2).
- ``top_k``: 0 (off) to ``MAX_TOP_K``: it travels in the int64 data-plane header; a value at
  or above the vocabulary keeps every token (the server refuses it, naming the vocabulary).
- ``top_p`` in (0, 1], ``min_p`` in [0, 1], ``seed`` in [0, 2**63 - 1] (an int64 on the wire).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

SAMPLING_MODES = ("seeded", "speculative")
EarlyExitMode = Literal["off", "eager", "deferred"]  # the config's type; the tuple below for everything else
EARLY_EXIT_MODES: tuple[str, ...] = get_args(EarlyExitMode)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")  # runtime/device.py resolves these
COMPILE_MODES = ("auto", "on", "off")  # pipeline.compile: the compiled layer loop (runtime/compiled_step.py)
BatchingMode = Literal["auto", "exact", "fused"]  # serve.batching: how a stage runs several sequences' rows
BATCHING_MODES: tuple[str, ...] = get_args(BatchingMode)

MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1  # the data plane carries the seed in an int64
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default max_logprobs; OpenAI's top_logprobs bound)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0  # like temperature: logits / r must not overflow
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's and vLLM's bound)


def compiles(setting: str, device_type: str) -> bool:
    """``pipeline.compile`` on ``device_type``: on, or auto on CUDA only (there CUDA graphs remove
    the launch cost that dominates a stage at batch 1; on the CPU compiling takes minutes)."""
    return setting == "on" or (setting == "auto" and device_type == "cuda")


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence samples. ``temperature`` 0 is greedy (the other fields are then unused).

    Filters apply in this order, to ``logits / temperature``: ``top_k`` (0: off) keeps
    the k largest (ties included), ``top_p`` the smallest set of most likely tokens
    whose probability reaches it (1: off), ``min_p`` the tokens at least ``min_p``
    times as likely as the most likely one (0: off). Before them (greedy too), vLLM's
    penalties: ``repetition_penalty`` (1: off) on every token of the prompt and the output,
    ``presence_penalty`` and ``frequency_penalty`` (0: off) on the output's tokens.

    ``logprobs``: return each output token's log probability and that many alternatives
    (None: none); ``prompt_logprobs``: the same for the prompt's tokens. Both are of the raw
    final-layer distribution, before penalties, temperature and filters (vLLM's default).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    mode: str = "seeded"
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _invalid(name, value, "a finite number")
            object.__setattr__(self, name, float(value))
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _invalid(name, value, "an integer")
        t = self.temperature
        if t < 0 or 0 < t < MIN_TEMPERATURE or t > MAX_TEMPERATURE:
            raise _invalid("temperature", t, f"0 (greedy decoding) or a number in [{MIN_TEMPERATURE:g}, "
                                             f"{MAX_TEMPERATURE:g}]; it must be >= 0")
        if not 0 < self.top_p <= 1:
            raise _invalid("top_p", self.top_p, "a number in (0, 1] (1 keeps every token)")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise _invalid("top_k", self.top_k, f"an integer >= 0 and <= {MAX_TOP_K} (0 keeps every token)")
        if not 0 <= self.min_p <= 1:
            raise _invalid("min_p", self.min_p, "a number in [0, 1] (0 keeps every token)")
        if not 0 <= self.seed <= MAX_SEED:
            raise _invalid("seed", self.seed, "an integer in [0, 2**63 - 1]")
        if self.mode not in SAMPLING_MODES:
            raise _invalid("mode", self.mode, f"one of {', '.join(SAMPLING_MODES)}")
        r = self.repetition_penalty
        if not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise _invalid("repetition_penalty", r, f"a number in [{MIN_REPETITION_PENALTY:g}, "
                                                    f"{MAX_REPETITION_PENALTY:g}] (1: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise _invalid(name, getattr(self, name), f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0: off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise _invalid(name, value, f"None or an integer in [0, {MAX_LOGPROBS}] (alternatives per token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether a penalty changes the final layer's logits (vLLM's semantics: runtime/sampling.py)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_tokens(self) -> bool:
        """Whether the last stage needs the sequence's token ids (penalties, the prompt's log
        probabilities): then every item carries its tokens to it."""
        return self.penalised or self.prompt_logprobs is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else for the final layer to do: the stages' greedy path, bit for bit."""
        return self.greedy and not self.penalised and self.logprobs is None and self.prompt_logprobs is None


def _invalid(name: str, value: object, expected: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ValueError(f"sampling parameter {name} = {shown} is invalid: expected {expected}")


class CacheOverflowError(RuntimeError):
    """More positions than a KV cache holds (runtime/kv_cache.py raises it mid-run too)."""


class RequestTooLong(CacheOverflowError, ValueError):
    """A request whose prompt plus new tokens cannot fit the KV cache, refused before it runs."""


def check_early_exit(mode: str | None) -> None:
    if mode is not None and mode not in EARLY_EXIT_MODES:
        raise ValueError(f"early_exit `{mode}` is unknown; use one of {', '.join(EARLY_EXIT_MODES)}")


def check_request(prompt_tokens: int, max_new_tokens: int, early_exit: str, sampling: object, *, max_seq_len: int,
                  heads_loaded: bool, tokens_name: str = "max_new_tokens", model: str = "this model") -> None:
    """One request's checks, for every entry point (Engine.generate, ServingLoop.submit): each
    names the field and the fix. ``early_exit``: the mode the request runs with here (an unknown
    one is refused); ``heads_loaded``: exit heads, or drafts for this request, to start tokens early
    with; ``tokens_name``: what the caller calls ``max_new_tokens``."""
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"{tokens_name} must be >= 1, got {max_new_tokens}")
    need = prompt_tokens + max_new_tokens
    if need > max_seq_len:
        raise RequestTooLong(
            f"the prompt ({prompt_tokens} tokens) plus {tokens_name} ({max_new_tokens}) needs {need} positions "
            f"but the KV cache holds {max_seq_len}; shorten the prompt, lower {tokens_name} or raise model.max_seq_len"
        )
    check_early_exit(early_exit)
    if early_exit != "off" and not heads_loaded:
        raise ValueError(
            f"early_exit `{early_exit}` needs exit heads and {model} has none loaded; train them with "
            "`adadecode train-heads` and set decoding.heads, decode greedily with the context lookup's drafts "
            "(decoding.lookup and decoding.draft), or use early_exit `off`"
        )
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams or None, not {type(sampling).__name__}")
