"""The compiled layer loop: ``torch.compile`` of a stage's layers with static shapes per chunk size.

Why. A decode step of a small stage is many small kernels. On a GPU at batch 1
their launch cost dominates; CUDA graphs (``mode="reduce-overhead"``) remove
it, gpt-fast's recipe. On the CPU the matmuls dominate, and ATen's GEMV runs
bf16 far below the memory bandwidth; inductor with frozen weights and its C++
GEMM template (``max_autotune``) packs each weight once and streams it at the
bandwidth (docs/results.md, Devices: fp32 and bf16, compiled against eager). One
mechanism serves both: compile the layer loop.

How.

- Segments: the stage's layers are cut at its exit-head layers, the only
  places where the Stage may stop an item, and each segment is one compiled
  function. The cut is the same with early exit on or off, so early exit
  changes which segments run when, never their code: invariant 4 of docs/design.md
  holds compiled as it does eager.
- Shapes: per segment, a graph for each row count in ``1..max_chunk``
  (``max_inflight + 1``, the largest merged chunk; the rows are static, as the C++
  GEMM template needs); larger chunks (prefills) run eagerly.
  Positions are tensors, so nothing recompiles as a sequence
  grows: on the CPU the attended length is a dynamic dimension (attention reads
  the valid prefix, as eager does); on CUDA attention reads the whole buffer
  under a mask, so the graph is static and can be captured. A local layer
  (Gemma 3's sliding window) reads the same keys under a mask that also keeps
  each query within its window, where eager slices the window's keys: the same
  softmax up to rounding, and no shape that depends on the position.
- The KV cache is written in place by index (``cache[slot][:, input_pos] = k``),
  inside the graph; its lengths are kept by the caller, outside (kv_cache.py).
- Compiled output is not bit-identical to eager output: fused kernels and
  packed GEMMs round differently. Parity against transformers ``generate`` is
  a property of the eager path; compiled runs report their match rate.
- Merged chunks and fused batches (``pipeline.row_invariant``, runtime/row_invariant.py):
  decode rows, each at its own position of its own slot (a ``deferred`` chunk's rows, or the
  rows of several sequences under ``serve.batching: fused``), run as one call with the bits
  plain compiled decoding gives each row (``rows``), through a graph per segment and row count
  whose attention is the one-row graph's call for each row (its query over exactly its own
  prefix, each prefix length a dynamic dimension of its own, the slot a tensor) and whose
  GEMMs, norms, RoPE and MLP run once on all rows. That holds because on the CPU every GEMM is
  inductor's C++ template (``max_autotune_gemm_backends="CPP"``, in the one-row graph too): it
  gives a row the same bits at 1 to 4 rows for every weight of the bundled model and the tiny
  ones, fp32 and bf16 (and at 8 rows, checked in fp32 on the bundled model), where ATen's
  kernels (which autotuning picked at some shapes under "CPP,ATEN", e.g. bf16 1536x576 at 3
  rows) do not; fused norms and elementwise kernels are
  row-invariant too (tests/test_compiled_step.py, docs/exactness.md). Attention must read
  exactly the one-row graph's keys: a longer prefix under a mask moves the kernel's vectorised
  tail and with it the order of a sum. Row counts get graphs up to the larger of ``max_chunk``
  and the largest batch capped at ``FUSED_ROWS`` (``buckets``); a larger batch runs in even pieces.
  Not trusted blindly: a graph's first call is checked against the one-row
  graph, row by row, and one that differs runs row by row from then on (``unmerged``).
  ``row_invariant: on`` runs every chunk row by row; a chunk with a prompt part, a mixture of
  experts, and CUDA do too.

Compile time is paid on a segment's first use of each chunk size (``compile_s``,
reported with the first generation's stats), in every process: inductor keeps its C++ kernels
and autotuning results on disk (``$TORCHINDUCTOR_CACHE_DIR``, inductor's default
``/tmp/torchinductor_$USER``), but not these graphs, whose frozen weights are packed into
oneDNN tensors that its graph cache cannot pickle (it bypasses them), so a second run compiles
as long as the first (docs/results.md, "Compile at start-up").
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Sequence
from functools import partial

import torch
import torch._inductor.config
import torch.fx.experimental._config

from .hf_adapter import decoder_layer_forward_ragged, softcap
from .params import compiles

log = logging.getLogger("adadecode.compile")


# Inductor settings for CPU stages. Applied around each call (compiling happens lazily, in the
# first call of each shape), since freezing is not honoured through torch.compile(options=...).
# GEMMs: the C++ template only, in every graph (the one-row graph too): it gives a row the same
# bits at every row count, where ATen's kernels, which autotuning also picked at some shapes, do not.
CPU_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


# The most decode rows of a fused batch one per-row graph runs; a larger batch runs in pieces.
# Inductor's C++ GEMM micro-kernel (a register block of 8 rows by 48 columns in fp32 on AVX-512)
# streams the weights at the memory bandwidth up to 4 rows and turns compute-bound past them on
# this project's CPU: one 576x3072 GEMM takes 0.20 ms at 4 rows, 0.51 at 5 and 0.71 at 8; a decode
# step of the bundled model 29.4 ms at 4 rows and 72.4 at 8 (docs/results.md), so two pieces of 4
# beat one call of 8, and need no graph of 8 rows (the longest to compile).
FUSED_ROWS = 4


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` keyword arguments for a stage on ``device``."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
    return {"fullgraph": True}


class CompiledStep:
    """Runs local layers ``[a, b)`` of a ``StageModel`` through compiled segments."""

    def __init__(
        self, model, boundaries: Sequence[int], max_chunk: int, backend: str = "inductor", autotune: bool = True,
        max_rows: int = 0,
    ):
        """``boundaries``: global layers where segments start or end (the stage's ends and head
        layers); ``max_chunk``: the largest chunk compiled; ``backend``: torch.compile's;
        ``autotune``: on the CPU, let inductor pick its C++ GEMM template (what makes it pay,
        and most of the compile time); ``max_rows``: the most decode rows of a fused batch
        (``rows``; 0: none beyond ``max_chunk``)."""
        self.model = model
        self.max_chunk = max_chunk
        self.buckets = row_buckets(max_chunk, max_rows)
        self.static_kv = model.device.type == "cuda"  # CUDA graphs need every shape static
        self.positions = torch.arange(model.max_seq_len, device=model.device)
        cuts = sorted({model.start, model.end, *(l for l in boundaries if model.start < l < model.end)})
        self.segments = [(x - model.start, y - model.start) for x, y in zip(cuts, cuts[1:])]
        self._kwargs = compile_options(model.device) if backend == "inductor" else {"backend": backend}
        self._kwargs["fullgraph"] = True
        self._fns = {seg: torch.compile(_own_code(self._segment(*seg)), **self._kwargs) for seg in self.segments}
        self._config = {}
        if backend == "inductor" and not self.static_kv:
            self._config = dict(CPU_INDUCTOR) if autotune else {"freezing": True}
        # merged chunks run as one call only where every GEMM is the C++ template (row-invariant)
        # and no layer is a mixture of experts (its routing gathers rows: one call per part)
        self.merges_rows = backend == "inductor" and autotune and not self.static_kv
        self.merges_rows &= all(layer.gate_up_weight is not None for layer in model.modules.layers)
        self._rows_fns: dict[tuple, object] = {}  # (segment or "head", rows) -> the rows-alone function
        self.checked: set[tuple] = set()  # those that gave the one-row graph's bits on their first call
        self.unmerged: set[tuple] = set()  # those that did not: part by part from then on
        self._head = None
        if model.modules.lm_head is not None:  # the LM head is a fifth of a small model's weights
            self._head = torch.compile(_own_code(self._head_fn()), **self._kwargs)
        self._seen: set[tuple] = set()  # (segment, rows), (("rows", segment), rows), ("head", rows) compiled
        self.compile_s = 0.0

    def handles(self, seqlen: int) -> bool:
        return seqlen <= self.max_chunk

    def merges(self, parts: Sequence[int]) -> bool:
        """Whether a merged chunk of these parts runs as one call that gives each part the bits
        of the one-row graph (``rows_alone``): decode rows only, at most ``max_chunk``."""
        return self.merges_rows and 1 < len(parts) <= self.max_chunk and all(n == 1 for n in parts)

    def __call__(
        self, hidden: torch.Tensor, input_pos: int, a: int, b: int, slot: int, rows_alone: bool = False
    ) -> torch.Tensor:
        """``rows_alone``: each row is a decode position (a merged chunk, ``merges``), computed in one
        call with the bits the one-row graph gives it (``rows``).

        # hidden: [S, D] -> [S, D]; layers [a, b) are local indices on segment boundaries
        """
        rows = hidden.shape[0]
        if rows_alone and rows > 1:
            return self.rows(hidden, [input_pos + r for r in range(rows)], [slot] * rows, a, b)
        hidden = _graph_input(hidden)
        for seg in self._segments_of(a, b):
            hidden = self._layers(self._fns[seg], (seg, rows), hidden, input_pos, slot)
        return hidden

    def rows(
        self, hidden: torch.Tensor, positions: Sequence[int], slots: Sequence[int], a: int, b: int
    ) -> torch.Tensor:
        """Decode rows, each at its own position of its own slot (a merged chunk's rows, one slot;
        a fused batch's, a slot each), in one call per segment whose rows get the bits the one-row
        graph gives each: attention per row, the GEMMs shared. On its first call a (segment, rows)
        graph is checked against the one-row graph, row by row; one that differs runs row by row
        from then on (``unmerged``, with a warning).

        # hidden: [S, D] -> [S, D]; positions, slots: S each
        """
        return self._bucketed(partial(self._rows, a=a, b=b), hidden, list(positions), list(slots))

    def _bucketed(self, run, hidden: torch.Tensor, *per_row: list) -> torch.Tensor:
        """``run(hidden, *per_row)`` on 2 or more rows, in pieces that have graphs (``buckets``:
        every count from 2 up to the largest), as few and as even as can be, in order (a row may
        attend to an earlier row's keys)."""
        n, top = hidden.shape[0], self.buckets[-1]
        if n < 2:
            raise ValueError(f"{n} row(s): a per-row graph runs 2 or more (one row runs the one-row graph)")
        pieces = -(-n // top)
        cuts = [n * i // pieces for i in range(pieces + 1)]
        return torch.cat([run(_graph_input(hidden[a:b]), *(x[a:b] for x in per_row)) for a, b in zip(cuts, cuts[1:])])

    def _rows(self, hidden: torch.Tensor, positions: list[int], slots: list[int], a: int, b: int) -> torch.Tensor:
        n = hidden.shape[0]
        for seg in self._segments_of(a, b):
            key = (seg, n)
            if key in self.unmerged:
                hidden = self._row_by_row(seg, hidden, positions, slots)
                continue
            fn = self._rows_fns.get(key)
            if fn is None:
                fn = self._rows_fns[key] = torch.compile(
                    _own_code(self._segment(*seg, per_row=True)), **self._kwargs
                )
            out = self._per_row(fn, (("rows", seg), n), hidden, positions, slots)
            if key not in self.checked:  # rewrites the cache rows, as plain decoding writes them
                out = self._check(key, out, self._row_by_row(seg, hidden, positions, slots))
            hidden = out
        return hidden

    def _segments_of(self, a: int, b: int) -> list[tuple[int, int]]:
        """The segments that make up local layers ``[a, b)``."""
        segs = [seg for seg in self.segments if a <= seg[0] < b]
        if not segs or segs[0][0] != a or segs[-1][1] != b:
            raise RuntimeError(f"layers [{a}, {b}) do not fall on the compiled segments {self.segments}")
        return segs

    def _row_by_row(
        self, seg: tuple[int, int], hidden: torch.Tensor, positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """Each row through the one-row graph, as plain decoding runs it. # hidden: [S, D] -> [S, D]"""
        return torch.cat([self._layers(self._fns[seg], (seg, 1), hidden[r : r + 1].clone(), p, s)
                          for r, (p, s) in enumerate(zip(positions, slots))])

    def _layers(self, fn, key: tuple, hidden: torch.Tensor, input_pos: int, slot: int) -> torch.Tensor:
        """One compiled segment on positions ``input_pos ..``, over the cache up to the last of them."""
        end = input_pos + hidden.shape[0]
        pos = self.positions[input_pos:end]
        kv_len = self.model.max_seq_len if self.static_kv else end
        kv_positions = self.positions[:kv_len]
        if not self.static_kv:
            torch._dynamo.maybe_mark_dynamic(kv_positions, 0)  # one graph for every length
        # a graph per row count: the C++ GEMM template (CPU_INDUCTOR) needs the rows static
        torch._dynamo.mark_static(hidden, 0)
        hidden = self._timed(key, fn, hidden, pos, kv_positions, slot)
        return hidden.clone() if self.static_kv else hidden  # a CUDA graph overwrites its output on the next replay

    def _per_row(
        self, fn, key: tuple, hidden: torch.Tensor, positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """A per-row segment (CPU only): row r at ``positions[r]`` over the first ``positions[r] + 1``
        positions of slot ``slots[r]``, each length a dynamic dimension of its own: attention must
        read exactly the one-row graph's keys (appended masked keys would move a kernel's
        vectorised tail, and with it the order of a sum). The slots are a tensor, so that they are
        not specialised on."""
        device = self.positions.device
        pos = torch.as_tensor(positions, device=device)
        kv_positions = tuple(self.positions[: p + 1] for p in positions)
        for kvp in kv_positions:
            torch._dynamo.maybe_mark_dynamic(kvp, 0)
        torch._dynamo.mark_static(hidden, 0)
        torch._dynamo.mark_static(pos, 0)
        with torch.fx.experimental._config.patch(use_duck_shape=False):  # equal lengths stay distinct symbols
            return self._timed(key, fn, hidden, pos, kv_positions, torch.as_tensor(slots, device=device))

    def _timed(self, key: tuple, fn, *args):
        """``fn(*args)`` under the stage's inductor settings, its time counted as compile time on
        ``key``'s first call (that is when dynamo compiles)."""
        first = key not in self._seen
        t0 = time.perf_counter()
        with torch._inductor.config.patch(self._config):
            out = fn(*args)
        if first:
            self._seen.add(key)
            spent = time.perf_counter() - t0
            self.compile_s += spent
            log.info("compiled %s for %d row(s) in %.1f s", key[0], key[1], spent)
        return out

    def _check(self, key: tuple, merged: torch.Tensor, alone: torch.Tensor) -> torch.Tensor:
        """``alone``'s bits, and whether ``key``'s rows-alone graph gave them (recorded)."""
        if torch.equal(merged, alone):
            self.checked.add(key)
        else:
            self.unmerged.add(key)
            log.warning("compiled %s on %d rows differs from its one-row graph: row by row from now on", *key)
        return alone

    def greedy(self, hidden: torch.Tensor, rows_alone: bool = False) -> torch.Tensor:
        """The final norm, LM head and argmax, compiled. ``rows_alone``: each row with the one-row
        graph's bits, in one call (checked once per row count, as ``rows``').

        # hidden: [S, D] -> [S] token ids
        """
        rows = hidden.shape[0]
        if not rows_alone or rows == 1:
            return self._greedy(self._head, ("head", rows), _graph_input(hidden))
        return self._bucketed(self._greedy_rows, hidden)

    def _greedy_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        key = ("head", rows)
        one_by_one = [hidden[r : r + 1].clone() for r in range(rows)] if key not in self.checked else []
        if key in self.unmerged:
            return torch.cat([self._greedy(self._head, ("head", 1), h) for h in one_by_one])
        fn = self._rows_fns.get(key)
        if fn is None:  # a graph per row count (static shapes: the GEMM sees the rows it runs)
            fn = self._rows_fns[key] = torch.compile(_own_code(self._head_fn()), **{**self._kwargs, "dynamic": False})
        ids = self._greedy(fn, ("head alone", rows), hidden)
        if one_by_one:
            ids = self._check(key, ids, torch.cat([self._greedy(self._head, ("head", 1), h) for h in one_by_one]))
        return ids

    def _greedy(self, fn, key: tuple, hidden: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_static(hidden, 0)  # a graph per row count, as ``_layers``
        ids = self._timed(key, fn, hidden)
        return ids.clone() if self.static_kv else ids

    def _head_fn(self):
        modules = self.model.modules

        def head(hidden: torch.Tensor) -> torch.Tensor:
            logits = softcap(modules.lm_head(modules.norm(hidden)), modules.softcap)
            return logits.argmax(dim=-1)

        return head

    def _segment(self, a: int, b: int, per_row: bool = False):
        """Layers ``[a, b)`` as one function to compile. ``per_row``: every row is a decode position
        of its own, with its own slot and prefix (``rows``), and its attention is the one-row
        graph's call (its one query over its own prefix, the mask that graph builds); the GEMMs,
        norms and MLP run once over all rows."""
        model, static_kv = self.model, self.static_kv
        layers = [model.modules.layers[i] for i in range(a, b)]
        windows = [getattr(layer, "sliding_window", None) for layer in layers]  # Gemma 3's local layers
        cache = model.cache

        def forward(hidden: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor, slot):
            # hidden: [S, D]; input_pos: [S]; kv_positions: [kv_len] (the positions attention reads) and
            # slot: an int; per_row: S tensors [kv_len_r] and a [S] tensor
            cos, sin = model.cos[input_pos][None, :, None], model.sin[input_pos][None, :, None]
            # the calls of attention in each layer, (positions, the keys' positions, slot)
            calls = [(input_pos, kv_positions, slot)]
            if per_row:  # kv_positions, slot: row r's in each, its keys gathered from its slot by index
                calls = [(input_pos[r : r + 1], kv_positions[r], slot[r : r + 1]) for r in range(hidden.shape[0])]
            masks = {}  # window (None: a global layer) -> each call's mask
            for w in set(windows):
                masks[w] = []
                for at, kvp, _ in calls:
                    causal = kvp[None, :] <= at[:, None]
                    if w is not None:  # a local layer: its window as a mask, not a slice (whose start is a shape)
                        masks[w].append((causal & (at[:, None] - kvp[None, :] < w))[None, None])
                    else:  # one query over its valid prefix needs none
                        masks[w].append(causal[None, None] if static_kv or at.shape[0] > 1 else None)

            def kv_update(kbuf, vbuf, slot, at, end, k, v):
                # k, v: [1, kv_heads, n, hd], written at positions ``at`` -> the slot's first ``end`` positions
                if per_row:  # slot: [1] (a 0-d index would be read as an int: data-dependent)
                    kbuf[slot, :, at] = k[0].transpose(0, 1)
                    vbuf[slot, :, at] = v[0].transpose(0, 1)
                    return kbuf[slot][:, :, :end], vbuf[slot][:, :, :end]
                kbuf[slot][:, at] = k[0]
                vbuf[slot][:, at] = v[0]
                return kbuf[slot : slot + 1, :, :end], vbuf[slot : slot + 1, :, :end]

            def parts(i: int) -> list:  # (rows, kv_update, mask) per call of attention in layer a + i
                kbuf, vbuf = cache.k[a + i], cache.v[a + i]
                return [
                    (at.shape[0], partial(kv_update, kbuf, vbuf, s, at, kvp.shape[0]), mask)
                    for (at, kvp, s), mask in zip(calls, masks[windows[i]])
                ]

            h = hidden[None]
            for i, layer in enumerate(layers):
                h = decoder_layer_forward_ragged(layer, h, cos, sin, parts(i), window_in_mask=True)
            return h[0]

        return forward


def _graph_input(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as the graphs take it: a copy of a view (its storage offset) or of a tensor made
    outside inference mode (received from another rank, or a caller's), since the graphs guard on
    both and would recompile."""
    return hidden.clone() if hidden.storage_offset() or not hidden.is_inference() else hidden


def row_buckets(max_chunk: int, max_rows: int) -> list[int]:
    """The row counts of the per-row graphs (``CompiledStep.rows``): every count from 2 up to the
    larger of ``max_chunk`` (a merged chunk's rows) and ``max_rows`` (a fused batch's) capped at
    ``FUSED_ROWS``; a larger batch runs in pieces."""
    # with fused batches, a graph of 3 rows at least: a batch of an odd row count then splits into
    # pieces of 2 or more (of 2 each, one would be a single row, which has no per-row graph)
    return list(range(2, max(max_chunk, min(max_rows, FUSED_ROWS), 3 if max_rows > 1 else 2) + 1))


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object and
    checks a call's guards against each of them in turn: every segment of every stage would
    otherwise share one list (slow guards, and its recompile limit)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(fn):x}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def maybe_compile(
    model, setting: str, boundaries: Sequence[int] = (), max_chunk: int = 3, max_rows: int = 0
) -> bool:
    """Give ``model`` a ``CompiledStep`` when ``setting`` asks for one; True if it did.

    ``auto`` compiles on CUDA, where CUDA graphs remove the launch cost that dominates a
    stage at batch 1. On the CPU it does not: compiling takes minutes on a few cores and
    compiled output is not bit-identical to transformers' (see the module docstring), so
    the CPU default stays the exact eager path and ``on`` is the choice to make for long runs.
    """
    if not compiles(setting, model.device.type):
        return False
    model.step = CompiledStep(model, boundaries, max_chunk, max_rows=max_rows)
    return True
