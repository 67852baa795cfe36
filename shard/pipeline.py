"""Pipeline split: which global layers each stage holds."""

from __future__ import annotations

from collections.abc import Sequence


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, partition: Sequence[int] = ()) -> range:
    """Global layer range of one stage.

    By default layers are split evenly and the remainder goes to the first stages, never the last
    (which also holds the final norm and lm_head). An explicit partition (layers per stage) must
    add up to the layer count and give each stage at least one layer.
    """
    if partition:
        if len(partition) != pp_size:
            raise ValueError(f"pipeline partition {list(partition)} has {len(partition)} stages, "
                             f"pp size is {pp_size}")
        if sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"pipeline partition {list(partition)} must give every stage at least "
                             f"one layer and add up to num_hidden_layers = {num_layers} "
                             f"(it adds up to {sum(partition)})")
        sizes = list(partition)
    else:
        if pp_size > num_layers:
            raise ValueError(f"pp size {pp_size} is larger than num_hidden_layers = {num_layers}")
        base, extra = divmod(num_layers, pp_size)
        sizes = [base + (1 if stage < extra else 0) for stage in range(pp_size)]
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])
