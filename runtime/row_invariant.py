"""Row-invariant layer compute: the rows of a merged chunk get the bits they get alone.

Why. Plain decoding runs the prompt as one call and every later position as a call of one
row. ``deferred`` backfill merges a position's remaining layers with the next token's into one
chunk, and ``serve.batching: fused`` runs several sequences' rows as one call; a kernel whose
result for a row depends on how many rows it runs with then changes tokens (bf16 ``deferred``
kept 7 of 32 prompts identical before this module). What this CPU's kernels do, measured by
``scripts/row_invariance.py`` and held by ``tests/test_row_invariant.py`` (docs/exactness.md):

- elementwise ops, RoPE, RMSNorm (a reduction within the row), SiLU, the residual adds, argmax:
  row-invariant in fp32 and bf16; they run once over all rows.
- GEMM (``F.linear``): fp32 rounds by row count (MKL: 1 row, 2-3 rows and 4+ rows are three
  kernels); bf16 (oneDNN) gives every row the bits of one row up to a size that depends on
  the shape. Whether rows may share a call is probed once per weight shape (``fusable_rows``).
- attention over the cache (SDPA): a query row's result depends on the other query rows
  (kernel blocking, the mask's length), in fp32 and bf16. It runs per part, each part over its
  own prefix with its own mask: exactly plain decoding's call.
- a mixture-of-experts block: per part (routing gathers rows into expert GEMMs).

Parts. A chunk's *parts* are the row counts of the calls plain decoding makes for its rows: the
prompt's rows are one part, every later position its own (``WorkItem.parts``). An op either
runs once on all rows, where that gives each part its own bits, or once per part.

Modes (``pipeline.row_invariant``): ``auto`` fuses a GEMM's rows where the probe finds the
kernel row-invariant and splits it elsewhere; ``on`` splits every GEMM per part (no probe
trusted); ``off`` runs merged rows through shared calls (fastest, last bits may differ). A
chunk of one part, the single-row decode step above all, takes the plain path in every mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

MODES = ("auto", "on", "off")
PROBE_ROWS = 16  # the most rows a probe checks (a merged decode chunk or a fused batch rarely has more)
PROBE_SEEDS = 4  # random draws per probe (each checks every call of m rows among 2m)

_fusable: dict[tuple, int] = {}


def fusable_rows(weight: torch.Tensor, bias: torch.Tensor | None, need: int = PROBE_ROWS) -> int:
    """The most rows ``m <= need`` (and ``<= PROBE_ROWS``) such that ``F.linear`` with a weight
    like this one gives each row of a call of ``<= m`` rows the bits of that row alone; 1 if none.

    Probed per (shape, strides, dtype, device, bias), only as far as a call needs (a deferred
    chunk: 2 or 3 rows), ``PROBE_SEEDS`` times, on weights and inputs whose magnitudes span
    2^-8..2^8: products that large and small cancel, so a different summation order shows even
    after rounding to bf16 (with plain random data, a bf16 GEMM that blocks K differently for 2
    rows than for 1 passed 2 draws of 6 with one pair each). A probe can miss a difference, never invent one;
    ``on`` trusts none and splits every GEMM.
    """
    if isinstance(weight, FakeTensor):  # no data to probe (the CUDA path under FakeTensorMode): one call per part
        return 1
    key = (tuple(weight.shape), weight.stride(), weight.dtype, weight.device, bias is not None)
    need = min(need, PROBE_ROWS)
    ok, bad = _fusable.get(key, (1, PROBE_ROWS + 1))
    if ok < need < bad:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            w = torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device=weight.device)
            block = _mixed(g, (min(weight.shape[0], 1024), weight.shape[1]), weight)  # tiled: a large LM
            w.copy_(block.repeat(-(-weight.shape[0] // block.shape[0]), 1)[: weight.shape[0]])  # head in ms
            b = None if bias is None else _mixed(g, bias.shape, bias)
            for _ in range(PROBE_SEEDS):
                m = _probe(w, b, _mixed(g, (2 * need, weight.shape[1]), weight), need)
                if m < need:
                    bad, need = m + 1, m
                if need == 1:
                    break
        ok = max(ok, need)
        _fusable[key] = (ok, bad)
    return min(need, ok)


def _mixed(g: torch.Generator, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Random values of magnitudes 2^-8..2^8, as ``like``'s dtype and device."""
    t = torch.randn(*shape, generator=g) * 2.0 ** torch.randint(-8, 9, tuple(shape), generator=g)
    return t.to(device=like.device, dtype=like.dtype)


def _probe(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor, need: int) -> int:
    """The most rows ``m <= need`` for which every call of ``m`` consecutive rows of ``x`` gives
    each row its bits alone. # x: [R, K], R >= need"""
    alone = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(x.shape[0])])
    for m in range(2, need + 1):
        for a in range(0, x.shape[0] - m + 1, m):
            if not torch.equal(F.linear(x[a : a + m], w, b), alone[a : a + m]):
                return m - 1
    return need


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: Sequence[int], fuse: bool = True
) -> torch.Tensor:
    """``F.linear`` whose every part gets the bits of its own call. ``fuse``: let single-row parts
    share a call where ``fusable_rows`` allows.

    # x: [..., N, K] (N = sum(parts)) -> [..., N, out]
    """
    if len(parts) == 1:
        return F.linear(x, weight, bias)
    run = longest = 0  # the most single-row parts in a row: what a shared call would hold
    for n in parts:
        run = run + 1 if n == 1 else 0
        longest = max(longest, run)
    groups = row_groups(parts, fusable_rows(weight, bias, longest) if fuse and longest > 1 else 1)
    if len(groups) == 1:
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(x[..., a:b, :], weight, bias) for a, b in groups], dim=-2)


def row_groups(parts: Sequence[int], fusable: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` that may share one call: runs of single-row parts of at most
    ``fusable`` rows; a part of several rows (a prompt) alone, as plain decoding ran it."""
    groups: list[tuple[int, int]] = []
    open_run = False  # the last group is a run of single-row parts that may grow
    row = 0
    for n in parts:
        if n == 1 and open_run and row - groups[-1][0] < fusable:
            groups[-1] = (groups[-1][0], row + 1)
        else:
            groups.append((row, row + n))
            open_run = n == 1
        row += n
    return groups


def attention(
    sdpa: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    mask_for: Callable[[int, int], torch.Tensor | None],
    q: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    parts: Sequence[int],
) -> torch.Tensor:
    """One sequence's attention, part by part, each part over the prefix up to its own last
    position with its own mask: the call plain decoding makes for it. ``sdpa(q, k, v, mask)``
    returns ``[1, S, H * hd]``; ``mask_for(input_pos, rows)`` is the chunk mask.

    # q: [1, H, S, hd]; k_all, v_all: [1, kv_heads, input_pos + S, hd] -> [1, S, H * hd]
    """
    rows = q.shape[2]
    input_pos = k_all.shape[2] - rows
    outs, a = [], 0
    for n in parts:
        end = input_pos + a + n
        outs.append(sdpa(q[:, :, a : a + n], k_all[:, :, :end], v_all[:, :, :end], mask_for(input_pos + a, n)))
        a += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def by_part(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, parts: Sequence[int]) -> torch.Tensor:
    """``fn`` on each part's rows, concatenated (a block that is not row-invariant, called as a
    whole: a mixture of experts). # x: [1, N, D] -> [1, N, D']"""
    if len(parts) == 1:
        return fn(x)
    outs, a = [], 0
    for n in parts:
        outs.append(fn(x[:, a : a + n]))
        a += n
    return torch.cat(outs, dim=1)
