"""The module-level view of a diagnosis: per report module state, gradient paths, edges.

For every report-level module (:func:`~diagnostics.params.report_level_modules`):
whether it ran, was tracked, lies on the loss graph, how many bytes it saved for
backward (and for nothing), and which trainable modules its output carries gradient
to; the ``paths`` lines (``loss ← base_llm (frozen, carries grad) ← proj (trainable)``)
and the module graph's edges (autograd dependencies, transitively reduced, plus data
flow) drawn by :mod:`diagnostics.picture`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .causes import ERROR, Finding, format_bytes
from .context import DiagnosisContext
from .graph import ReachMemo
from .report import Edge, ModuleState
from .trace import ModuleCall


def module_states(
    ctx: DiagnosisContext,
    level: list[tuple[str, nn.Module]],
    findings: list[Finding],
) -> tuple[list[ModuleState], list[str], list[Edge]]:
    """(module states, path lines, edges) of a finished diagnosis."""
    trace = ctx.trace
    assert trace is not None
    loss: Optional[torch.Tensor] = ctx.loss
    got_grad = ctx.got_grad
    wasted_bytes = ctx.wasted_bytes
    count = len(level)
    ids = {id(m): i for i, (_, m) in enumerate(level)}
    # bits [0, count): trainable params of report module i; [count, 2count): output of i.
    node_bits: dict[Any, int] = {}
    out_nodes: dict[int, list[Any]] = {i: [] for i in range(count)}
    calls_of: dict[int, list[ModuleCall]] = {i: [] for i in range(count)}
    for call in trace.calls:
        i = ids.get(call.module_id)
        if i is None:
            continue
        calls_of[i].append(call)
        for node in call.output_nodes:
            node_bits[node] = node_bits.get(node, 0) | (1 << (count + i))
            out_nodes[i].append(node)

    def leaf(v: torch.Tensor) -> int:
        i = ctx.report_of_param.get(id(v))
        if i is None or id(v) not in ctx.trainable:
            return 0
        return 1 << i

    memo = ReachMemo(leaf, node_bits, checkpoint_mask=ctx.checkpointed_report_bits())
    depth = ctx.graph.depth
    broken_modules = {f.module for f in findings if f.severity == ERROR and f.module}
    states: list[ModuleState] = []
    ran_names = {c.name for c in trace.calls}
    reached = got_grad if got_grad is not None else set(ctx.graph.reached)
    for i, (name, module) in enumerate(level):
        own = name.endswith(":own")
        params = list(module.parameters(recurse=not own))
        total = sum(p.numel() for p in params)
        trainable_ids = [id(p) for p in params if p.requires_grad]
        base = name.removesuffix(":own")
        state = ModuleState(name=base, total=total, trainable=sum(p.numel() for p in params if p.requires_grad))
        state.ran = any(n == base or n.startswith(base + ".") for n in ran_names) or base in ("(root)",)
        state.tracked = any(c.outputs_tracked for c in calls_of[i])
        state.on_path = any(n in depth for n in out_nodes[i])
        state.saved_bytes = sum(c.saved_bytes for c in trace.calls if c.name == base or c.name.startswith(base + "."))
        state.wasted_bytes = wasted_bytes.get(base, 0)
        if trainable_ids:
            state.gets_grad = all(pid in reached for pid in trainable_ids)
        state.broken = base in broken_modules
        states.append(state)

    for i, state in enumerate(states):
        mask = 0
        for node in out_nodes[i]:
            if node in depth:
                mask |= memo.of(node)
        state.carries_to = [states[j].name for j in range(count) if j != i and mask >> j & 1]

    def min_depth(i: int) -> int:
        values = [depth[n] for n in out_nodes[i] if n in depth]
        return min(values) if values else 1 << 30

    paths: list[str] = []
    for i, state in enumerate(states):
        if state.trainable == 0:
            continue
        label = f"{state.name} ({state.kind})"
        if state.gets_grad:
            carriers = sorted(
                (j for j in range(count) if j != i and states[j].on_path and state.name in states[j].carries_to),
                key=min_depth,
            )
            chain = ["loss"] + [
                f"{states[j].name} ({'frozen' if states[j].trainable == 0 else states[j].kind}, carries grad)"
                for j in carriers
            ] + [label]
            paths.append(" ← ".join(chain))
        else:
            cause = next((f.cause for f in findings if f.severity == ERROR and f.module == state.name), None)
            paths.append(f"loss ✗ {label} — gets no gradient" + (f" ({cause})" if cause else ""))
    for state in states:
        if state.trainable:
            continue
        if state.carries_to:
            continue  # shown on a path above
        if not state.ran:
            paths.append(f"{state.name}: frozen, did not run")
        elif state.wasted_bytes:
            paths.append(
                f"{state.name}: frozen, tracked for nothing — {format_bytes(state.wasted_bytes)} saved for "
                "backward (wasted_tracking)"
            )
        elif state.tracked:
            paths.append(f"{state.name}: frozen, tracked" + (", on the loss graph" if state.on_path else ""))
        else:
            paths.append(f"{state.name}: frozen, untracked — fine")

    # Module-level edges: autograd dependencies (transitively reduced) + data flow.
    edges: list[Edge] = []
    deps: dict[int, set[int]] = {}
    for i in range(count):
        mask = 0
        for node in out_nodes[i]:
            for child in _children(node):
                mask |= memo.of(child)
        deps[i] = {j for j in range(count) if j != i and mask >> (count + j) & 1}
    for i in range(count):
        direct = set(deps[i])
        for j in deps[i]:
            direct -= deps.get(j, set())
        for j in sorted(direct):
            edges.append(Edge(states[j].name, states[i].name, True))
    existing = {(e.source, e.target) for e in edges}
    outs = {i: set().union(*(c.output_ptrs for c in calls_of[i])) if calls_of[i] else set() for i in range(count)}
    ins = {i: set().union(*(c.input_ptrs for c in calls_of[i])) if calls_of[i] else set() for i in range(count)}
    for i in range(count):
        for j in range(count):
            if i != j and outs[i] & ins[j] and (states[i].name, states[j].name) not in existing:
                edges.append(Edge(states[i].name, states[j].name, False))
                existing.add((states[i].name, states[j].name))
    if loss is not None:
        mask = memo.of(loss.grad_fn) if loss.grad_fn is not None else 0
        feeding = {j for j in range(count) if mask >> (count + j) & 1}
        direct = set(feeding)
        for j in feeding:
            direct -= deps.get(j, set())
        try:
            loss_ptr = loss.untyped_storage().data_ptr()
        except Exception:
            loss_ptr = None
        for j in range(count):
            if j in direct:
                edges.append(Edge(states[j].name, "loss", True))
            elif loss_ptr is not None and loss_ptr in outs[j]:
                edges.append(Edge(states[j].name, "loss", False))
    return states, paths, edges


def _children(node: Any) -> list[Any]:
    try:
        return [n for n, _ in node.next_functions if n is not None]
    except (AttributeError, RuntimeError):
        return []


__all__ = ["module_states"]
