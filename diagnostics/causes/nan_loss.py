"""``nan_loss``: the loss, or a gradient behind a finite loss, is NaN or infinite.

The commonest case is a batch whose labels are all ``-100``: the mean over zero
supervised tokens is 0/0. Non-finite gradients behind a finite loss point at
overflow or a log/sqrt/division at 0 in the forward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from ._base import ERROR, Finding, format_params

if TYPE_CHECKING:
    from ..context import DiagnosisContext

NAME = "nan_loss"
ORDER = 50
MEANING = "the loss (or a gradient) is NaN or infinite"
FIX = (
    "check the labels (all -100 leaves no token to average over) and the inputs; "
    "skip batches without supervised tokens"
)


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """The loss value, then the gradients the backward produced."""
    if ctx.loss is None:
        return []
    findings = _loss_value(ctx)
    if ctx.backward_ran:
        findings.extend(_gradients(ctx))
    return findings


def scalar(loss: Any) -> Optional[float]:
    """``float(loss)``, or ``None`` when it cannot be read."""
    try:
        return float(loss.detach().float().item())
    except Exception:
        return None


def _all_labels_ignored(ctx: "DiagnosisContext") -> Optional[str]:
    from ..context import named_batch_tensors

    for key, tensor in named_batch_tensors(ctx.batch):
        if "label" in key.lower() and not tensor.is_floating_point() and tensor.numel() > 0:
            if bool((tensor == -100).all()):
                return key
    return None


def _loss_value(ctx: "DiagnosisContext") -> list[Finding]:
    value = scalar(ctx.loss)
    if value is None or math.isfinite(value):
        return []
    key = _all_labels_ignored(ctx)
    if key is not None:
        why = (
            f"every entry of `{key}` is -100 (ignore_index): the mean over zero supervised tokens "
            "is 0/0 = NaN"
        )
        fix = "skip batches without supervised tokens, or check the label masking"
    else:
        why = "the forward produced a non-finite value"
        fix = "check inputs and labels for NaN/inf and the loss for division by zero or overflow (dtype)"
    return [
        Finding(
            ERROR,
            NAME,
            f"the loss is {value}: {why}; every gradient will be NaN — {fix}.",
            extra={"value": str(value), "labels_key": key},
        )
    ]


def _gradients(ctx: "DiagnosisContext") -> list[Finding]:
    import torch

    value = scalar(ctx.loss)
    if value is None or not math.isfinite(value):
        return []  # a non-finite loss explains non-finite gradients
    non_finite = [
        ctx.names[pid] for pid in ctx.trainable
        if pid in ctx.grad_values and not bool(torch.isfinite(ctx.grad_values[pid].detach()).all())
    ]
    if not non_finite:
        return []
    chosen = set(non_finite)
    return [
        Finding(
            ERROR,
            NAME,
            f"{format_params(non_finite)} got non-finite gradients although the loss is finite — "
            "look for overflow (fp16), log/sqrt of 0, or division by zero in the forward.",
            module=ctx.report_module([pid for pid in ctx.trainable if ctx.names[pid] in chosen]),
            params=non_finite,
        )
    ]


__all__ = ["FIX", "MEANING", "NAME", "check", "scalar"]
