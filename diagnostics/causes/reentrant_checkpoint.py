"""``reentrant_checkpoint``: parameters inside a reentrant checkpoint over inputs without grad.

``torch.utils.checkpoint(..., use_reentrant=True)`` runs its function under
``no_grad`` and attaches its output to the graph through the inputs only; when none
requires grad the output has no ``grad_fn`` and the parameters inside get nothing.
The trace recognises the checkpoint's frame while locating the grad-off transition
(:class:`~diagnostics.trace.CheckpointInfo`); the blame step names it.

When the ``checkpoint(...)`` call sits in a library (transformers' decoder layers), the
user configured it elsewhere, long before the forward: the finding points at the
user's ``gradient_checkpointing_enable(...)`` call (or a ``gradient_checkpointing=True``
argument, e.g. to ``TrainingArguments``), found by scanning the user's loaded code,
and keeps the library frame as context.
"""

from __future__ import annotations

import ast
import sys
from typing import TYPE_CHECKING, Optional

from ._base import ERROR, Finding, format_params, loc_fields, site_json

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import DiagnosisContext
    from ..source import SourceLocation

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
    location = checkpoint.call_site
    extra = {"checkpoint_call_site": site_json(checkpoint.call_site)}
    in_library = checkpoint.call_site is not None and ctx.classifier.kind(checkpoint.call_site.file) != "user"
    configured = _configuring_call(ctx) if in_library else None
    if configured is not None:
        location = configured
        extra["configured_at"] = site_json(configured)
        user = f" — set up by your `{configured.code}` at {configured.display()}"
    elif checkpoint.user_call_site and checkpoint.call_site and checkpoint.user_call_site != checkpoint.call_site:
        user = f" (reached from your code at {checkpoint.user_call_site.display()})"
        if in_library:
            location = checkpoint.user_call_site
    file, line = loc_fields(location)
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
        extra=extra,
    )


#: The HF calls and flags that turn checkpointing on: ``gradient_checkpointing_*`` (4.x, kept as
#: deprecated aliases in 5.x) and ``activation_checkpointing_*`` (5.x).
_ENABLE_CALLS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")
_ENABLE_FLAGS = ("gradient_checkpointing", "activation_checkpointing")


def _configuring_call(ctx: "DiagnosisContext") -> Optional["SourceLocation"]:
    """The user's ``gradient_checkpointing_enable(...)`` (or ``gradient_checkpointing=True``) call.

    Calls that pass ``use_reentrant: False`` literally are skipped: they did not set up
    this checkpoint. The files of the user's frames on the stack come first (a call there,
    literal ``True`` before a mode not written out); then the other loaded modules, where a
    call passing ``use_reentrant: True`` literally beats one whose mode is a variable or the
    library default (a helper such as ``enable_checkpointing(model, use_reentrant=flag)`` that
    may never have run).
    """
    from ..source import find_calls, iter_frames, user_source_files

    frames = [f for f in iter_frames(sys._getframe(1)) if ctx.classifier.kind(f.f_code.co_filename) == "user"]
    on_stack = {f.f_code.co_filename for f in frames}
    best: Optional[tuple[tuple[bool, bool], "SourceLocation"]] = None
    for filename in user_source_files(ctx.classifier, frames):
        for location, call in find_calls(filename, _ENABLE_CALLS, _ENABLE_FLAGS):
            mode = _reentrant_literal(call)
            if mode is False:
                continue
            rank = (filename not in on_stack, mode is not True)  # lower is better
            if best is None or rank < best[0]:
                best = (rank, location)
            if rank == (False, False):
                return location
    return best[1] if best is not None else None


def _reentrant_literal(call: ast.Call) -> Optional[bool]:
    """The literal ``use_reentrant`` a call passes (in a kwargs dict or as a keyword); None when
    it passes none or a non-literal."""
    for node in ast.walk(call):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "use_reentrant":
                    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, bool) else None
        if isinstance(node, ast.keyword) and node.arg == "use_reentrant":
            value = node.value
            return value.value if isinstance(value, ast.Constant) and isinstance(value.value, bool) else None
    return None


__all__ = ["FIX", "MEANING", "NAME", "check"]
