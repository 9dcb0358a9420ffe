"""Cut a model's decoder layers into contiguous pipeline stages.

Why cost-balanced rather than equal layer counts: in single-stream pipeline
decoding every token crosses every stage, so the slowest stage sets the pace.
Layers are not the only work. The last stage also runs the final norm and the
LM head, which on a small model with a large vocabulary (SmolLM2-135M: a
49152 x 576 head against ~3.5M parameters per layer) costs as much as several
decoder layers, and stage 0 owns the embedding. Callers pass those as
`first_extra` / `last_extra`, in the units of `layer_weights` (one layer = 1 by
default), and the split minimises the most expensive stage.

Pure function, no torch: the launcher calls it for dry runs and tests call it
directly.
"""

import math
from collections.abc import Sequence

__all__ = ["PartitionError", "partition_layers"]


class PartitionError(ValueError):
    """The requested stage split is impossible; the message says how to fix it."""


def partition_layers(
    num_layers: int,
    stages: int,
    split_points: Sequence[int] = (),
    layer_weights: Sequence[float] | None = None,
    first_extra: float = 0.0,
    last_extra: float = 0.0,
) -> list[tuple[int, int]]:
    """Half-open layer ranges `[(0, b0), (b0, b1), ..., (bP-2, num_layers)]`, one per stage.

    With `split_points` (the first layer of stages 1..P-1) they are checked and
    used as given. Otherwise the split minimises the maximum stage cost, where
    a stage costs the sum of its `layer_weights` (1 each by default), plus
    `first_extra` on stage 0 and `last_extra` on the last stage. Among splits
    with that maximum it takes the most even one (least sum of squared costs),
    then the one giving earlier stages fewer layers, so the result is
    deterministic.
    """
    _check_counts(num_layers, stages)
    if split_points:
        bounds = _check_split_points(num_layers, stages, split_points)
        return list(zip(bounds, bounds[1:]))
    weights = _check_weights(num_layers, layer_weights, first_extra, last_extra)
    return _balanced(weights, stages, float(first_extra), float(last_extra))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_counts(num_layers: int, stages: int) -> None:
    if not _is_int(num_layers) or num_layers < 1:
        raise PartitionError(f"num_layers={num_layers!r}: expected an integer >= 1 (the model's decoder layer count)")
    if not _is_int(stages) or stages < 1:
        raise PartitionError(f"stages={stages!r}: expected an integer >= 1; use stages=1 to run without a pipeline")
    if stages > num_layers:
        raise PartitionError(
            f"stages={stages} > num_layers={num_layers}: every stage needs at least one layer; "
            f"use at most {num_layers} stages"
        )


def _check_split_points(num_layers: int, stages: int, split_points: Sequence[int]) -> list[int]:
    points = list(split_points)
    fix = "give the first layer of stages 1..P-1 in ascending order, or leave split_points empty for an automatic split"
    if len(points) != stages - 1:
        raise PartitionError(
            f"split_points={points}: {stages} stages need exactly {stages - 1} split points, got {len(points)}; {fix}"
        )
    for p in points:
        if not _is_int(p):
            raise PartitionError(f"split_points={points}: split point {p!r} is not an integer layer index; {fix}")
        if not 1 <= p <= num_layers - 1:
            raise PartitionError(
                f"split_points={points}: split point {p} is out of range; with {num_layers} layers each "
                f"split point must be in 1..{num_layers - 1} so that no stage is empty; {fix}"
            )
    for a, b in zip(points, points[1:]):
        if b <= a:
            raise PartitionError(
                f"split_points={points}: {a} then {b} is not strictly increasing, "
                f"which would leave a stage empty; {fix}"
            )
    return [0, *points, num_layers]


def _check_weights(
    num_layers: int, layer_weights: Sequence[float] | None, first_extra: float, last_extra: float
) -> list[float]:
    for name, x in (("first_extra", first_extra), ("last_extra", last_extra)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise PartitionError(f"{name}={x!r}: expected a finite cost >= 0, in units of one layer's cost")
    if layer_weights is None:
        return [1.0] * num_layers
    weights = list(layer_weights)
    if len(weights) != num_layers:
        raise PartitionError(
            f"layer_weights has {len(weights)} entries but the model has {num_layers} layers; give one cost per layer"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise PartitionError(f"layer_weights[{i}]={w!r}: expected a finite cost >= 0")
    return [float(w) for w in weights]


def _balanced(weights: list[float], stages: int, first_extra: float, last_extra: float) -> list[tuple[int, int]]:
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(stage: int, a: int, b: int) -> float:
        # Always computed by this one expression, so equal splits compare exactly equal.
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == stages - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # Pass 1: the least achievable maximum stage cost. worst[k][i] = best max cost
    # of layers [0, i) split into stages 0..k-1, each non-empty. O(P * L^2).
    inf = math.inf
    worst = [[inf] * (n + 1) for _ in range(stages + 1)]
    worst[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            worst[k][i] = min(max(worst[k - 1][j], cost(k - 1, j, i)) for j in range(k - 1, i))
    bound = worst[stages][n]

    # Pass 2: among splits within that bound, least sum of squared costs, then the
    # lexicographically smallest layer counts (earlier stages fewer layers).
    # best[k][i] = (sum of squares, layer counts) for layers [0, i) in k stages.
    best: list[list[tuple[float, tuple[int, ...]] | None]] = [[None] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, ())
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                prev = best[k - 1][j]
                c = cost(k - 1, j, i)
                if prev is None or c > bound:
                    continue
                cand = (prev[0] + c * c, prev[1] + (i - j,))
                if best[k][i] is None or cand < best[k][i]:
                    best[k][i] = cand
    result = best[stages][n]
    assert result is not None  # the pass-1 optimum itself is within the bound
    ranges, start = [], 0
    for count in result[1]:
        ranges.append((start, start + count))
        start += count
    return ranges
