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
- Shapes: one graph per segment and chunk size ``S`` in ``1..max_chunk``
  (``max_inflight + 1``, the largest merged chunk); larger chunks (prefills)
  run eagerly. Positions are tensors, so nothing recompiles as a sequence
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

Compile time is paid on a segment's first use of each chunk size (``compile_s``,
reported with the first generation's stats); inductor caches its work on disk, in
``$TORCHINDUCTOR_CACHE_DIR`` (default: ``inductor/`` in adadecode's cache directory).
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Sequence

import torch
import torch._inductor.config

from .hf_adapter import decoder_layer_forward, softcap
from .params import compiles

log = logging.getLogger("adadecode.compile")


# Inductor settings for CPU stages. Applied around each call (compiling happens lazily, in the
# first call of each shape), since freezing is not honoured through torch.compile(options=...).
CPU_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` keyword arguments for a stage on ``device``."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
    return {"fullgraph": True}


class CompiledStep:
    """Runs local layers ``[a, b)`` of a ``StageModel`` through compiled segments."""

    def __init__(
        self, model, boundaries: Sequence[int], max_chunk: int, backend: str = "inductor", autotune: bool = True
    ):
        """``boundaries``: global layers where segments start or end (the stage's ends and head
        layers); ``max_chunk``: the largest chunk compiled; ``backend``: torch.compile's;
        ``autotune``: on the CPU, let inductor pick its C++ GEMM template (what makes it pay,
        and most of the compile time)."""
        self.model = model
        self.max_chunk = max_chunk
        self.static_kv = model.device.type == "cuda"  # CUDA graphs need every shape static
        self.positions = torch.arange(model.max_seq_len, device=model.device)
        cuts = sorted({model.start, model.end, *(l for l in boundaries if model.start < l < model.end)})
        self.segments = [(x - model.start, y - model.start) for x, y in zip(cuts, cuts[1:])]
        kwargs = compile_options(model.device) if backend == "inductor" else {"backend": backend, "fullgraph": True}
        self._fns = {seg: torch.compile(_own_code(self._segment(*seg)), **kwargs) for seg in self.segments}
        self._config = {}
        if backend == "inductor" and not self.static_kv:
            self._config = CPU_INDUCTOR if autotune else {"freezing": True}
        self._head = None
        if model.modules.lm_head is not None:  # the LM head is a fifth of a small model's weights
            def head(hidden: torch.Tensor) -> torch.Tensor:
                logits = softcap(model.modules.lm_head(model.modules.norm(hidden)), model.modules.softcap)
                return logits.argmax(dim=-1)

            self._head = torch.compile(_own_code(head), **kwargs)
        self._seen: set[tuple[tuple[int, int], int]] = set()
        self.compile_s = 0.0

    def handles(self, seqlen: int) -> bool:
        return seqlen <= self.max_chunk

    def __call__(self, hidden: torch.Tensor, input_pos: int, a: int, b: int, slot: int) -> torch.Tensor:
        """# hidden: [S, D] -> [S, D]; layers [a, b) are local indices on segment boundaries"""
        seqlen = hidden.shape[0]
        end = input_pos + seqlen
        pos = self.positions[input_pos:end]
        kv_len = self.model.max_seq_len if self.static_kv else end
        kv_positions = self.positions[:kv_len]
        if not self.static_kv:
            torch._dynamo.maybe_mark_dynamic(kv_positions, 0)  # one graph for every length
        at = a
        for seg in self.segments:
            if seg[0] < at or seg[0] >= b:
                continue
            if seg[0] != at or seg[1] > b:
                raise RuntimeError(f"layers [{a}, {b}) do not fall on the compiled segments {self.segments}")
            first = (seg, seqlen) not in self._seen
            t0 = time.perf_counter()
            with torch._inductor.config.patch(self._config):
                hidden = self._fns[seg](hidden, pos, kv_positions, slot)
            if self.static_kv:
                hidden = hidden.clone()  # a CUDA graph overwrites its output on the next replay
            if first:
                self._seen.add((seg, seqlen))
                spent = time.perf_counter() - t0
                self.compile_s += spent
                log.info("compiled layers %s for %d position(s) in %.1f s", seg, seqlen, spent)
            at = seg[1]
        return hidden

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, LM head and argmax, compiled. # hidden: [S, D] -> [S] token ids"""
        first = ("head", hidden.shape[0]) not in self._seen
        t0 = time.perf_counter()
        hidden = hidden.clone() if hidden.storage_offset() else hidden  # a view's offset would be a guard
        with torch._inductor.config.patch(self._config):
            ids = self._head(hidden)
        if first:
            self._seen.add(("head", hidden.shape[0]))
            self.compile_s += time.perf_counter() - t0
        return ids.clone() if self.static_kv else ids

    def _segment(self, a: int, b: int):
        model, static_kv = self.model, self.static_kv
        layers = [model.modules.layers[i] for i in range(a, b)]
        windows = [getattr(layer, "sliding_window", None) for layer in layers]  # Gemma 3's local layers
        cache = model.cache

        def forward(hidden: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor, slot: int):
            # hidden: [S, D]; input_pos: [S]; kv_positions: [kv_len] (the positions attention reads)
            cos, sin = model.cos[input_pos][None, :, None], model.sin[input_pos][None, :, None]
            causal = kv_positions[None, :] <= input_pos[:, None]
            mask = None
            if static_kv or hidden.shape[0] > 1:  # one query over its valid prefix needs none
                mask = causal[None, None]
            local = {}  # a local layer's window is a mask here, not a slice (whose start would be a shape)
            for w in {w for w in windows if w is not None}:
                local[w] = (causal & (input_pos[:, None] - kv_positions[None, :] < w))[None, None]
            kv_len = kv_positions.shape[0]
            h = hidden[None]
            for i, layer in enumerate(layers):
                kbuf, vbuf = cache.k[a + i], cache.v[a + i]

                def kv_update(k, v, kbuf=kbuf, vbuf=vbuf):
                    # k, v: [1, kv_heads, S, hd] -> the slot's first kv_len positions
                    kbuf[slot][:, input_pos] = k[0]
                    vbuf[slot][:, input_pos] = v[0]
                    return kbuf[slot : slot + 1, :, :kv_len], vbuf[slot : slot + 1, :, :kv_len]

                layer_mask = mask if windows[i] is None else local[windows[i]]
                h = decoder_layer_forward(layer, h, cos, sin, kv_update, layer_mask, window_in_mask=True)
            return h[0]

        return forward


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object and
    checks a call's guards against each of them in turn: every segment of every stage would
    otherwise share one list (slow guards, and its recompile limit)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(fn):x}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def maybe_compile(model, setting: str, boundaries: Sequence[int] = (), max_chunk: int = 3) -> bool:
    """Give ``model`` a ``CompiledStep`` when ``setting`` asks for one; True if it did.

    ``auto`` compiles on CUDA, where CUDA graphs remove the launch cost that dominates a
    stage at batch 1. On the CPU it does not: compiling takes minutes on a few cores and
    compiled output is not bit-identical to transformers' (see the module docstring), so
    the CPU default stays the exact eager path and ``on`` is the choice to make for long runs.
    """
    if not compiles(setting, model.device.type):
        return False
    # Inductor keeps compiled kernels and autotuning results on disk; keep them with our other
    # caches rather than in /tmp, so that a restart (or another rank) reuses them.
    from .model_source import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    model.step = CompiledStep(model, boundaries, max_chunk)
    return True
