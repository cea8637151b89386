"""Why does each trainable parameter without a gradient get none? One mechanism per owner.

For every module owning trainable parameters that the backward (or the graph walk)
did not reach, in this order of evidence:

a. all its calls ran with grad disabled: the transition above it (a ``no_grad`` /
   ``inference_mode`` / ``set_grad_enabled(False)`` site, or a reentrant checkpoint
   over inputs that do not require grad);
b. an op downstream of its output cut the gradient (a detach-like op, or an op run
   under disabled grad on a tracked input);
c. the forward raised (the run error covers it);
d. it never ran; it ran but its forward ignores the parameters; or its output never
   reaches the loss.

Owners with the same mechanism and site share one :class:`Blame`; each cause module
turns the blames named after it into findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .causes import DETACHED, GRAD_DISABLED, REENTRANT_CHECKPOINT, UNUSED_PARAM
from .causes.grad_disabled import CALLER
from .context import DiagnosisContext
from .graph import ReachMemo
from .trace import CutEvent, DisableInfo, ModuleCall

#: ``Blame.reason`` values for ``unused_param``.
NEVER_RAN = "never_ran"
UNUSED_INSIDE = "unused_inside"
UNREACHED = "unreached"


@dataclass
class Blame:
    """One mechanism that leaves some trainable parameters without gradient.

    Attributes:
        cause: the cause name the finding will carry.
        pids: parameter ids it covers.
        module: report-level module of the parameters.
        owner_name: the module owning the first of them.
        culprit: the module entered where grad became disabled (grad_disabled /
            reentrant_checkpoint), else ``owner_name``.
        info: where grad became disabled (grad_disabled / reentrant_checkpoint).
        event: the op that cut the gradient (detached, or grad_disabled found by op).
        reason: for unused_param: :data:`NEVER_RAN`, :data:`UNUSED_INSIDE`, :data:`UNREACHED`.
    """

    cause: str
    pids: list[int]
    module: Optional[str]
    owner_name: str
    culprit: Optional[str] = None
    info: Optional[DisableInfo] = None
    event: Optional[CutEvent] = None
    reason: Optional[str] = None
    calls: list[ModuleCall] = field(default_factory=list)


def benign(ctx: DiagnosisContext, event: CutEvent) -> bool:
    """Grad-disabled ops inside a reentrant checkpoint whose inputs require grad are fine."""
    if event.kind != "grad_disabled":
        return False
    info = event.disable
    if info is not None and info.checkpoint is not None and info.checkpoint.inputs_require_grad:
        return True
    transition, _ = ctx.transition_disable(event.call_index)
    checkpoint = transition.checkpoint if transition is not None else None
    return checkpoint is not None and checkpoint.inputs_require_grad


def attribute_missing(ctx: DiagnosisContext, missing: list[int]) -> list[Blame]:
    """Blames for the trainable parameter ids in ``missing`` (see the module docstring)."""
    if not missing or ctx.trace is None:
        return []
    trace = ctx.trace
    by_owner: dict[int, list[int]] = {}
    for pid in missing:
        by_owner.setdefault(ctx.owner.get(pid, ("?", -1))[1], []).append(pid)
    calls_by_module: dict[int, list[ModuleCall]] = {}
    for call in trace.calls:
        calls_by_module.setdefault(call.module_id, []).append(call)

    # Which events cut which owners: one memo over the graph with a bit per owner.
    owner_bits = {owner_id: 1 << i for i, owner_id in enumerate(by_owner)}
    pid_bits = {pid: owner_bits[ctx.owner.get(pid, ("?", -1))[1]] for pid in missing}
    memo = ReachMemo(lambda v: pid_bits.get(id(v), 0))
    event_masks = []
    for event in trace.events:
        mask = 0
        for source in event.sources:
            mask |= memo.of(source)
        event_masks.append(mask)

    resolved: dict[tuple[Any, ...], Blame] = {}

    def add(key: tuple[Any, ...], blame: Blame) -> None:
        if key in resolved:
            resolved[key].pids.extend(blame.pids)
        else:
            resolved[key] = blame

    for owner_id, pids in by_owner.items():
        owner_name = ctx.owner.get(pids[0], ("?", -1))[0]
        module = ctx.report_module(pids)
        calls = calls_by_module.get(owner_id, [])

        # (a) the owner ran with grad disabled: the transition above it.
        off = [c for c in calls if not c.grad_enabled or c.inference_mode]
        if calls and len(off) == len(calls):
            root = trace.transition_of(off[0].index)
            if ctx.caller.off and root is not None and root.parent is None:
                # Off since before the forward: the caller's mode, not the model's code.
                add(("caller",), Blame(GRAD_DISABLED, list(pids), module, owner_name, reason=CALLER))
                continue
            info, name = ctx.transition_disable(off[0].index)
            if info is not None:
                if info.checkpoint is not None:
                    if not info.checkpoint.inputs_require_grad:
                        add(
                            ("ckpt", module, info.checkpoint.call_site),
                            Blame(REENTRANT_CHECKPOINT, list(pids), module, owner_name, name, info),
                        )
                        continue
                else:
                    add(("off", module, name, info.site), Blame(GRAD_DISABLED, list(pids), module, owner_name, name, info))
                    continue
        # (b) an op cut the gradient downstream (detach, or a consumer under no_grad).
        bit = owner_bits[owner_id]
        event = next((e for e, m in zip(trace.events, event_masks) if m & bit and not benign(ctx, e)), None)
        if event is not None:
            add(("event", module, id(event)), _event_blame(ctx, event, pids, module, owner_name))
            continue
        # (c) the forward raised: the run error (or its explanation) covers these parameters.
        if ctx.run_error is not None:
            continue
        # (d) it never ran, or ran without reaching the loss.
        if not calls:
            add(("never", module or owner_name), Blame(UNUSED_PARAM, list(pids), module, owner_name, reason=NEVER_RAN))
            continue
        reached_out = any(node in ctx.graph.depth for c in calls for node in c.output_nodes)
        if reached_out:
            add(
                ("unused-inside", owner_name),
                Blame(UNUSED_PARAM, list(pids), module, owner_name, reason=UNUSED_INSIDE, calls=calls),
            )
        else:
            add(("unreached", module), Blame(UNUSED_PARAM, list(pids), module, owner_name, reason=UNREACHED))
    return list(resolved.values())


def _event_blame(
    ctx: DiagnosisContext, event: CutEvent, pids: list[int], module: Optional[str], owner_name: str
) -> Blame:
    subject = module or owner_name
    if event.kind != "grad_disabled":
        return Blame(DETACHED, list(pids), module, owner_name, subject, event=event)
    info, culprit = ctx.transition_disable(event.call_index)
    if info is None:
        info, culprit = event.disable, subject
    culprit = culprit or subject
    if info is not None and info.checkpoint is not None:
        return Blame(REENTRANT_CHECKPOINT, list(pids), module, owner_name, culprit, info, event)
    return Blame(GRAD_DISABLED, list(pids), module, owner_name, culprit, info, event)


__all__ = ["Blame", "NEVER_RAN", "UNREACHED", "UNUSED_INSIDE", "attribute_missing", "benign"]
