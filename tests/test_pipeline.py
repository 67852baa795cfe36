"""Pipeline split (shard/pipeline.py) and group configuration checks (shard/config.py)."""

from __future__ import annotations

import pytest

from shardline.shard.config import GroupConfig
from shardline.shard.pipeline import stage_layers


def split(num_layers: int, pp: int, partition: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    return [(r.start, r.stop) for r in (stage_layers(num_layers, pp, rank, partition) for rank in range(pp))]


@pytest.mark.parametrize("num_layers, pp, expected", [
    (4, 1, [(0, 4)]),
    (4, 2, [(0, 2), (2, 4)]),
    (5, 2, [(0, 3), (3, 5)]),
    (3, 2, [(0, 2), (2, 3)]),
    (7, 4, [(0, 2), (2, 4), (4, 6), (6, 7)]),
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
    (32, 3, [(0, 11), (11, 22), (22, 32)]),
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_default_split(num_layers: int, pp: int, expected: list[tuple[int, int]]) -> None:
    assert split(num_layers, pp) == expected


def test_default_split_is_even_contiguous_and_never_puts_extras_on_the_last_stage() -> None:
    for num_layers in range(1, 40):
        for pp in range(1, num_layers + 1):
            stages = split(num_layers, pp)
            sizes = [stop - start for start, stop in stages]
            assert stages[0][0] == 0 and stages[-1][1] == num_layers
            assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert sizes[-1] == min(sizes), (num_layers, pp, sizes)
            assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("partition, expected", [
    ((1, 4), [(0, 1), (1, 5)]),
    ((4, 1), [(0, 4), (4, 5)]),
    ((2, 3), [(0, 2), (2, 5)]),
])
def test_explicit_partition_overrides_the_rule(partition: tuple[int, ...], expected: list[tuple[int, int]]) -> None:
    assert split(5, 2, partition) == expected


def test_explicit_partition_with_three_stages() -> None:
    assert split(10, 3, (5, 1, 4)) == [(0, 5), (5, 6), (6, 10)]


def test_partition_not_adding_up_names_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"\[2, 2\].*num_hidden_layers = 5.*adds up to 4"):
        stage_layers(5, 2, 0, (2, 2))
    with pytest.raises(ValueError, match=r"\[3, 3\].*num_hidden_layers = 5.*adds up to 6"):
        stage_layers(5, 2, 1, (3, 3))


def test_partition_with_an_empty_stage_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 5\].*at least one layer"):
        stage_layers(5, 2, 0, (0, 5))
    with pytest.raises(ValueError, match=r"\[6, -1\]"):
        stage_layers(5, 2, 0, (6, -1))


def test_partition_with_the_wrong_stage_count_names_both() -> None:
    with pytest.raises(ValueError, match=r"\[2, 2, 1\] has 3 stages, pp size is 2"):
        stage_layers(5, 2, 0, (2, 2, 1))


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="pp size 3 is larger than num_hidden_layers = 2"):
        stage_layers(2, 3, 0)


def test_group_config_validation_names_the_numbers() -> None:
    GroupConfig(rank=3, tp_size=2, pp_size=2, pp_partition=(1, 2)).validate()
    with pytest.raises(ValueError, match=r"--rank 4 .* world size 4 \(tp=2 x pp=2\)"):
        GroupConfig(rank=4, tp_size=2, pp_size=2).validate()
    with pytest.raises(ValueError, match="tp=0 pp=1"):
        GroupConfig(tp_size=0).validate()
    with pytest.raises(ValueError, match="--pp-partition has 3 stages, --pp is 2"):
        GroupConfig(pp_size=2, pp_partition=(1, 1, 1)).validate()
