"""A fake StageModel and fake exit heads, for driving the Stage's scheduler exactly.

The fake model keeps the StageModel interface the Stage uses (runtime/model_runner.py)
and nothing else. Its hidden state is a row of two integers per position,
``[pos, value]`` (int64, so every result is exact and chunking cannot change it).
Layer ``j`` caches the value entering it at each position and outputs a hash of
``(j, value, every entry cached at j so far)``, so a stale, missing or misplaced cache
entry changes every later value and, through ``greedy_tokens``, later tokens. ``pos``
is written by ``run_layers`` so that fake heads and tests can tell rows apart.

Every ``run_layers`` call is recorded as ``(slot, pos, first_layer, last_layer, rows)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

VOCAB = 32
_EMBED, _FINAL = 0x51, 0xF1


def mix(*xs: int) -> int:
    """A deterministic 62-bit hash of ints (``hash()`` is not: it is salted per process)."""
    h = 0x243F6A8885A308D3
    for x in xs:
        h = ((h ^ x) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & ((1 << 62) - 1)


class FakeCacheError(AssertionError):
    """The fake's own check of invariant 1 of docs/design.md (a chunk starts at the cache length)."""


class FakeStageModel:
    """Layers ``[start, end)`` of a ``num_layers``-layer fake model, with ``num_slots`` cache slots."""

    def __init__(self, start: int, end: int, num_layers: int, num_slots: int = 1, vocab: int = VOCAB):
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"bad layer range [{start}, {end}) of {num_layers}")
        self.start, self.end = start, end
        self.args = SimpleNamespace(num_layers=num_layers)
        self.num_slots = num_slots
        self.device = torch.device("cpu")
        self.vocab = vocab
        # [slot][layer - start]: the value that entered the layer at each position, and a
        # running hash of those entries (so a layer costs O(rows), not O(cache length)).
        self._entries = [[[] for _ in range(start, end)] for _ in range(num_slots)]
        self._prefix = [[[] for _ in range(start, end)] for _ in range(num_slots)]
        self.calls: list[tuple[int, int, int, int, int]] = []  # (slot, pos, first, last, rows)
        self.batches: list[tuple[list[tuple[int, int, int]], int, int]] = []  # run_layers_batch calls
        self.lm_head_rows: list[int] = []  # rows of each greedy_tokens call
        self.truncations: list[tuple[int, int]] = []  # (slot, length)

    def _layer(self, layer: int) -> int:
        if not self.start <= layer < self.end:
            raise IndexError(f"layer {layer} is outside this stage's [{self.start}, {self.end})")
        return layer - self.start

    def cache_length(self, layer: int, slot: int) -> int:
        return len(self._entries[slot][self._layer(layer)])

    def entries(self, layer: int, slot: int) -> list[int]:
        """What layer ``layer`` of ``slot`` caches (a copy), for comparing with a prefill."""
        return list(self._entries[slot][self._layer(layer)])

    def truncate(self, slot: int, length: int) -> None:
        self.truncations.append((slot, length))
        for entries, prefix in zip(self._entries[slot], self._prefix[slot]):
            del entries[length:]
            del prefix[length:]

    def reset(self, slot: int) -> None:
        for entries, prefix in zip(self._entries[slot], self._prefix[slot]):
            entries.clear()
            prefix.clear()

    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        """# tokens: S ids -> [S, 2]; ``pos`` is unknown here (-1) until a layer runs."""
        return torch.tensor([[-1, mix(_EMBED, t)] for t in tokens], dtype=torch.int64)

    def run_layers(
        self, hidden: torch.Tensor, input_pos: int, first: int, last: int, slot: int, parts=None
    ) -> torch.Tensor:
        """Layers ``[first, last)`` on positions ``input_pos ..``. # hidden: [S, 2] -> [S, 2]"""
        rows = hidden.shape[0]
        self.calls.append((slot, input_pos, first, last, rows))
        if not first < last:
            raise FakeCacheError(f"empty layer range [{first}, {last})")
        values = [v for _, v in hidden.tolist()]
        for layer in range(first, last):
            entries, prefix = self._entries[slot][self._layer(layer)], self._prefix[slot][self._layer(layer)]
            if len(entries) != input_pos:
                raise FakeCacheError(
                    f"layer {layer} slot {slot} holds {len(entries)} positions, not input_pos {input_pos}"
                )
            out = []
            for v in values:
                entries.append(v)
                prefix.append(mix(prefix[-1] if prefix else 0, v))
                out.append(mix(layer, v, prefix[-1]))
            values = out
        return torch.tensor([[input_pos + i, v] for i, v in enumerate(values)], dtype=torch.int64)

    def run_layers_batch(self, chunks, first: int, last: int, exact: bool = True, parts=None) -> list[torch.Tensor]:
        """Several sequences' chunks as one call: recorded once, in ``batches``, as
        ``[(slot, pos, rows), ...], first, last``; each computed as ``run_layers`` would."""
        self.batches.append(([(slot, pos, h.shape[0]) for h, pos, slot in chunks], first, last))
        out = []
        for hidden, pos, slot in chunks:
            out.append(self.run_layers(hidden, pos, first, last, slot))
            self.calls.pop()  # one batched call, not several single ones
        return out

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        self.lm_head_rows.append(hidden.shape[0])
        return [greedy_token(v, self.vocab) for _, v in hidden.tolist()]


def greedy_token(value: int, vocab: int = VOCAB) -> int:
    """The fake LM head: the final layer's output value -> its greedy token."""
    return mix(_FINAL, value) % vocab


# --- the reference: plain decoding of the fake model ---------------------------------------


def prefill(tokens: Sequence[int], num_layers: int) -> FakeStageModel:
    """A fresh whole model after one prefill of ``tokens`` (slot 0)."""
    model = FakeStageModel(0, num_layers, num_layers)
    model.run_layers(model.embed(tokens), 0, 0, num_layers, 0)
    return model


def greedy(prompt: Sequence[int], max_new_tokens: int, num_layers: int, eos: frozenset[int] = frozenset()) -> list[int]:
    """Plain greedy decoding, one token per step, with the cache: the parity reference."""
    model = FakeStageModel(0, num_layers, num_layers)
    hidden = model.run_layers(model.embed(prompt), 0, 0, num_layers, 0)
    out: list[int] = []
    while True:
        token = model.greedy_tokens(hidden[-1:])[0]
        out.append(token)
        if token in eos or len(out) == max_new_tokens:
            return out
        hidden = model.run_layers(model.embed([token]), len(prompt) + len(out) - 1, 0, num_layers, 0)


def head_oracle(tokens: Sequence[int], num_layers: int) -> dict[tuple[int, int], int]:
    """``{(layer, value entering layer): greedy next token}`` at every position of ``tokens``,
    for heads that peek at the truth (a correct head is right on the greedy path)."""
    model = FakeStageModel(0, num_layers, num_layers)
    nexts = model.greedy_tokens(model.run_layers(model.embed(tokens), 0, 0, num_layers, 0))
    return {
        (layer, value): nexts[i] for layer in range(1, num_layers) for i, value in enumerate(model.entries(layer, 0))
    }


# --- exit heads ----------------------------------------------------------------------------


class FakeHeads:
    """The exit-heads interface the Stage uses: ``layers``, ``thresholds``, ``predict``.

    ``rule(layer, pos, value) -> (token, confidence)``; every call is recorded as
    ``(layer, pos)`` in ``calls``.
    """

    def __init__(
        self,
        layers: Sequence[int],
        rule: Callable[[int, int, int], tuple[int, float]],
        thresholds: dict[int, float] | None = None,
    ):
        self.layers = tuple(sorted(layers))
        self.thresholds = dict(thresholds) if thresholds is not None else {l: 0.5 for l in self.layers}
        self.rule = rule
        self.calls: list[tuple[int, int]] = []

    def predict(self, layer: int, hidden_row: torch.Tensor) -> tuple[int, float]:
        pos, value = hidden_row.tolist()
        self.calls.append((layer, pos))
        return self.rule(layer, pos, value)


def scripted_heads(layers: Sequence[int], exits: dict[tuple[int, int], int]) -> FakeHeads:
    """Heads that are confident (1.0 > 0.5) exactly at ``exits``: ``{(layer, pos): token}``.

    ``exits`` is read at each call, so a test may change it between steps."""

    def rule(layer: int, pos: int, value: int) -> tuple[int, float]:
        return (exits[(layer, pos)], 1.0) if (layer, pos) in exits else (0, 0.0)

    heads = FakeHeads(layers, rule)
    heads.exits = exits
    return heads
