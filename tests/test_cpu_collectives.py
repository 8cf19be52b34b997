"""all_gatherv / reduce_scatterv on real gloo ranks, checked against plain torch."""

import pytest
import torch

from vllm_elastic_ft.comm import cpu_collectives
from vllm_elastic_ft.testing.harness import run_ranks

SIZES = {2: [3, 0], 4: [5, 1, 0, 7]}


def _inputs(rank: int, n: int):
    g = torch.Generator().manual_seed(rank)
    return [
        torch.randn(n, 16, generator=g),
        torch.rand(n, 2, generator=g),
        torch.randint(0, 8, (n, 2), generator=g, dtype=torch.int32),
        torch.randint(0, 8, (n, 2, 3), generator=g, dtype=torch.int64),
    ]


def _partials(rank: int, total: int):
    return torch.randn(total, 16, generator=torch.Generator().manual_seed(100 + rank))


def _collectives_rank(rank, world, sizes, mode):
    import torch.distributed as dist

    gathered = cpu_collectives.all_gatherv(_inputs(rank, sizes[rank]), sizes, dist.group.WORLD)
    reduced = cpu_collectives.reduce_scatterv(_partials(rank, sum(sizes)), sizes, dist.group.WORLD, mode)
    return gathered, reduced


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", cpu_collectives.REDUCE_SCATTER_MODES)
def test_gatherv_and_reduce_scatterv_match_torch(world, mode):
    sizes = SIZES[world]
    results = run_ranks(_collectives_rank, world, sizes, mode)
    expected_gather = [torch.cat(ts) for ts in zip(*[_inputs(r, sizes[r]) for r in range(world)])]
    total = torch.stack([_partials(r, sum(sizes)) for r in range(world)]).sum(0)
    for rank, (gathered, reduced) in enumerate(results):
        for got, want in zip(gathered, expected_gather):
            assert got.dtype == want.dtype and torch.equal(got, want)
        start = sum(sizes[:rank])
        torch.testing.assert_close(reduced, total[start : start + sizes[rank]])
