"""Walk the autograd graph behind a loss.

``loss.grad_fn.next_functions`` leads, node by node, to ``AccumulateGrad`` nodes whose
``variable`` is a leaf tensor that will receive ``.grad``: the trainable parameters
that will get gradient. :func:`walk_graph` collects them (and the distance of every
node from the loss); :class:`ReachMemo` answers "which of these groups of parameters
lie upstream of this node?" for many nodes at once, memoised, as bit masks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


def _next_nodes(node: Any) -> list[Any]:
    try:
        return [n for n, _ in node.next_functions if n is not None]
    except (AttributeError, RuntimeError):
        return []


@dataclass
class GraphSummary:
    """What a backward from the loss would reach.

    Attributes:
        reached: ``id`` -> leaf tensor for every ``AccumulateGrad`` variable reached.
        depth: node -> breadth-first distance from the loss node (the loss is 0).
        node_count: number of distinct nodes.
        checkpoint_nodes: reentrant ``CheckpointFunctionBackward`` nodes reached (the
            parameters inside them get gradient during backward, not via the graph).
        node_names: ``type(node).__name__`` counts, for the report.
    """

    reached: dict[int, torch.Tensor] = field(default_factory=dict)
    depth: dict[Any, int] = field(default_factory=dict)
    node_count: int = 0
    checkpoint_nodes: int = 0
    node_names: dict[str, int] = field(default_factory=dict)


def walk_graph(root: Optional[Any]) -> GraphSummary:
    """Breadth-first walk from ``root`` (``loss.grad_fn``); ``None`` gives an empty summary."""
    summary = GraphSummary()
    if root is None:
        return summary
    queue: deque[Any] = deque([root])
    summary.depth[root] = 0
    while queue:
        node = queue.popleft()
        name = type(node).__name__
        summary.node_names[name] = summary.node_names.get(name, 0) + 1
        variable = getattr(node, "variable", None)
        if variable is not None and isinstance(variable, torch.Tensor):
            summary.reached[id(variable)] = variable
        elif "CheckpointFunctionBackward" in name:
            summary.checkpoint_nodes += 1
        d = summary.depth[node] + 1
        for child in _next_nodes(node):
            if child not in summary.depth:
                summary.depth[child] = d
                queue.append(child)
    summary.node_count = len(summary.depth)
    return summary


class ReachMemo:
    """Memoised "what lies upstream of this node" as integer bit masks.

    Args:
        leaf_mask: mask for a leaf tensor (an ``AccumulateGrad`` variable, or a tensor
            that requires grad and has no ``grad_fn``).
        node_bits: extra bits set on specific nodes (e.g. "this is the output of
            module k"); they are ORed into the node's mask and everything downstream.
        checkpoint_mask: bits assumed upstream of every reentrant
            ``CheckpointFunctionBackward`` node (the parameters run inside it).

    The mask of a node is the OR of its own bits, its leaf's bits and the masks of
    all nodes it leads to. Computed iteratively (graphs are deep), each node once.
    """

    def __init__(
        self,
        leaf_mask: Callable[[torch.Tensor], int],
        node_bits: Optional[dict[Any, int]] = None,
        checkpoint_mask: int = 0,
    ) -> None:
        self.leaf_mask = leaf_mask
        self.node_bits = node_bits or {}
        self.checkpoint_mask = checkpoint_mask
        self._memo: dict[Any, int] = {}

    def of(self, source: Any) -> int:
        """Mask of a ``grad_fn`` node or a leaf tensor (``None`` gives 0)."""
        if source is None:
            return 0
        if isinstance(source, torch.Tensor):
            if source.grad_fn is not None:
                return self.of(source.grad_fn)
            return self.leaf_mask(source) if source.requires_grad else 0
        memo = self._memo
        if source in memo:
            return memo[source]
        # Iterative post-order: push children first, combine when they are known.
        stack: list[tuple[Any, bool]] = [(source, False)]
        while stack:
            node, ready = stack.pop()
            if node in memo and not ready:
                continue
            children = _next_nodes(node)
            if not ready:
                stack.append((node, True))
                for child in children:
                    if child not in memo:
                        stack.append((child, False))
                continue
            mask = self.node_bits.get(node, 0)
            if self.checkpoint_mask and "CheckpointFunctionBackward" in type(node).__name__:
                # Reentrant checkpoints hide their parameters from the graph; they are
                # recomputed (and get gradient) during backward.
                mask |= self.checkpoint_mask
            variable = getattr(node, "variable", None)
            if isinstance(variable, torch.Tensor):
                mask |= self.leaf_mask(variable)
            for child in children:
                mask |= memo.get(child, 0)
            memo[node] = mask
        return memo[source]


__all__ = ["GraphSummary", "ReachMemo", "walk_graph"]
