"""Which tokens come out of a stage: an exit head's early one, and the last stage's final ones.

``try_exit``: the head at an item's layer reads its last position and, when confident, gives an
``EarlyPrediction``; sampled, it is the head's draw, which in speculative mode rides with the item
as a ``Proposal``. ``final_predictions``: the final norm and LM head on the positions that still
need a next token, from ``predict_from`` on; each sampled position with its own noise and, in
speculative mode, the head's proposal for it, which the sampler accepts or resamples
(runtime/sampling.py). An item whose sequence asks for more of the final layer (penalties, log
probabilities: ``SamplingParams``) goes through ``sampling.choose_rows``; with log probabilities,
its LM head runs row by row, each row the one-row call plain decoding makes, so that a merged
chunk's LM head rounds as plain decoding's does. ``TokenHistory``: the token ids the last stage
keeps of each sequence whose items carry them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .events import EarlyPrediction, FinalPrediction, ProtocolError
from .sampling import TokenContext, choose_rows, token_logprobs

if TYPE_CHECKING:
    from .exit_heads import ExitHeads
    from .stage_model import StageModelLike
    from .work_queue import WorkItem


def try_exit(heads: ExitHeads, w: WorkItem) -> EarlyPrediction | None:
    """The head at ``w.layer`` on ``w``'s last position: its token for ``w.end_pos`` if it is
    confident, else None. A confident head marks ``w`` emitted and, in speculative mode, leaves
    its draw with ``w`` for the last stage to accept or resample. An item that carries the
    context's guess (``w.lookup``, greedy only) exits with it here, the head unread: the guess
    is right far more often than an early head (runtime/context_lookup.py)."""
    if w.guessed:
        w.emitted = True
        return EarlyPrediction(w.seq, w.epoch, w.end_pos, w.lookup, w.layer, 1.0, lookup=True)
    if w.sampling is None or w.sampling.greedy:  # greedy with penalties: the head guesses unpenalised
        token, prob = heads.predict(w.layer, w.hidden[-1])
        proposal = None
    else:  # the draw for position end_pos, with that position's noise
        token, prob, proposal = heads.propose(w.layer, w.hidden[-1], w.sampling, w.end_pos)
    if prob <= heads.thresholds[w.layer]:
        return None
    w.emitted = True
    if proposal is not None:
        w.proposals[w.end_pos] = proposal
    return EarlyPrediction(w.seq, w.epoch, w.end_pos, token, w.layer, prob)


def final_predictions(
    model: StageModelLike, items: list[WorkItem], exact: bool, history: TokenHistory | None = None
) -> list[FinalPrediction]:
    """The final layer's tokens of ``items``: the sampled items' first (and those that ask for more
    of the final layer), then the greedy ones'. ``exact``: each greedy item through its own LM-head
    call, with the bits it would get alone (a matmul's rows depend on how many rows it has); else one
    call and one transfer for all. ``history``: the stage's, for items that carry their tokens."""
    history = TokenHistory() if history is None else history
    out = [p for w in items if w.sampling is not None for p in _chosen(model, w, history.extend(w))]
    items = [w for w in items if w.sampling is None]
    if not items:
        return out
    firsts = [max(w.predict_from - w.pos, 0) for w in items]
    rows = [w.hidden[f:] for w, f in zip(items, firsts)]
    if len(rows) == 1 or exact:
        tokens = [t for r in rows for t in model.greedy_tokens(r)]
    else:
        with torch.inference_mode():  # like every tensor the model makes
            tokens = model.greedy_tokens(torch.cat(rows))
    at = 0
    for w, f, r in zip(items, firsts, rows):
        for i, token in enumerate(tokens[at : at + r.shape[0]]):
            out.append(FinalPrediction(w.seq, w.epoch, w.pos + f + i + 1, token))
        at += r.shape[0]
    return out


def _chosen(model: StageModelLike, w: WorkItem, context: TokenContext | None) -> list[FinalPrediction]:
    """``w``'s tokens under its ``SamplingParams``, position by position (runtime/sampling.py)."""
    params = w.sampling
    assert params is not None  # only items with sampling parameters come here
    first = max(w.predict_from - w.pos, 0)
    positions = range(w.pos + first + 1, w.end_pos + 1)
    hidden = w.hidden[first:]
    if params.logprobs is None:
        logits = model.logits(hidden)
    else:  # row by row: each the one-row call of plain decoding (see the module docstring)
        with torch.inference_mode():
            logits = torch.cat([model.logits(hidden[i : i + 1]) for i in range(hidden.shape[0])])
    chosen = choose_rows(logits, params, positions, w.proposals, context)
    out = [FinalPrediction(w.seq, w.epoch, pos, token, lp) for pos, (token, lp) in zip(positions, chosen)]
    if w.pos == 0 and params.prompt_logprobs is not None and out:
        assert context is not None  # prompt_logprobs needs tokens: the items carry them
        n = context.prompt_len  # rows 0 .. n-2 predict the prompt's tokens 1 .. n-1, in one call
        prompt = []
        if n > 1:  # the prompt is one part in every mode: one call
            prompt = token_logprobs(model.logits(w.hidden[: n - 1], alone=False), context.tokens[1:n],
                                    params.prompt_logprobs)
        out[0] = FinalPrediction(w.seq, w.epoch, out[0].pos, out[0].token, out[0].logprobs, tuple(prompt))
    return out


class TokenHistory:
    """The last stage's token ids of each sequence whose items carry them, positions ``0 ..``.

    Items reach the final layer in position order, each starting at its cache's length (invariant
    1), so the ids before an item are those kept: a rollback needs no call here, the next item
    cuts the list at its position. The prompt's length is read from the first item (``pos`` 0),
    whose final layer predicts from the prompt's last position."""

    def __init__(self) -> None:
        self._seqs: dict[int, tuple[int, list[int]]] = {}

    def extend(self, w: WorkItem) -> TokenContext | None:
        """Record ``w``'s tokens; the sequence's context up to ``w``'s end (None: it carries none)."""
        if w.sampling is None or not w.sampling.needs_tokens:
            return None
        if len(w.tokens) != w.end_pos - w.pos:
            raise ProtocolError(f"sequence {w.seq} sent {len(w.tokens)} token ids with positions "
                                f"{w.pos}..{w.end_pos - 1}: its sampling parameters need one per position")
        if w.pos == 0:
            self._seqs[w.seq] = (w.predict_from + 1, [])
        prompt_len, tokens = self._seqs.get(w.seq, (0, []))
        if len(tokens) < w.pos:
            raise ProtocolError(f"sequence {w.seq}: the last stage holds {len(tokens)} token ids but got "
                                f"positions from {w.pos} on")
        del tokens[w.pos :]
        tokens.extend(w.tokens)
        return TokenContext(tokens, prompt_len)

    def drop(self, seq: int) -> None:
        self._seqs.pop(seq, None)
