"""``unused_param``: a trainable parameter took no part in this batch's loss.

Two ways: the blame step found the module never ran, ran without using the
parameters, or produced an output that never reaches the loss (errors); or the
backward gave a gradient that is exactly zero — expected (info) behind a
zero-initialised weight such as LoRA's ``lora_B`` on the first step, a warning
otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import ERROR, INFO, WARNING, Finding, format_params

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import DiagnosisContext

NAME = "unused_param"
ORDER = 70
MEANING = "a trainable parameter took no part in this batch's loss"
FIX = (
    "make sure the module runs and its output reaches the loss for every batch, or "
    "skip such batches explicitly"
)


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """Errors for blamed parameters, then the all-zero gradient finding."""
    findings = [_blame_finding(ctx, blame) for blame in ctx.blames if blame.cause == NAME]
    if ctx.backward_ran:
        findings.extend(_zero_gradients(ctx))
    return findings


def _blame_finding(ctx: "DiagnosisContext", blame: "Blame") -> Finding:
    from ..blame import NEVER_RAN, UNUSED_INSIDE

    names = ctx.param_names(blame.pids)
    module = blame.module
    if blame.reason == NEVER_RAN:
        text = (
            f"{module or blame.owner_name} never ran during this forward. If that depends on the batch (e.g. no "
            "history to compress, no image), the batch trains nothing there — skip such batches "
            "explicitly or make sure the module runs; diagnose several batches (`--batches N`)"
        )
    elif blame.reason == UNUSED_INSIDE:
        text = (
            f"{blame.owner_name} ran and its output reaches the loss, but its forward does not use "
            f"{format_params(names)} — remove the unused parameters or use them"
        )
    else:
        text = (
            f"{module} ran with grad enabled but its output never reaches the loss (it is "
            "discarded, overwritten, or replaced by a copy) — make sure the output is what "
            "the loss is computed from"
        )
    verb = "gets" if len(names) == 1 else "get"
    return Finding(ERROR, NAME, f"{format_params(names)} {verb} no gradient: {text}.", module=module, params=names)


def _zero_gradients(ctx: "DiagnosisContext") -> list[Finding]:
    zero = []
    for pid in ctx.trainable:
        grad = ctx.grad_values.get(pid)
        if grad is not None and not bool(grad.detach().any()):
            zero.append(ctx.names[pid])
    if not zero:
        return []
    zero_init = [
        ctx.names[pid] for pid, p in ctx.trainable.items()
        if ctx.names[pid] not in zero and p.numel() > 0 and not bool(p.detach().any())
    ]
    if zero_init:
        severity = INFO
        why = (
            f"expected on the first step: trainable {format_params(zero_init, 2)} "
            "is all zeros (zero-initialised, like LoRA's lora_B), which blocks the gradient "
            "of what lies before it until it has been updated once"
        )
    else:
        severity = WARNING
        why = (
            "they are on the graph but their contribution is exactly zero (zero mask, dead "
            "activation, zero-initialised downstream weight, or a `0 * ...` term that only keeps "
            "the graph alive, e.g. for a batch without history) — this batch trains nothing there"
        )
    zero_set = set(zero)
    return [
        Finding(
            severity,
            NAME,
            f"{format_params(zero)} got an all-zero gradient: {why}.",
            module=ctx.report_module([pid for pid in ctx.trainable if ctx.names[pid] in zero_set]),
            params=zero,
        )
    ]


__all__ = ["FIX", "MEANING", "NAME", "check"]
