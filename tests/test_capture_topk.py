"""capture: topk(sorted=False) becomes topk(sorted=True) (same set, a valid order; TVM's importer
refuses the unsorted form, which DeepSeek-style group-limited routers use)."""
from __future__ import annotations

import torch

from moecc.frontend import capture


class GroupPick(torch.nn.Module):
    def forward(self, x):                                         # [T, G]
        idx = torch.topk(x, k=2, dim=-1, sorted=False)[1]         # [T, 2], any order
        return torch.zeros_like(x).scatter(1, idx, 1.0)           # order-free use


def _sorted(node) -> bool:
    """sorted defaults to True; the exporter drops it from args when it is."""
    return (node.args[4] if len(node.args) > 4 else node.kwargs.get("sorted", True)) is True


def _topks(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.topk.default]


def test_unsorted_topk_is_made_sorted():
    x = torch.randn(6, 8)
    cap = capture(GroupPick(), (x,), dynamic=False, recognize=False)
    (node,) = _topks(cap.gm)
    assert _sorted(node)
    torch.testing.assert_close(cap.gm(x), GroupPick()(x), atol=0, rtol=0)
    program = cap.export()
    (node,) = _topks(program.graph_module)
    assert _sorted(node)
