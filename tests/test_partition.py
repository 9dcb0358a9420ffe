"""Stage partitioning: coverage, optimal balance, explicit split points, errors."""

import ast
import itertools
from pathlib import Path

import pytest
from adadecode.runtime.partition import PartitionError, partition_layers


def stage_costs(ranges, weights, first_extra=0.0, last_extra=0.0):
    costs = [sum(weights[a:b]) for a, b in ranges]
    costs[0] += first_extra
    costs[-1] += last_extra
    return costs


def all_splits(num_layers, stages):
    for points in itertools.combinations(range(1, num_layers), stages - 1):
        bounds = [0, *points, num_layers]
        yield list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("num_layers", range(1, 33))
def test_ranges_are_contiguous_nonempty_and_cover_all_layers(num_layers):
    for stages in range(1, num_layers + 1):
        for extras in ((0.0, 0.0), (0.5, 3.0), (0.0, 9.0)):
            ranges = partition_layers(num_layers, stages, first_extra=extras[0], last_extra=extras[1])
            assert len(ranges) == stages
            assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
            assert all(a < b for a, b in ranges)
            assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))


@pytest.mark.parametrize(
    "num_layers, stages, expected",
    [
        (30, 1, [(0, 30)]),
        (30, 2, [(0, 15), (15, 30)]),
        (30, 3, [(0, 10), (10, 20), (20, 30)]),
        (30, 4, [(0, 7), (7, 14), (14, 22), (22, 30)]),  # even split, the extra layers go last
        (7, 3, [(0, 2), (2, 4), (4, 7)]),
        (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (32, 5, [(0, 6), (6, 12), (12, 18), (18, 25), (25, 32)]),
    ],
)
def test_uniform_split_is_as_even_as_possible(num_layers, stages, expected):
    assert partition_layers(num_layers, stages) == expected


@pytest.mark.parametrize(
    "num_layers, stages, first_extra, last_extra, expected",
    [
        # SmolLM2-135M: the LM head costs about 8 layers, so the last stage gets few layers.
        (30, 3, 0.0, 8.0, [(0, 12), (12, 25), (25, 30)]),
        (30, 2, 0.0, 8.0, [(0, 19), (19, 30)]),
        (30, 3, 4.0, 4.0, [(0, 8), (8, 21), (21, 30)]),
        (10, 2, 0.0, 100.0, [(0, 9), (9, 10)]),  # the head alone outweighs everything
        (10, 1, 5.0, 5.0, [(0, 10)]),
    ],
)
def test_extras_shift_layers_away_from_the_ends(num_layers, stages, first_extra, last_extra, expected):
    assert partition_layers(num_layers, stages, first_extra=first_extra, last_extra=last_extra) == expected


@pytest.mark.parametrize("num_layers", range(1, 11))
def test_max_stage_cost_is_optimal_against_brute_force(num_layers):
    weight_sets = [
        [1.0] * num_layers,
        [float(1 + (i * 7) % 5) for i in range(num_layers)],
        [0.0 if i % 3 == 0 else 2.5 for i in range(num_layers)],
    ]
    for stages in range(1, num_layers + 1):
        for weights in weight_sets:
            for first_extra, last_extra in ((0.0, 0.0), (1.0, 4.0), (3.0, 0.5)):
                got = partition_layers(num_layers, stages, layer_weights=weights,
                                       first_extra=first_extra, last_extra=last_extra)
                best = min(
                    max(stage_costs(r, weights, first_extra, last_extra)) for r in all_splits(num_layers, stages)
                )
                assert max(stage_costs(got, weights, first_extra, last_extra)) == pytest.approx(best)


def test_layer_weights_move_the_split():
    # Layers 0..3 cost 3 each, the rest 1: the first stage takes the four heavy layers only.
    weights = [3.0] * 4 + [1.0] * 12
    assert partition_layers(16, 2, layer_weights=weights) == [(0, 4), (4, 16)]


def test_deterministic():
    args = (33, 5)
    kwargs = {"layer_weights": [1.0 + (i % 4) * 0.25 for i in range(33)], "first_extra": 0.3, "last_extra": 6.0}
    assert len({tuple(partition_layers(*args, **kwargs)) for _ in range(5)}) == 1


@pytest.mark.parametrize(
    "num_layers, stages, split_points, expected",
    [
        (30, 3, [10, 20], [(0, 10), (10, 20), (20, 30)]),
        (30, 2, [1], [(0, 1), (1, 30)]),
        (30, 2, [29], [(0, 29), (29, 30)]),
        (3, 3, (1, 2), [(0, 1), (1, 2), (2, 3)]),
        (30, 1, [], [(0, 30)]),
    ],
)
def test_explicit_split_points_are_used(num_layers, stages, split_points, expected):
    assert partition_layers(num_layers, stages, split_points) == expected


def test_explicit_split_points_ignore_weights():
    assert partition_layers(30, 2, [5], last_extra=100.0) == [(0, 5), (5, 30)]


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"num_layers": 30, "stages": 0}, ["stages=0", ">= 1", "stages=1"]),
        ({"num_layers": 30, "stages": -1}, ["stages=-1", ">= 1"]),
        ({"num_layers": 30, "stages": True}, ["stages=True", "integer"]),
        ({"num_layers": 0, "stages": 1}, ["num_layers=0", ">= 1"]),
        ({"num_layers": 30, "stages": 31}, ["stages=31 > num_layers=30", "at least one layer", "at most 30 stages"]),
        ({"num_layers": 30, "stages": 3, "split_points": [10]},
         ["split_points=[10]", "3 stages need exactly 2 split points, got 1", "leave split_points empty"]),
        ({"num_layers": 30, "stages": 2, "split_points": [0]},
         ["split point 0 is out of range", "1..29", "no stage is empty"]),
        ({"num_layers": 30, "stages": 2, "split_points": [30]}, ["split point 30 is out of range", "1..29"]),
        ({"num_layers": 30, "stages": 3, "split_points": [20, 10]},
         ["20 then 10 is not strictly increasing", "ascending order"]),
        ({"num_layers": 30, "stages": 3, "split_points": [10, 10]}, ["10 then 10 is not strictly increasing"]),
        ({"num_layers": 30, "stages": 2, "split_points": [7.5]}, ["split point 7.5 is not an integer"]),
        ({"num_layers": 3, "stages": 2, "layer_weights": [1.0, 1.0]},
         ["layer_weights has 2 entries but the model has 3 layers", "one cost per layer"]),
        ({"num_layers": 3, "stages": 2, "layer_weights": [1.0, -1.0, 1.0]}, ["layer_weights[1]=-1.0", ">= 0"]),
        ({"num_layers": 3, "stages": 2, "layer_weights": [1.0, float("nan"), 1.0]}, ["layer_weights[1]=nan"]),
        ({"num_layers": 3, "stages": 2, "first_extra": -1.0}, ["first_extra=-1.0", ">= 0"]),
        ({"num_layers": 3, "stages": 2, "last_extra": float("inf")}, ["last_extra=inf", "finite"]),
    ],
)
def test_errors_name_the_problem_and_the_fix(kwargs, fragments):
    with pytest.raises(PartitionError) as info:
        partition_layers(**kwargs)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_partition_module_imports_neither_torch_nor_transformers():
    import adadecode.runtime.partition as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"torch", "transformers"}
