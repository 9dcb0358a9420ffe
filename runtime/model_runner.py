"""Runs the layers of one stage on chunks of positions, with the stage's KV cache.

A ``StageModel`` is pure compute: it embeds tokens (stage 0), runs any
contiguous sub-range of its layers on a chunk starting at the cache's valid
length, and applies the final norm and LM head (last stage, and exit heads
later). It decides nothing: the Stage state machine tells it what to run.
"""

from __future__ import annotations

import torch

from .hf_adapter import StageModules, causal_chunk_mask, decoder_layer_forward, rope_tables
from .kv_cache import KVCache


class StageModel:
    def __init__(self, modules: StageModules, args, max_seq_len: int, num_slots: int = 1):
        self.modules = modules
        self.args = args
        self.start, self.end = modules.start, modules.end
        dtype = next(modules.layers.parameters()).dtype if len(modules.layers) else torch.float32
        self.dtype = dtype
        self.cache = KVCache()
        self.cache.setup(self.end - self.start, num_slots, args.num_kv_heads, max_seq_len, args.head_dim, dtype)
        self.cos, self.sin = rope_tables(modules.rotary, max_seq_len, dtype)  # [max_seq_len, head_dim]

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_len

    def cache_length(self, layer: int, slot: int = 0) -> int:
        return self.cache.length(layer - self.start, slot)

    def truncate(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [S] -> [S, D]
        return self.modules.embed(tokens)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, input_pos: int, first: int, last: int, slot: int = 0) -> torch.Tensor:
        """Run global layers ``[first, last)`` on positions ``input_pos ..``.

        # hidden: [S, D] -> [S, D]
        """
        seqlen = hidden.shape[0]
        end = input_pos + seqlen
        if end > self.cache.max_len:
            from .kv_cache import CacheOverflowError

            raise CacheOverflowError(
                f"sequence needs {end} positions but the KV cache holds {self.cache.max_len}; "
                "raise model.max_seq_len or shorten the prompt / max_new_tokens"
            )
        cos, sin = self.cos[input_pos:end][None, :, None], self.sin[input_pos:end][None, :, None]
        mask = causal_chunk_mask(input_pos, seqlen)
        h = hidden[None]
        cache = self.cache
        for li in range(first - self.start, last - self.start):

            def kv_update(k, v, li=li):
                return cache.update(li, slot, input_pos, k, v)

            h = decoder_layer_forward(self.modules.layers[li], h, cos, sin, kv_update, mask)
        return h[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head. # hidden: [S, D] -> [S, V]"""
        return self.modules.lm_head(self.modules.norm(hidden))
