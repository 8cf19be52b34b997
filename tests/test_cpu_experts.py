"""The expert-map patch, run on vLLM's real CPU fused-MoE kernel.

The patched ``apply`` is handed vLLM's kernel as its "original": summing the
outputs of every EP rank (each with its own expert_map and only its local
weights) must give the single-rank result, and tokens with no local expert
must get zeros.
"""

from types import SimpleNamespace

import pytest
import torch
from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

from vllm_elastic_ft.vllm.patches.worker.cpu_experts import _make_apply, local_expert_pairs

E, H, INTER, M, TOPK = 8, 128, 64, 12, 2


def _problem():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, generator=g) * 0.1
    w2 = torch.randn(E, H, INTER, generator=g) * 0.1
    x = torch.randn(M, H, generator=g)
    weights, ids = torch.topk(torch.softmax(torch.randn(M, E, generator=g), -1), TOPK)
    return w13, w2, x, weights, ids.to(torch.int32)


def _kernel(self, output, hidden, w1, w2, topk_weights, topk_ids, activation, *rest):
    expert_map = rest[1]
    assert expert_map is None, "the kernel must only ever see local ids"
    assert int(topk_ids.max()) < w1.shape[0], "a global id reached the local kernel"
    cpu_fused_moe(output, hidden, w1, w2, None, None, topk_weights, topk_ids,
                  activation, "vec", rest[-1])


def _run(apply_fn, w13, w2, x, weights, ids, expert_map):
    out = torch.full((M, H), float("nan"))
    experts = SimpleNamespace(
        moe_config=SimpleNamespace(moe_parallel_config=SimpleNamespace(ep_rank=0, ep_size=1))
    )
    apply_fn(experts, out, x, cpu_prepack_moe_weight(w13, "vec"),
             cpu_prepack_moe_weight(w2, "vec"), weights, ids, "silu", E, expert_map,
             None, None, None, None, None, False)
    return out


def _expert_map(local: list[int]) -> torch.Tensor:
    m = torch.full((E,), -1, dtype=torch.int32)
    m[torch.tensor(local)] = torch.arange(len(local), dtype=torch.int32)
    return m


def test_local_expert_pairs():
    ids = torch.tensor([[0, 5], [6, 7], [1, 2]], dtype=torch.int32)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    token, local, w = local_expert_pairs(ids, weights, _expert_map([4, 5, 6, 7]))
    assert token.tolist() == [0, 1, 1]
    assert local.flatten().tolist() == [1, 2, 3] and local.dtype == torch.int32
    assert w.flatten().tolist() == pytest.approx([0.4, 0.5, 0.5])


@pytest.mark.parametrize("ranks", [2, 4])
def test_ep_ranks_sum_to_the_single_rank_result(ranks):
    w13, w2, x, weights, ids = _problem()
    patched = _make_apply(_kernel)
    full = _run(patched, w13, w2, x, weights, ids, None)
    per_rank = E // ranks
    total = torch.zeros_like(full)
    for rank in range(ranks):
        local = list(range(rank * per_rank, (rank + 1) * per_rank))
        out = _run(patched, w13[local], w2[local], x, weights, ids, _expert_map(local))
        has_local = torch.isin(ids, torch.tensor(local)).any(dim=1)
        assert torch.all(out[~has_local] == 0), "tokens without a local expert must be zero"
        total += out
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)
