"""``not_trainable``: a parameter meant to train is frozen, missing, or not registered.

Two sources:

* before the forward, :func:`diagnostics.params.check_expectations` compares
  ``expect_trainable`` with the model (messages built here: :func:`no_match`,
  :func:`frozen_expected`);
* after it, :func:`check` reports modules that ran inside the model with trainable
  parameters but are not registered in it (kept in a plain list/dict), and trainable
  leaves the graph reaches that the model does not own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ._base import ERROR, Finding, format_params, loc_fields

if TYPE_CHECKING:
    from ..context import DiagnosisContext
    from ..source import SourceLocation
    from ..trace import ModuleCall

NAME = "not_trainable"
ORDER = 40
MEANING = "a parameter expected to train is frozen, missing, or not registered in the model"
FIX = (
    "set requires_grad=True on it after any freezing loop, and register modules as "
    "attributes or in nn.ModuleList/ModuleDict"
)


def no_match(pattern: str, top_level: list[str]) -> Finding:
    """``expect_trainable`` entry ``pattern`` matches no parameter."""
    return Finding(
        ERROR,
        NAME,
        f"expected trainable `{pattern}` matches no parameter of the model "
        f"(top-level names: {format_params(top_level, 8)}). If the module exists but "
        "is kept in a plain list/dict it is not registered: use nn.ModuleList / "
        "nn.ModuleDict or assign it as an attribute.",
        module=pattern,
        extra={"pattern": pattern},
    )


def frozen_expected(pattern: str, frozen: list[str], matched: int, site: Optional["SourceLocation"]) -> Finding:
    """Parameters under ``pattern`` (expected to train) have ``requires_grad=False``."""
    where = ""
    if site is not None:
        where = f"; frozen by `{site.code or 'requires_grad=False'}` at {site.display()}"
    module_name = pattern if not any(ch in pattern for ch in "*?[") else None
    unfreeze = (
        f"`model.{pattern}.requires_grad_(True)`"
        if module_name
        else "`p.requires_grad_(True)` for the matching parameters"
    )
    file, line = loc_fields(site)
    return Finding(
        ERROR,
        NAME,
        f"{format_params(frozen)} ({len(frozen)} of {matched} tensors under "
        f"`{pattern}`) have requires_grad=False although `{pattern}` is expected to "
        f"train{where} — unfreeze them after the freezing code: {unfreeze}.",
        module=module_name,
        params=frozen,
        file=file,
        line=line,
        extra={"pattern": pattern},
    )


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """Trainable parameters used by the forward that the model does not own."""
    from torch import nn

    assert ctx.trace is not None
    findings = []
    seen: set[int] = set()
    calls_by_name: dict[str, "ModuleCall"] = {}
    for call in ctx.trace.calls:
        if not call.registered:
            calls_by_name.setdefault(call.name, call)
    for name, call in calls_by_name.items():
        if not call.trainable_param_ids:
            continue
        parent = ctx.trace.calls[call.parent] if call.parent is not None else None
        if parent is not None and not parent.registered:
            continue  # report the outermost unregistered module only
        seen.update(call.trainable_param_ids)
        file, line = loc_fields(call.call_site)
        owner = parent.name if parent is not None else "the model"
        held = _holder_name(ctx, parent, call)
        if held:
            name = f"{held} ({name.strip('<>')})"
        findings.append(
            Finding(
                ERROR,
                NAME,
                f"{name} ran inside {owner} (called at {call.call_site.display() if call.call_site else '?'}) "
                "but is not a registered submodule: its trainable parameters are missing from "
                "model.parameters() and state_dict(), so the optimizer never updates them and "
                "checkpoints never save them — assign it as an attribute or keep it in "
                "nn.ModuleList / nn.ModuleDict instead of a plain list/dict.",
                module=name,
                file=file,
                line=line,
                extra={"unregistered": True},
            )
        )
    stray = [
        v for k, v in ctx.graph.reached.items()
        if k not in ctx.names and k not in seen and isinstance(v, nn.Parameter) and v.requires_grad
    ]
    if stray:
        shapes = ", ".join(str(tuple(v.shape)) for v in stray[:4])
        findings.append(
            Finding(
                ERROR,
                NAME,
                f"{len(stray)} trainable parameter(s) of shape {shapes} receive gradient but are not "
                "registered in the model (not in model.parameters()): the optimizer never sees them — "
                "register them as attributes or in nn.ParameterList / nn.ModuleList.",
                extra={"unregistered": True},
            )
        )
    return findings


def _holder_name(ctx: "DiagnosisContext", parent: Optional["ModuleCall"], call: "ModuleCall") -> Optional[str]:
    """``projectors[0]`` when the unregistered module sits in a plain list/dict attribute."""
    module = call.module_ref() if call.module_ref is not None else None
    if module is None or parent is None:
        return None
    owner = next((m for m in ctx.model.modules() if id(m) == parent.module_id), None)
    if owner is None:
        return None
    value: Any
    for attr, value in vars(owner).items():
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if item is module:
                    return f"{attr}[{i}]"
        elif isinstance(value, dict) and not attr.startswith("_"):
            for key, item in value.items():
                if item is module:
                    return f"{attr}[{key!r}]"
    return None


__all__ = ["FIX", "MEANING", "NAME", "check", "frozen_expected", "no_match"]
