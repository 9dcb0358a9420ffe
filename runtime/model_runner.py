"""Runs the layers of one stage on chunks of positions, with the stage's KV cache.

A ``StageModel`` is pure compute on one device: it embeds tokens (stage 0),
runs any contiguous sub-range of its layers on a chunk starting at the cache's
valid length, and applies the final norm and LM head (last stage, and exit
heads). It decides nothing: the Stage state machine tells it what to run.

Everything it touches lives on ``self.device``: weights, KV cache, RoPE tables,
masks. A value reaches the host only through ``to_host`` (one transfer per
call), and only where a decision needs it: the final layer's tokens of a
finished item here, a head's (token, confidence) in exit_heads.py. Nothing in
the layer loop reads a device value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from . import row_invariant
from .hf_adapter import (
    StageModules,
    causal_chunk_mask,
    decoder_layer_forward,
    decoder_layer_forward_ragged,
    rope_tables,
    softcap,
)
from .kv_cache import CacheOverflowError, KVCache

log = logging.getLogger("adadecode.compile")


def to_host(t: torch.Tensor) -> list:
    """The one device-to-host transfer of a decision (a blocking sync on a GPU)."""
    return t.tolist()


class StageModel:
    def __init__(self, modules: StageModules, args, max_seq_len: int, num_slots: int = 1):
        self.modules = modules
        self.args = args
        self.start, self.end = modules.start, modules.end
        param = next(
            p for m in (modules.layers, modules.embed, modules.lm_head) if m is not None for p in m.parameters()
        )
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache()
        self.cache.setup(
            self.end - self.start, num_slots, args.num_kv_heads, max_seq_len, args.head_dim, self.dtype, self.device
        )
        self.cos, self.sin = rope_tables(modules.rotary, max_seq_len, self.dtype, self.device)  # [max_len, rotary_dim]
        self.step = None  # a compiled layer loop (runtime/compiled_step.py) replaces run_layers' body
        self.row_invariant = "auto"  # merged rows get the bits they get alone (runtime/row_invariant.py)

    @property
    def merges_rows(self) -> bool:
        """Whether decode rows (a merged chunk's, a fused batch's) run as one compiled call with each
        row's own bits: a compiled step whose GEMMs allow it (``CompiledStep.merges_rows``), with
        ``row_invariant: auto``."""
        return self.step is not None and self.row_invariant == "auto" and self.step.merges_rows

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_len

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    def cache_length(self, layer: int, slot: int = 0) -> int:
        return self.cache.length(layer - self.start, slot)

    def truncate(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)

    @torch.inference_mode()
    def warm_up(self, slot: int = 0) -> float:
        """With a compiled step, compile now the graphs decoding calls, through the calls it makes:
        a decode row, a merged chunk of 2 to ``max_chunk`` decode rows (``run_layers`` with its
        parts, then ``greedy_tokens``), and a fused batch of each larger size the step runs
        (``CompiledStep.buckets``), so that no generation pays a compile midway, bar a prompt of
        2 to ``max_chunk`` tokens. They run on scratch positions of ``slot``, reset after; with
        several slots a decode row runs on another one too (the one-row graph takes the slot as
        an int, which dynamo specialises on the first call and makes symbolic on the second).
        Returns the seconds it took (0 without a compiled step).

        A prompt of ``max_chunk + 1`` rows (eager) comes first: dynamo specialises an attended
        length of 0 or 1, and that length is a dynamic dimension of the graphs."""
        step = self.step
        if step is None:
            return 0.0
        t0 = time.perf_counter()
        chunk = step.max_chunk
        # fused batches larger than a merged chunk: only where they run as one call (else row by row)
        batches = [n for n in step.buckets if n > chunk] if self.merges_rows else []
        sizes = [chunk + 1, *range(1, chunk + 1), *batches]
        if sum(sizes) > self.max_seq_len:
            log.info("no compile warm-up: a cache of %d positions is shorter than its %d", self.max_seq_len, sum(sizes))
            return 0.0
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rows(n: int) -> torch.Tensor:
            return (torch.randn(n, self.args.hidden_size, generator=gen) * 0.5).to(self.device, self.dtype)

        self.reset(slot)
        at = 0
        for i, n in enumerate(sizes):
            hidden = rows(n)
            if n > chunk and i:  # a fused batch's rows (their slots do not change the graph)
                a, b = 0, self.end - self.start
                out = step.rows(hidden, list(range(at, at + n)), [slot] * n, a, b)
                self.cache.advance(a, b, slot, at + n)
            else:
                out = self.run_layers(hidden, at, self.start, self.end, slot, parts=(1,) * n if i else None)
            if i and self.modules.lm_head is not None:
                self.greedy_tokens(out)
            at += n
        self.reset(slot)
        if self.num_slots > 1:
            other = (slot + 1) % self.num_slots
            self.run_layers(rows(chunk + 1), 0, self.start, self.end, other)
            self.run_layers(rows(1), chunk + 1, self.start, self.end, other)
            self.reset(other)
        spent = time.perf_counter() - t0
        log.info("compiled the graphs of chunks of 1 to %d rows and batches of %s in %.1f s", chunk, batches, spent)
        return spent

    @torch.inference_mode()
    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        """# tokens: S ids (host) -> [S, D] on the device"""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        return self.modules.embed(ids)

    @torch.inference_mode()
    def run_layers(
        self, hidden: torch.Tensor, input_pos: int, first: int, last: int, slot: int = 0,
        parts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run global layers ``[first, last)`` on positions ``input_pos ..``. ``parts``: the row
        counts of the calls plain decoding makes for these rows (a merged chunk); unless
        ``row_invariant`` is off, each part gets their bits: eager, the layers once with every op
        row-invariant; compiled, decode rows in one call whose rows get the one-row graph's bits
        (``auto``, where ``CompiledStep.merges``), else each part through the graphs plain
        decoding runs for it.

        # hidden: [S, D] -> [S, D]
        """
        split = parts if parts is not None and len(parts) > 1 and self.row_invariant != "off" else None
        alone = split is not None and self.merges_rows and self.step.merges(split)
        if split is not None and self.step is not None and not alone:
            outs, at = [], 0
            for n in split:
                outs.append(self.run_layers(hidden[at : at + n], input_pos + at, first, last, slot))
                at += n
            return torch.cat(outs)
        seqlen = hidden.shape[0]
        end = input_pos + seqlen
        self._check_room(end)
        a, b = first - self.start, last - self.start
        self.cache.check_write(a, b, slot, input_pos)
        if self.step is not None and self.step.handles(seqlen):
            out = self.step(hidden, input_pos, a, b, slot, rows_alone=alone)
        else:
            out = self._layers(hidden, input_pos, a, b, slot, split)
        self.cache.advance(a, b, slot, end)
        return out

    @torch.inference_mode()
    def run_layers_batch(
        self, chunks: Sequence[tuple[torch.Tensor, int, int]], first: int, last: int, exact: bool = True,
        parts: Sequence[Sequence[int]] | None = None,
    ) -> list[torch.Tensor]:
        """``run_layers`` for the chunks of several sequences at once, ``(hidden, input_pos, slot)``
        each, attention per sequence over its own slot.

        ``exact``: layer by layer, each chunk through the layer's own forward, as if alone:
        the same bits as one sequence at a time (a matmul's rows depend on how many rows it
        has: kernels differ by row count, on CPUs as on GPUs), with the layer's weights partly
        still in cache for the next sequence; with a compiled step, sequence by sequence
        through it, as alone. Otherwise the projections and the MLP run once
        over all rows: fewer passes, but each sequence's result may differ in the last bits
        from its result alone (docs/serving.md, Batching), unless ``row_invariant`` is on: then
        every row gets the bits it gets alone in the shared calls too (runtime/row_invariant.py).
        ``parts``: per chunk, as ``run_layers``' (None: each chunk is one part).

        # each hidden: [S_i, D] -> [S_i, D]
        """
        invariant = self.row_invariant != "off"
        splits = [tuple(p) for p in parts] if parts is not None else [(h.shape[0],) for h, _, _ in chunks]
        if len(chunks) > 1 and not exact and self.merges_rows:
            return self._compiled_batch(chunks, first, last, splits)
        if len(chunks) == 1 or (self.step is not None and (exact or invariant)):
            # one sequence, or a compiled step (which runs one sequence at a time): each chunk
            # exactly as run_layers runs it alone
            return [
                self.run_layers(hidden, input_pos, first, last, slot, split)
                for (hidden, input_pos, slot), split in zip(chunks, splits)
            ]
        a, b = first - self.start, last - self.start
        self._check_writes(chunks, a, b)
        rows = [h.shape[0] for h, _, _ in chunks]
        ropes = [self._rope(p, n) for (_, p, _), n in zip(chunks, rows)]
        masks = [causal_chunk_mask(p, n, self.device) for (_, p, _), n in zip(chunks, rows)]
        cache = self.cache
        if exact:
            hs = [hidden[None] for hidden, _, _ in chunks]
            for li in range(a, b):
                layer = self.modules.layers[li]
                for i, ((_, pos, slot), (cos, sin), mask) in enumerate(zip(chunks, ropes, masks)):
                    hs[i] = decoder_layer_forward(
                        layer, hs[i], cos, sin,
                        lambda k, v, li=li, slot=slot, pos=pos: cache.write(li, slot, pos, k, v), mask,
                        splits[i] if invariant and len(splits[i]) > 1 else None, self._fuse,
                    )
            out = [h[0] for h in hs]
        else:
            h = torch.cat([hidden for hidden, _, _ in chunks])[None]
            cos, sin = (torch.cat([r[k] for r in ropes], dim=1) for k in (0, 1))
            for li in range(a, b):
                layer_parts = [
                    (n, lambda k, v, li=li, slot=slot, pos=pos: cache.write(li, slot, pos, k, v), mask)
                    for (_, pos, slot), n, mask in zip(chunks, rows, masks)
                ]
                h = decoder_layer_forward_ragged(
                    self.modules.layers[li], h, cos, sin, layer_parts, splits if invariant else None, self._fuse
                )
            out = list(h[0].split(rows))
        self._advance(chunks, a, b)
        return out

    def _compiled_batch(
        self, chunks: Sequence[tuple[torch.Tensor, int, int]], first: int, last: int, splits: list[tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """A fused batch through the compiled step (``merges_rows``): the decode rows of every chunk (a
        decode step, or a merged chunk's rows) in one call with each row's own bits
        (``CompiledStep.rows``); a chunk with a prompt part on its own, as ``run_layers`` runs it alone."""
        assert self.step is not None
        decode = [i for i, split in enumerate(splits) if all(n == 1 for n in split)]
        if sum(chunks[i][0].shape[0] for i in decode) < 2:
            decode = []
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for i, ((hidden, input_pos, slot), split) in enumerate(zip(chunks, splits)):
            if i not in decode:
                out[i] = self.run_layers(hidden, input_pos, first, last, slot, split)
        if decode:
            a, b = first - self.start, last - self.start
            decoding = [chunks[i] for i in decode]
            self._check_writes(decoding, a, b)
            positions = [p for h, input_pos, _ in decoding for p in range(input_pos, input_pos + h.shape[0])]
            slots = [slot for h, _, slot in decoding for _ in range(h.shape[0])]
            merged = self.step.rows(torch.cat([h for h, _, _ in decoding]), positions, slots, a, b)
            self._advance(decoding, a, b)
            for i, part in zip(decode, merged.split([h.shape[0] for h, _, _ in decoding])):
                out[i] = part
        return out  # type: ignore[return-value]

    def _check_writes(self, chunks: Sequence[tuple[torch.Tensor, int, int]], a: int, b: int) -> None:
        """Before chunks of several sequences write local layers ``[a, b)``: room, and each at its length."""
        for hidden, input_pos, slot in chunks:
            self._check_room(input_pos + hidden.shape[0])
            self.cache.check_write(a, b, slot, input_pos)

    def _advance(self, chunks: Sequence[tuple[torch.Tensor, int, int]], a: int, b: int) -> None:
        """After they wrote: each slot's length of layers ``[a, b)`` past its chunk."""
        for hidden, input_pos, slot in chunks:
            self.cache.advance(a, b, slot, input_pos + hidden.shape[0])

    def _check_room(self, end: int) -> None:
        if end > self.cache.max_len:
            raise CacheOverflowError(
                f"sequence needs {end} positions but the KV cache holds {self.cache.max_len}; "
                "raise model.max_seq_len or shorten the prompt / max_new_tokens"
            )

    def _rope(self, input_pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions ``input_pos .. input_pos + n``. # -> 2 x [1, n, 1, head_dim]"""
        end = input_pos + n
        return self.cos[input_pos:end][None, :, None], self.sin[input_pos:end][None, :, None]

    def _layers(
        self, hidden: torch.Tensor, input_pos: int, a: int, b: int, slot: int, split: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Local layers ``[a, b)`` over the exact valid prefix of the cache (shapes as in plain decoding)."""
        seqlen = hidden.shape[0]
        cos, sin = self._rope(input_pos, seqlen)
        mask = causal_chunk_mask(input_pos, seqlen, self.device)
        h = hidden[None]
        cache = self.cache
        for li in range(a, b):

            def kv_update(k, v, li=li):
                return cache.write(li, slot, input_pos, k, v)

            h = decoder_layer_forward(self.modules.layers[li], h, cos, sin, kv_update, mask, split, self._fuse)
        return h[0]

    @property
    def _fuse(self) -> bool:
        """Row-invariant GEMMs may share one call across rows where the kernel allows (``auto``)."""
        return self.row_invariant == "auto"

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, alone: bool = True) -> torch.Tensor:
        """Final norm and LM head (and Gemma's logit softcap, where the config sets one). ``alone``
        (decode rows: every row plain decoding predicts is a call of its own): unless
        ``row_invariant`` is off, each row with the bits it gets alone; False: one call for all
        rows, as a prefill's (and transformers') rows get it. # hidden: [S, D] -> [S, V]"""
        rows = hidden.shape[0]
        if rows == 1 or not alone or self.row_invariant == "off":
            return softcap(self.modules.lm_head(self.modules.norm(hidden)), self.modules.softcap)
        head = self.modules.lm_head
        logits = row_invariant.linear(self.modules.norm(hidden), head.weight, head.bias, (1,) * rows, self._fuse)
        return softcap(logits, self.modules.softcap)

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """The final layer's greedy token after each position, in one transfer. # hidden: [S, D]"""
        rows = hidden.shape[0]
        step = self.step
        if step is not None and rows > 1 and self.row_invariant != "off":  # each row with its bits alone
            if self.merges_rows:
                return to_host(step.greedy(hidden, rows_alone=True))  # in one call
            return to_host(torch.cat([step.greedy(hidden[i : i + 1]) for i in range(rows)]))
        if step is not None and step.handles(rows):
            return to_host(step.greedy(hidden))
        return to_host(self.logits(hidden).argmax(dim=-1))
