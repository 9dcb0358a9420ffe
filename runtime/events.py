"""Events exchanged by the Coordinator, the Stages and the runners around them.

Every event is a frozen dataclass named for what happened. Every event that
concerns a sequence carries ``(seq, epoch)``: the epoch grows by one at each
rollback, and work of an older epoch is dropped wherever it is seen.

Positions are absolute token positions in the sequence (prompt included). A
prediction's ``pos`` is the position the predicted token will occupy.

A sequence's early-exit mode travels with its work: every ``StepRequest`` and
``Activations`` carries ``early_exit`` (one of ``EARLY_EXIT_MODES``), so each
stage runs each sequence under that sequence's own backfill policy and no
stage setting has to be changed, or relayed, between generations. Its sampling
parameters travel the same way (``sampling``, a ``SamplingParams``; None: greedy),
and in speculative mode an exit head's draw and distribution ride with the item's
activations to the last stage (``proposals``), which decides acceptance
(runtime/sampling.py). A sequence whose final layer needs its token ids (penalties, the
prompt's log probabilities: ``SamplingParams.needs_tokens``) has every item carry them
(``tokens``); the others carry none, and no log probability is computed or sent for a
sequence that does not ask for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .params import EARLY_EXIT_MODES  # noqa: F401 - the sequence's modes, as events carry them
from .sampling import Proposal, SamplingParams, TokenLogprobs


class Sentinel(enum.Enum):
    """What ``next_action()`` returns when it has no event to hand out."""

    WAITING = "waiting"  # nothing to do until more input arrives
    DONE = "done"  # the machine has finished all its work


WAITING = Sentinel.WAITING
DONE = Sentinel.DONE

# off: no exit head is evaluated; eager / deferred: the backfill policy (runtime/stage.py).


class ProtocolError(RuntimeError):
    """An event that is illegal in the receiving machine's current state."""


# --- coordinator -> stages --------------------------------------------------


@dataclass(frozen=True)
class StepRequest:
    """Run ``tokens`` at positions ``pos, pos+1, ...`` through the pipeline (sent to stage 0).

    ``early_exit``: the sequence's mode (``EARLY_EXIT_MODES``); None: the stage's own default.
    ``sampling``: the sequence's sampling parameters; None: greedy.
    ``lookup``: the context's guess of the token after the last of ``tokens``
    (runtime/context_lookup.py), which the first exit head the item reaches sends on as
    its early token; -1: none.
    ``drafts``: how many of ``tokens``, at the end, are the context's drafts of the tokens
    after the first: unverified, each verified by the final layer's prediction at the
    position before it in this same pass (greedy only).
    """

    seq: int
    epoch: int
    pos: int
    tokens: tuple[int, ...]
    early_exit: str | None = None
    sampling: SamplingParams | None = None
    lookup: int = -1
    drafts: int = 0


@dataclass(frozen=True)
class Rollback:
    """Discard everything of ``seq`` at positions ``>= keep_len``; newer work carries ``epoch``."""

    seq: int
    epoch: int
    keep_len: int


@dataclass(frozen=True)
class SequenceFinished:
    """``seq`` is complete: stages free its cache slot; runners report the result.

    Sent for every sequence however it ends, so no slot stays taken: ``eos``, ``stop`` and
    ``length`` by the stop criteria, ``cancelled`` (an interrupt) or ``failed`` (an error
    in the runner or the caller's callback) by ``Coordinator.cancel``.
    """

    seq: int
    reason: str


@dataclass(frozen=True)
class Shutdown:
    """Stop the machine; nothing follows."""


# --- stage -> stage -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Activations:
    """Hidden states of positions ``pos .. pos+S-1`` after the sender's last layer.

    ``hidden``: [S, D]. ``layer`` is the index of the next layer to run.
    ``predict_from``: the first position whose next token the final layer must
    predict (the prompt's last position, or the chunk's first decoded one).
    ``emitted``: the last position's next token was already emitted early, so no
    exit head is evaluated on it again. ``early_exit`` and ``sampling``: the
    sequence's, as on ``StepRequest``. ``proposals``: speculative sampling only, the
    exit heads' draws (and their q) for positions of this item that the last stage
    will predict. ``lookup``: as on ``StepRequest``, for the last position.
    """

    seq: int
    epoch: int
    pos: int
    layer: int
    hidden: torch.Tensor = field(repr=False)
    predict_from: int = -1  # -1: only the last position
    emitted: bool = False
    early_exit: str | None = None
    sampling: SamplingParams | None = None
    proposals: tuple[Proposal, ...] = ()
    tokens: tuple[int, ...] = ()  # the token ids of positions pos .. pos+S-1, when sampling.needs_tokens
    lookup: int = -1


# --- stages -> coordinator ------------------------------------------------------


@dataclass(frozen=True)
class FinalPrediction:
    """The final layer's token for position ``pos`` (computed from position ``pos - 1``): greedy,
    or sampled under the sequence's ``SamplingParams``. ``logprobs``: its log probabilities, when
    the sequence asks for them; ``prompt_logprobs``: with the first output token, those of the
    prompt's tokens ``1 ..`` when asked (the first has none)."""

    seq: int
    epoch: int
    pos: int
    token: int
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class EarlyPrediction:
    """An exit head at ``layer`` is confident (``prob``) that ``token`` goes at position ``pos``;
    ``lookup``: the token is the context's guess the item carried, sent on at that head unread."""

    seq: int
    epoch: int
    pos: int
    token: int
    layer: int
    prob: float
    lookup: bool = False


# --- coordinator -> user ----------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """``tokens`` are final (verified or produced at full depth) and may be shown, with their
    ``logprobs`` and, with the first, the prompt's (``FinalPrediction``) when the sequence asks."""

    seq: int
    pos: int
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


# --- what each machine takes and hands out (for annotations) ----------------------

StageInput = StepRequest | Activations | Rollback | SequenceFinished | Shutdown
StageOutput = Activations | EarlyPrediction | FinalPrediction
Prediction = FinalPrediction | EarlyPrediction  # what the Coordinator takes
Command = StepRequest | Rollback | Verified | SequenceFinished  # what the Coordinator hands out
