"""Which tokens come out of a stage: an exit head's early one, and the last stage's final ones.

``try_exit``: the head at an item's layer reads its last position and, when confident, gives an
``EarlyPrediction``; sampled, it is the head's draw, which in speculative mode rides with the item
as a ``Proposal``. ``final_predictions``: the final norm and LM head on the positions that still
need a next token, from ``predict_from`` on; each sampled position with its own noise and, in
speculative mode, the head's proposal for it, which the sampler accepts or resamples
(runtime/sampling.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .events import EarlyPrediction, FinalPrediction

if TYPE_CHECKING:
    from .exit_heads import ExitHeads
    from .stage_model import StageModelLike
    from .work_queue import WorkItem


def try_exit(heads: ExitHeads, w: WorkItem) -> EarlyPrediction | None:
    """The head at ``w.layer`` on ``w``'s last position: its token for ``w.end_pos`` if it is
    confident, else None. A confident head marks ``w`` emitted and, in speculative mode, leaves
    its draw with ``w`` for the last stage to accept or resample."""
    if w.sampling is None:
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


def final_predictions(model: StageModelLike, items: list[WorkItem], exact: bool) -> list[FinalPrediction]:
    """The final layer's tokens of ``items``: the sampled items' first, then the greedy ones'.
    ``exact``: each greedy item through its own LM-head call, with the bits it would get alone (a
    matmul's rows depend on how many rows it has); else one call and one transfer for all."""
    out = [p for w in items if w.sampling is not None for p in _sampled(model, w)]
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


def _sampled(model: StageModelLike, w: WorkItem) -> list[FinalPrediction]:
    """``w``'s sampled tokens, position by position (runtime/sampling.py)."""
    assert w.sampling is not None  # only sampled items come here
    first = max(w.predict_from - w.pos, 0)
    positions = range(w.pos + first + 1, w.end_pos + 1)
    tokens = model.sampled_tokens(w.hidden[first:], w.sampling, positions, w.proposals)
    return [FinalPrediction(w.seq, w.epoch, pos, token) for pos, token in zip(positions, tokens)]
