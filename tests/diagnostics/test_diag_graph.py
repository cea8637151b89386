"""Autograd graph walking (diagnostics.graph)."""

from __future__ import annotations

import torch
from torch import nn

from diagnostics.graph import ReachMemo, walk_graph


class TestWalkGraph:
    def test_reached_params_are_the_trainable_upstream_ones(self) -> None:
        a, b, frozen = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 3).requires_grad_(False)
        x = torch.randn(2, 3)
        loss = b(a(frozen(x))).sum()
        summary = walk_graph(loss.grad_fn)
        assert set(summary.reached) == {id(p) for p in [*a.parameters(), *b.parameters()]}
        assert summary.depth[loss.grad_fn] == 0

    def test_none_root_gives_empty_summary(self) -> None:
        assert walk_graph(None).node_count == 0


class TestReachMemo:
    def test_masks_combine_upstream_bits(self) -> None:
        a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        bits = {id(a.weight): 1, id(b.weight): 2}
        y = a(torch.randn(1, 2))
        z = b(y)
        memo = ReachMemo(lambda v: bits.get(id(v), 0))
        assert memo.of(y) == 1
        assert memo.of(z) == 3
        assert memo.of(torch.zeros(1)) == 0
