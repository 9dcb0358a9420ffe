"""Static per-layer KV cache for one pipeline stage.

Theory of operation: every layer of the stage has a preallocated key and value
buffer, ``[num_slots, kv_heads, max_len, head_dim]``; a sequence occupies one
slot. For each (layer, slot) the cache tracks a *valid length*: positions
``[0, length)`` hold the keys and values of committed or in-flight tokens.

Rules (docs/design.md, invariant 1):

- A write appends a chunk of consecutive positions that starts exactly at the
  layer's valid length; anything else is a bug upstream and raises.
- Attention reads only the valid prefix (a slice, not a mask over the whole
  buffer), so a chunk sees exactly the shapes plain decoding would, which is
  what keeps tokens bit-identical.
- Rollback is a length move: ``truncate`` lowers the valid length and later
  writes overwrite the stale entries. Nothing is copied or zeroed.
- A local layer (Gemma 3's sliding window) attends to the last ``window``
  positions of the prefix a write returns (``hf_adapter.sliding_window_keys``);
  its buffer still holds every position, so a rollback anywhere finds its
  window intact (a ring buffer of ``window`` plus the longest rollback would
  save that memory; not written).

The cache knows nothing of epochs, tokens or acceptance; the Stage does.
"""

from __future__ import annotations

import torch

from .params import CacheOverflowError


def kv_bytes_per_position(num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one layer's cache holds per position: a key and a value per KV head (the one formula
    that serve's memory check and the simulator's costs use)."""
    return 2 * num_kv_heads * head_dim * itemsize


class KVCache:
    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[list[int]] = []  # [layer][slot]
        self.max_len = 0

    def setup(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocate the buffers once; a second call with the same shape keeps them."""
        shape = (num_slots, kv_heads, max_len, head_dim)
        device = torch.device(device)
        k0 = self.k[0] if self.k else None
        if len(self.k) == num_layers and k0 is not None and (k0.shape, k0.dtype, k0.device) == (shape, dtype, device):
            self.reset()
            return
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [[0] * num_slots for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def num_slots(self) -> int:
        return len(self.lengths[0]) if self.lengths else 0

    def length(self, layer: int, slot: int = 0) -> int:
        return self.lengths[layer][slot]

    def update(
        self, layer: int, slot: int, input_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk at ``input_pos`` and return the valid prefix to attend over.

        # k, v: [1, kv_heads, S, head_dim] -> returns [1, kv_heads, input_pos + S, head_dim]
        """
        self.check_write(layer, layer + 1, slot, input_pos)
        out = self.write(layer, slot, input_pos, k, v)
        self.advance(layer, layer + 1, slot, input_pos + k.shape[2])
        return out

    # A chunk through layers [a, b) is checked once, written layer by layer, then advanced
    # once: the writes are pure tensor work (nothing the compiled layer loop must guard on).

    def check_write(self, a: int, b: int, slot: int, input_pos: int) -> None:
        """Raise unless every layer in ``[a, b)`` of ``slot`` holds exactly ``input_pos`` positions."""
        for layer in range(a, b):
            length = self.lengths[layer][slot]
            if input_pos != length:
                raise RuntimeError(
                    f"KV cache write at position {input_pos} but layer {layer} slot {slot} holds {length} "
                    "positions; a chunk must start exactly at the valid length (docs/design.md, invariant 1)"
                )

    def write(
        self, layer: int, slot: int, input_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values at ``input_pos ..`` and return the prefix up to the chunk's end.

        # k, v: [1, kv_heads, S, head_dim] -> returns [1, kv_heads, input_pos + S, head_dim]
        """
        end = input_pos + k.shape[2]
        if end > self.max_len:
            raise CacheOverflowError(
                f"sequence needs {end} positions but the KV cache holds {self.max_len}; "
                "raise model.max_seq_len or shorten the prompt / max_new_tokens"
            )
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf[slot : slot + 1, :, input_pos:end] = k
        vbuf[slot : slot + 1, :, input_pos:end] = v
        return kbuf[slot : slot + 1, :, :end], vbuf[slot : slot + 1, :, :end]

    def advance(self, a: int, b: int, slot: int, length: int) -> None:
        """Record that layers ``[a, b)`` of ``slot`` now hold ``length`` positions."""
        for layer in range(a, b):
            self.lengths[layer][slot] = length

    def truncate(self, slot: int, length: int) -> None:
        """Roll every layer of ``slot`` back to at most ``length`` positions."""
        for per_slot in self.lengths:
            per_slot[slot] = min(per_slot[slot], length)

    def reset(self, slot: int | None = None) -> None:
        for per_slot in self.lengths:
            for s in range(len(per_slot)) if slot is None else (slot,):
                per_slot[s] = 0
