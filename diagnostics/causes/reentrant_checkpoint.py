"""``reentrant_checkpoint``: parameters inside a reentrant checkpoint over inputs without grad.

``torch.utils.checkpoint(..., use_reentrant=True)`` runs its function under
``no_grad`` and attaches its output to the graph through the inputs only; when none
requires grad the output has no ``grad_fn`` and the parameters inside get nothing.
The trace recognises the checkpoint's frame while locating the grad-off transition
(:class:`~diagnostics.trace.CheckpointInfo`); the blame step names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import ERROR, Finding, format_params, loc_fields, site_json

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import DiagnosisContext

NAME = "reentrant_checkpoint"
ORDER = 20
MEANING = (
    "torch.utils.checkpoint with use_reentrant=True ran over inputs that do not "
    "require grad: its output has no grad_fn and the parameters inside get none"
)
FIX = "pass use_reentrant=False, or make an input require grad (`model.enable_input_require_grads()`)"


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """One finding per checkpoint call site that hides trainable parameters."""
    return [_finding(ctx, blame) for blame in ctx.blames if blame.cause == NAME]


def _finding(ctx: "DiagnosisContext", blame: "Blame") -> Finding:
    info = blame.info
    assert info is not None and info.checkpoint is not None  # the blame step sets both
    checkpoint = info.checkpoint
    names = ctx.param_names(blame.pids)
    inner = blame.culprit or blame.owner_name
    where = checkpoint.call_site.display() if checkpoint.call_site else "an unknown place"
    user = ""
    if checkpoint.user_call_site and checkpoint.call_site and checkpoint.user_call_site != checkpoint.call_site:
        user = f" (reached from your code at {checkpoint.user_call_site.display()})"
    file, line = loc_fields(checkpoint.call_site)
    return Finding(
        ERROR,
        NAME,
        f"{format_params(names)} get no gradient: {inner}{' (and the like)' if len(names) > 4 else ''} "
        "runs inside torch.utils.checkpoint with "
        f"use_reentrant=True, called at {where}{user}, and none of the checkpoint's inputs "
        "requires grad — its output has no grad_fn, so the parameters inside are never reached. "
        "Pass use_reentrant=False (HF: `gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        "{'use_reentrant': False})`), or make an input require grad "
        "(`model.enable_input_require_grads()`).",
        module=blame.module,
        params=names,
        file=file,
        line=line,
        extra={"checkpoint_call_site": site_json(checkpoint.call_site)},
    )


__all__ = ["FIX", "MEANING", "NAME", "check"]
