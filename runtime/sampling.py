"""Sampling: one sampler for the final layer and the exit heads, in two modes with stated guarantees.

Theory of operation. A sequence samples under its ``SamplingParams``, which travel
with its work like its early-exit mode (``StepRequest`` / ``Activations``). The
final layer and the heads process their logits the same way (``process_logits``:
``logits / T``, then top-k, top-p, min-p) and draw with the same noise; only the
last stage and the heads call this module, never the Coordinator.

- ``temperature == 0`` is greedy: the Stage never calls this module and takes its
  greedy path (``StageModel.greedy_tokens``, ``ExitHeads.predict``) unchanged.
- ``seeded`` (exact): the token at position ``p`` is ``argmax(x + g)`` over the
  processed logits ``x``, with Gumbel noise ``g = gumbel(seed, p)[token id]``
  from a counter-based generator: it depends on ``(seed, p, id)`` alone. A head
  proposes with the same noise entries (indexed by full-vocabulary id, so its
  restricted vocabulary sees the entries of its own ids); the Coordinator accepts
  an early token only if the final layer draws the same token; a rollback replays
  the same noise. The output is a function of (prompt, seed): the same with early
  exit off, eager or deferred (deferred: up to the batch-shape rounding measured
  for greedy) and at any stage count.
- ``speculative`` (distribution-preserving, Leviathan et al. 2023): a head draws
  ``x ~ q`` (its processed distribution over its restricted vocabulary; tokens
  outside that vocabulary have ``q = 0``), and its ``q`` rides with the item's
  activations to the last stage as a ``Proposal``. There, with ``p`` the final
  layer's processed distribution, ``x`` is kept with probability
  ``min(1, p(x)/q(x))``, else the token is drawn from ``norm(max(0, p - q))``:
  every token is a sample of ``p``. That decision is made here, once, on the last
  stage; the Coordinator then verifies as in every mode, by exact match (a
  rejected ``x`` has ``p(x) < q(x)``, so the residual never draws it again). The
  randomness is keyed by ``(seed, p)`` too (streams ``ACCEPT`` and ``RESIDUAL``),
  so a run is deterministic for a seed. A head decides to propose on its top
  probability, which does not look at the noise: a proposal must be a draw of
  ``q`` whatever made the head propose it.

Before the draw (greedy too), vLLM's penalties (``apply_penalties``) change the final layer's
logits by the sequence's tokens before the predicted position: ``repetition_penalty`` divides
the positive logits (multiplies the negative ones) of every token in the prompt or the output,
``frequency_penalty`` subtracts per occurrence in the output, ``presence_penalty`` once per
token present in it. The tokens are the verified prefix (every earlier position of the chunk is
verified or rolled back before its successor is), so the seeded guarantee holds with penalties;
the heads propose without them, and a guess the penalised final choice does not make is rolled
back like any other.

Log probabilities (``logprobs``) are of the raw final-layer distribution, ``log_softmax`` of the
logits in float32 before penalties, temperature and filters, as vLLM returns them by default:
a function of the model and the prefix alone, so the same in every sampling setting.

Same noise on every device: the noise is computed on the CPU, from integer
hashing of ``(seed, p, id)`` (exact in int64 everywhere: no product exceeds
2**63) and a float64 ``-log(-log(u))``, then moved to the logits' device. So a
given seed gives the same noise on a CPU and on a GPU, whatever torch's
generators do; the logits themselves are each device's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .params import MAX_SEED, SAMPLING_MODES, SamplingParams  # noqa: F401  (re-exported: the sampler's API)

# Independent noise streams of one (seed, position).
NOISE = 0  # the draw, shared by the heads and the final layer
ACCEPT = 1  # speculative: the uniform of the min(1, p/q) test
RESIDUAL = 2  # speculative: the draw from norm(max(0, p - q)) after a rejection

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class TokenLogprobs:
    """``token``'s log probability under the final layer's raw distribution, and the ``top``
    most likely tokens' as ``(id, logprob)``, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenContext:
    """The sequence's token ids at positions ``0 ..`` (at least up to the one before the last
    predicted position) and its prompt's length: what penalties and prompt log probabilities read."""

    tokens: Sequence[int]
    prompt_len: int


@dataclass(frozen=True)
class Proposal:
    """Speculative mode: a head's draw ``token`` for position ``pos`` and its distribution q,
    as its support in full-vocabulary ids (``ids``, ``probs``; q is 0 everywhere else)."""

    pos: int
    token: int
    ids: tuple[int, ...]
    probs: tuple[float, ...]

    def q(self, token: int) -> float:
        try:
            return self.probs[self.ids.index(token)]
        except ValueError:
            return 0.0


# --- counter-based noise ----------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``x < 2**32`` in int64, with no product past 2**48 (exact on any device)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32). # x: int64 values < 2**32"""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: int, pos: int, ids: torch.Tensor, stream: int = NOISE) -> torch.Tensor:
    """Uniforms in (0, 1), one per id, a function of ``(seed, pos, stream, id)`` alone.

    # ids: [N] int64 on the CPU (token ids < 2**32) -> [N] float64 on the CPU
    """
    key = _splitmix64(_splitmix64(_splitmix64(seed) ^ pos) ^ stream)
    x = _mix32(ids ^ (key & _M32))
    x = _mix32(x ^ (key >> 32))
    return ((x >> 8).double() + 0.5) * 2.0**-24  # 24 bits, never 0 or 1


def gumbel(seed: int, pos: int, ids: torch.Tensor, stream: int = NOISE) -> torch.Tensor:
    """Standard Gumbel noise for ``ids`` at ``(seed, pos)``. # ids: [N] int64 (CPU) -> [N] float32 (CPU)"""
    return (-torch.log(-torch.log(uniforms(seed, pos, ids, stream)))).float()


def uniform(seed: int, pos: int, stream: int) -> float:
    """One uniform in (0, 1) for ``(seed, pos, stream)``."""
    return float(uniforms(seed, pos, torch.zeros(1, dtype=torch.long), stream)[0])


# --- processing and drawing --------------------------------------------------------------------


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits / T`` with ``-inf`` outside the top-k / top-p / min-p support.

    One row at a time, so that a row's result never depends on the rows around it.
    Shifted by the row's maximum first, so that no finite row can overflow: the top logit
    is 0 whatever the temperature, differences too large for fp32 become -inf (a
    probability of 0, which it is), and NaN (a broken model) never wins. The shift leaves
    softmax, and so every filter and draw, unchanged. # logits: [N] -> [N] float32
    """
    x = logits.float().nan_to_num(nan=-math.inf)
    top = x.max()
    x = (x - top) / params.temperature if bool(torch.isfinite(top)) else torch.where(x == top, 0.0, -math.inf)
    if 0 < params.top_k < x.numel():
        x = x.masked_fill(x < x.topk(params.top_k).values[-1], -math.inf)
    if params.top_p < 1.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < _nucleus_floor(probs, params.top_p), -math.inf)
    if params.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return x


_NUCLEUS_CANDIDATES = 64


def _nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest probability in the nucleus: the top tokens, most likely first, until their
    mass reaches ``top_p``. Kept by value, so ties at the edge are all in or all out.

    The nucleus is usually a few tokens: look at the top 64 first and widen only when their
    mass falls short (a full sort of a 49k vocabulary costs ~4 ms on one core). # probs: [N]
    """
    k = min(probs.numel(), _NUCLEUS_CANDIDATES)
    while True:
        top = probs.topk(k).values  # descending
        mass = top.cumsum(0)
        if k == probs.numel() or bool(mass[-1] >= top_p):
            return top[min(int((mass < top_p).sum()), k - 1)]
        k = min(probs.numel(), 8 * k)


def gumbel_argmax(x: torch.Tensor, ids: torch.Tensor | None, seed: int, pos: int, stream: int = NOISE) -> int:
    """A draw from ``softmax(x)``: the full-vocabulary id of ``argmax(x + g(seed, pos)[id])``
    over the finite entries of ``x``. ``ids``: each entry's full-vocabulary id (CPU; None: the
    entry's index). The noise is computed for the support only.

    # x: [N] float32, -inf outside the support; ids: [N] int64
    """
    support = torch.isfinite(x).nonzero().squeeze(1)
    vocab = support.cpu() if ids is None else ids[support.cpu()]
    noise = gumbel(seed, pos, vocab, stream).to(x.device)
    return int(vocab[int((x[support] + noise).argmax())])


def sample_token(logits: torch.Tensor, params: SamplingParams, pos: int, proposal: Proposal | None = None) -> int:
    """The final layer's token for position ``pos``. # logits: [V]

    seeded, or no proposal: the seeded draw. speculative with a head's proposal: accept it
    with probability min(1, p/q), else draw from norm(max(0, p - q)).
    """
    x = process_logits(logits, params)
    if proposal is None or params.mode == "seeded":
        return gumbel_argmax(x, None, params.seed, pos)
    return speculative_token(x.softmax(-1), proposal, params.seed, pos)


def speculative_token(p: torch.Tensor, proposal: Proposal, seed: int, pos: int) -> int:
    """Leviathan et al.'s acceptance: the proposal if ``u < p(x) / q(x)``, else a draw from the
    residual. Distributed as ``p`` whenever the proposal is distributed as its q. # p: [V]"""
    x = proposal.token
    if uniform(seed, pos, ACCEPT) * proposal.q(x) < float(p[x]):  # u < min(1, p(x)/q(x)), q(x) > 0
        return x
    return gumbel_argmax(residual(p, proposal).log(), None, seed, pos, RESIDUAL)


def residual(p: torch.Tensor, proposal: Proposal) -> torch.Tensor:
    """``max(0, p - q)``, unnormalised (the draw does not need it). # p: [V] -> [V]"""
    q = torch.zeros_like(p)
    q[torch.tensor(proposal.ids, device=p.device)] = torch.tensor(proposal.probs, dtype=p.dtype, device=p.device)
    r = (p - q).clamp_(min=0)
    # All zero only if p == q up to rounding, when a rejection cannot happen: draw from p then.
    return r if bool(r.any()) else p


def propose(
    logits: torch.Tensor, ids: torch.Tensor | None, params: SamplingParams, pos: int
) -> tuple[int, float, Proposal | None]:
    """An exit head's draw for position ``pos``: (token, confidence, the proposal in speculative
    mode, else None). ``ids``: the full-vocabulary id of each logit (CPU; None: all of them).

    The confidence is q's top probability: it does not depend on the noise, which a
    speculative proposal needs (see the module docstring). # logits: [K]
    """
    x = process_logits(logits, params)
    q = x.softmax(-1)
    token = gumbel_argmax(x, ids, params.seed, pos)
    confidence = float(q.max())
    if params.mode != "speculative":
        return token, confidence, None
    support = (q > 0).nonzero().squeeze(1)
    vocab = support.cpu() if ids is None else ids[support.cpu()]
    proposal = Proposal(pos, token, tuple(vocab.tolist()), tuple(q[support].tolist()))
    return token, confidence, proposal


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int],
                    output: Sequence[int]) -> torch.Tensor:
    """vLLM's penalties on one row (see the module docstring). # logits: [V] -> [V] float32"""
    x = logits.float()
    vocab = x.numel()
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.zeros(vocab, dtype=torch.bool, device=x.device)
        seen[torch.tensor([*prompt, *output], dtype=torch.long, device=x.device)] = True
        r = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if output and (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).to(x.device, x.dtype)
        x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Each row's ``log_softmax`` (float32) at ``tokens[i]``, with its ``k`` most likely tokens;
    one transfer. # logits: [S, V]; tokens: S ids"""
    lp = logits.float().log_softmax(-1)
    rows = torch.arange(lp.shape[0], device=lp.device)
    chosen = lp[rows, torch.tensor(list(tokens), dtype=torch.long, device=lp.device)]
    top = lp.topk(k, dim=-1) if k else None
    values = chosen.tolist()
    if top is None:
        return [TokenLogprobs(t, v) for t, v in zip(tokens, values)]
    ids, lps = top.indices.tolist(), top.values.tolist()
    return [TokenLogprobs(t, v, tuple(zip(i, l))) for t, v, i, l in zip(tokens, values, ids, lps)]


def choose_rows(
    logits: torch.Tensor, params: SamplingParams, positions: Sequence[int], proposals: Mapping[int, Proposal],
    context: TokenContext | None = None,
) -> list[tuple[int, TokenLogprobs | None]]:
    """The final layer's token for each row, with its log probabilities when ``params.logprobs`` asks
    for them: penalised (``context``: the tokens before), then greedy (argmax) or sampled as
    ``sample_token``. # logits: [S, V]; positions: the S positions the tokens will occupy"""
    out: list[tuple[int, TokenLogprobs | None]] = []
    for i, pos in enumerate(positions):
        x = logits[i]
        if params.penalised:
            if context is None:
                raise ValueError("penalties need the sequence's tokens (a TokenContext); none was given")
            n = context.prompt_len
            x = apply_penalties(x, params, context.tokens[:n], context.tokens[n:pos])
        token = int(x.argmax()) if params.greedy else sample_token(x, params, pos, proposals.get(pos))
        lp = None if params.logprobs is None else token_logprobs(logits[i : i + 1], [token], params.logprobs)[0]
        out.append((token, lp))
    return out
