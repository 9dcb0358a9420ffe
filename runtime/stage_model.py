"""What the Stage asks of the model it drives, as a ``Protocol``.

The Stage holds its model by this interface only, so importing the state machine loads no model
code: ``model_runner.StageModel`` (torch layers, a KV cache) brings transformers and the model
loader with it (tests/test_sans_io.py checks the imports). mypy checks that ``StageModel``
satisfies it (at the end of this file); the tests' ``FakeStageModel`` (tests/fakes.py) and the
simulator's ``SimModel`` have every member but ``logits``, since they only decode greedily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class ModelDepth(Protocol):
    num_layers: int  # of the whole model: no head at ``num_layers``, where the LM head reads the same state


class StageModelLike(Protocol):
    """Layers ``[start, end)`` with a KV cache of ``num_slots`` sequences; every call on one device."""

    start: int
    end: int
    args: ModelDepth

    @property
    def num_slots(self) -> int: ...

    def cache_length(self, layer: int, slot: int) -> int: ...

    def truncate(self, slot: int, length: int) -> None: ...

    def reset(self, slot: int) -> None: ...

    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Stage 0: token ids -> ``[S, D]``."""

    def run_layers(
        self, hidden: torch.Tensor, input_pos: int, first: int, last: int, slot: int,
        parts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Layers ``[first, last)`` on positions ``input_pos ..``, which must start at the cache's length;
        ``parts``: a merged chunk's calls in plain decoding (``WorkItem.parts``), given only for one."""

    def run_layers_batch(
        self, chunks: Sequence[tuple[torch.Tensor, int, int]], first: int, last: int, exact: bool = True,
        parts: Sequence[Sequence[int]] | None = None,
    ) -> list[torch.Tensor]:
        """``run_layers`` for ``(hidden, input_pos, slot)`` of several sequences as one call."""

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """Last stage: the greedy token after each row, in one transfer."""

    def logits(self, hidden: torch.Tensor, alone: bool = True) -> torch.Tensor:
        """Last stage: the final norm and LM head, ``[S, D] -> [S, V]``, for the sampler (runtime/sampling.py);
        ``alone``: each row with the bits of its own call (decode rows), else one call (a prefill's)."""


if TYPE_CHECKING:  # mypy checks here that the real model has everything above (runtime imports skip it)
    from .model_runner import StageModel

    _conforms: type[StageModelLike] = StageModel
