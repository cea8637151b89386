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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ._base import ERROR, Finding, format_params, loc_fields, site_json

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


def frozen_expected(
    pattern: str,
    frozen: list[str],
    matched: int,
    site: Optional["SourceLocation"],
    peft: bool = False,
    module_names: Sequence[str] = (),
    base_prefix: str = "",
    guessed: bool = False,
) -> Finding:
    """Parameters under ``pattern`` (expected to train) have ``requires_grad=False``.

    With ``peft`` (the model is wrapped by PEFT), the freeze is PEFT's own: it freezes
    every parameter that is not an adapter or listed in ``modules_to_save``;
    ``module_names`` (of the wrapped base model, which sits at ``base_prefix`` in the
    PEFT model) decide whether a ``modules_to_save`` entry can name the module alone.
    ``guessed``: ``site`` is the likeliest freezing statement of the user's code, not one
    known to name these parameters (a target computed at run time, another module's statement).
    """
    where = ""
    if site is not None:
        where = f"; frozen by `{site.code or 'requires_grad=False'}` at {site.display()}"
        if guessed:
            where = (
                f"; most likely frozen by `{site.code or 'requires_grad=False'}` at {site.display()} "
                "(found by a static scan of your code: no statement of the files on the stack names these "
                "parameters)"
            )
    module_name = pattern if not any(ch in pattern for ch in "*?[") else None
    unfreeze = (
        f"`model.{pattern}.requires_grad_(True)`"
        if module_name
        else "`p.requires_grad_(True)` for the matching parameters"
    )
    fix = f"unfreeze them after the freezing code: {unfreeze}"
    extra: dict[str, Any] = {"pattern": pattern}
    if peft:
        full = (frozen[0].rsplit(".", 1)[0] if module_name is None else pattern.rstrip("."))
        if base_prefix and full.startswith(base_prefix + "."):
            full = full[len(base_prefix) + 1 :]
        short = _modules_to_save_name(full, module_names)
        extra["modules_to_save"] = short
        if short is not None:
            fix = (
                "get_peft_model() freezes every parameter that is not an adapter: list the module in the "
                f"PEFT config, `modules_to_save=[{short!r}]` (PEFT then trains it and saves it with the "
                f"adapter), or unfreeze it after the get_peft_model() call: {unfreeze}"
            )
        else:
            clash = [n for n in module_names if n.endswith(full) and n != full][:2]
            fix = (
                "get_peft_model() freezes every parameter that is not an adapter; `modules_to_save` cannot "
                f"name `{full}` alone (PEFT matches entries as name suffixes, and {', '.join(clash)} end in it "
                f"too), so unfreeze it after the get_peft_model() call: {unfreeze}"
            )
    file, line = loc_fields(site)
    return Finding(
        ERROR,
        NAME,
        f"{format_params(frozen)} ({len(frozen)} of {matched} tensors under "
        f"`{pattern}`) have requires_grad=False although `{pattern}` is expected to "
        f"train{where} — {fix}.",
        module=module_name,
        params=frozen,
        file=file,
        line=line,
        extra=extra,
    )


def _modules_to_save_name(full: str, module_names: Sequence[str]) -> Optional[str]:
    """The shortest dotted suffix of module ``full`` that PEFT's ``modules_to_save`` matches to it alone.

    PEFT matches an entry ``key`` to every module whose name (in the base model) ends
    with ``key``, as a plain string: ``proj`` also matches ``q_proj``. ``None`` when no
    suffix is unique.
    """
    parts = full.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if [n for n in module_names if n.endswith(suffix)] == [full]:
            return suffix
    return None


def is_peft(model: Any) -> bool:
    """Whether ``model`` is (or wraps) a PEFT model — PEFT froze what is not an adapter."""
    return any(type(m).__module__.startswith("peft.") for m in (model, getattr(model, "base_model", None)) if m is not None)


def peft_freeze_site(classifier: Any) -> Optional["SourceLocation"]:
    """The user's ``get_peft_model(...)`` call, from a static scan of the user's loaded code."""
    import sys

    from ..source import find_calls, iter_frames, user_source_files

    frames = [f for f in iter_frames(sys._getframe(1)) if classifier.kind(f.f_code.co_filename) == "user"]
    for filename in user_source_files(classifier, frames):
        calls = find_calls(filename, ("get_peft_model",))
        if calls:
            return calls[0][0]
    return None


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
        owner = parent.name if parent is not None else "the model"
        held = _holder(ctx, parent, call)
        stored = ""
        location = call.call_site
        extra: dict[str, Any] = {"unregistered": True}
        if held is not None:
            name = f"{held.label} ({name.strip('<>')})"
            container = type(getattr(held.owner, held.attr)).__name__
            if held.assignment is not None:
                # The bug is the statement that stores the module in a plain container.
                location = held.assignment
                extra["call_site"] = site_json(call.call_site)
                stored = f", stored in a plain {container} by `{held.assignment.code}` at {held.assignment.display()}"
            else:
                stored = f", kept in the plain {container} `{held.attr}`"
        file, line = loc_fields(location)
        if held is None:
            fix = "keep it in nn.ModuleList / nn.ModuleDict instead of a plain list/dict"
        else:
            registered = "nn.ModuleDict" if container == "dict" else "nn.ModuleList"
            fix = f"make `self.{held.attr}` an {registered}"
        findings.append(
            Finding(
                ERROR,
                NAME,
                f"{name} ran inside {owner} (called at {call.call_site.display() if call.call_site else '?'}){stored}, "
                "but is not a registered submodule: its trainable parameters are missing from "
                "model.parameters() and state_dict(), so the optimizer never updates them and "
                f"checkpoints never save them — {fix} (or assign the module as an attribute).",
                module=name,
                file=file,
                line=line,
                extra=extra,
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


@dataclass
class _Holder:
    """Where an unregistered module is kept: ``owner.attr[key]``, and the statement that stored it."""

    owner: Any
    attr: str
    label: str  # ``projectors[0]``
    assignment: Optional["SourceLocation"]


def _holder(ctx: "DiagnosisContext", parent: Optional["ModuleCall"], call: "ModuleCall") -> Optional[_Holder]:
    """The plain list/tuple/dict attribute of the parent module that holds the unregistered module."""
    from ..source import attribute_assignment

    module = call.module_ref() if call.module_ref is not None else None
    if module is None or parent is None:
        return None
    owner = next((m for m in ctx.model.modules() if id(m) == parent.module_id), None)
    if owner is None:
        return None
    value: Any
    for attr, value in vars(owner).items():
        label = None
        if isinstance(value, (list, tuple)):
            label = next((f"{attr}[{i}]" for i, item in enumerate(value) if item is module), None)
        elif isinstance(value, dict) and not attr.startswith("_"):
            label = next((f"{attr}[{key!r}]" for key, item in value.items() if item is module), None)
        if label is not None:
            return _Holder(owner, attr, label, attribute_assignment(type(owner), attr))
    return None


__all__ = ["FIX", "MEANING", "NAME", "check", "frozen_expected", "is_peft", "no_match", "peft_freeze_site"]
