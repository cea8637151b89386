"""``grad_disabled``: a trainable module (or a frozen carrier) ran with autograd off.

Found four ways:

* the caller's grad mode was already off when the forward was called (an evaluation
  helper or callback left ``set_grad_enabled(False)`` / ``no_grad().__enter__()``
  unrestored, or the step runs inside ``with torch.no_grad():``): :func:`observe_caller`
  records the mode on entry and looks for the switch — enclosing blocks on the live
  stack, the switch a :class:`~diagnostics.freeze.FreezeWatch` saw, then a static scan
  of the user's loaded modules for unrestored switches. The engine runs the forward in
  that mode (it never fixes it for the caller) and leaves the mode as it found it;
* the forward raised on inference tensors (a module whose forward is
  ``@torch.inference_mode()``, its output fed to a trainable layer);
* the blame step (:mod:`diagnostics.blame`) traced the parameters' calls to a
  transition into ``no_grad`` / ``inference_mode`` / ``set_grad_enabled(False)``, or
  found an op that consumed their output with grad off.

The location is the statement that switched grad off when it is the user's; when it
sits in a library, the user's call into that library goes in ``call_site``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any, Optional

from ._base import ERROR, Finding, format_params, loc_fields, site_json

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import CallerGradMode, DiagnosisContext
    from ..source import CodeClassifier, GradDisableSite, SourceLocation
    from ..trace import DisableInfo, ModuleCall

#: ``Blame.reason`` of parameters cut because the caller's grad mode was off on entry.
CALLER = "caller"

NAME = "grad_disabled"
ORDER = 10
MEANING = (
    "a trainable module (or a frozen one that must carry gradient back to it) ran "
    "with autograd disabled (no_grad / inference_mode / set_grad_enabled(False))"
)
FIX = "run the trainable module outside the grad-disabled block"


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """Findings for inference-tensor errors and for blames named ``grad_disabled``."""
    findings: list[Finding] = []
    if ctx.run_error is not None and ctx.run_error.stage == "forward":
        findings.extend(_explain_forward_error(ctx))
    for blame in ctx.blames:
        if blame.cause == NAME:
            findings.append(_caller_finding(ctx, blame) if blame.reason == CALLER else _blame_finding(ctx, blame))
    return findings


# ---------------------------------------------------------------- the caller's mode


def observe_caller(
    classifier: "CodeClassifier", frame: Optional[types.FrameType], model: Any = None
) -> "CallerGradMode":
    """The grad mode on entry to the diagnosis and, when it is off, where it was switched off.

    Args:
        classifier: user vs library code.
        frame: the frame that called the diagnosis (its callers are walked outward).
        model: the model about to run. Unrestored switches in methods of ``nn.Module``
            classes (its own and any loaded user module's) rank last: a switch in a
            forward shows in the traced forward itself; the caller's mode is usually
            left off by a plain helper or a callback.

    Returns:
        The mode, the user's entry frame, and the switch when one is found.
    """
    import torch

    from ..context import CallerGradMode
    from ..freeze import grad_left_off
    from ..source import frame_location, iter_frames, scan_frame

    caller = CallerGradMode(torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    user_frames = [f for f in iter_frames(frame) if classifier.kind(f.f_code.co_filename) == "user"]
    if user_frames:
        caller.entry = frame_location(user_frames[0])
    if not caller.off:
        return caller
    wanted = ("inference_mode",) if caller.inference_mode else ("no_grad", "set_grad_enabled", "inference_mode")
    # 1. an enclosing block (or an earlier unrestored switch) in a function on the stack.
    for f in user_frames:
        site = scan_frame(f)
        if site is not None and site.kind in wanted:
            _take(caller, site, "enclosing" if site.form in ("with", "decorator") else "stack")
            return caller
    # 2. the switch a FreezeWatch saw (the CLI watches the --factory / model loading).
    watched = grad_left_off(model)
    if watched is not None and not caller.inference_mode:
        caller.site, caller.statement, caller.how = watched, watched.code, "watched"
        return caller
    # 3. unrestored switches anywhere in the user's loaded code.
    found = [s for s in _unrestored_in_user_code(classifier, user_frames) if s.kind in wanted]
    methods = _module_methods(model, classifier)
    found.sort(key=lambda s: (s.location.file, s.location.function) in methods)  # stable: others first
    if found:
        _take(caller, found[0], "static")
        caller.candidates = [s.location for s in found[1:4]]
    return caller


def _take(caller: "CallerGradMode", site: "GradDisableSite", how: str) -> None:
    caller.site, caller.statement, caller.how = site.location, site.statement, how


def _module_methods(model: Any, classifier: "CodeClassifier") -> set[tuple[str, Optional[str]]]:
    """``(file, function name)`` of the methods of the model's classes and of the user's ``nn.Module`` classes."""
    from torch import nn

    classes: set[type] = {k for m in model.modules() for k in type(m).__mro__} if model is not None else set()
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if not isinstance(filename, str) or classifier.kind(filename) != "user":
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        classes.update(v for v in values if isinstance(v, type) and issubclass(v, nn.Module))
    out: set[tuple[str, Optional[str]]] = set()
    for klass in classes:
        for value in vars(klass).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None:
                out.add((code.co_filename, code.co_name))
    return out


def _unrestored_in_user_code(classifier: "CodeClassifier", user_frames: list[types.FrameType]) -> list["GradDisableSite"]:
    """Unrestored switches in the files of the stack's user frames first, then other user modules."""
    from ..source import unrestored_grad_switches, user_source_files

    sites: list["GradDisableSite"] = []
    for filename in user_source_files(classifier, user_frames):
        sites.extend(unrestored_grad_switches(filename))
    return sites


def _caller_finding(ctx: "DiagnosisContext", blame: "Blame") -> Finding:
    caller = ctx.caller
    names = ctx.param_names(blame.pids)
    verb = "gets" if len(names) == 1 else "get"
    state = "inference mode was already on" if caller.inference_mode else "grad was already disabled"
    probe = "torch.is_inference_mode_enabled() is True" if caller.inference_mode else "torch.is_grad_enabled() is False"
    site = caller.site
    if site is not None and caller.how == "enclosing":
        why = (
            f"`{caller.statement}` at {site.display()} encloses the call — run the training step "
            "outside that block"
        )
    elif site is not None:
        seen = {
            "watched": " (seen while the model was built)",
            "static": " (found by a static scan of your loaded code; if that code did not run, look for another switch)",
        }.get(caller.how or "", "")
        in_fn = f" in `{site.function}`" if site.function and site.function != "<module>" else ""
        why = (
            f"`{caller.statement or site.code}` at {site.display()}{in_fn} switched it off{seen} and nothing "
            "switched it back on — restore the mode after that code (`torch.set_grad_enabled(True)`, or "
            "scope it: `with torch.no_grad():` / `with torch.inference_mode():`) before the training step"
        )
        if caller.candidates:
            why += "; other unrestored switches in your code: " + ", ".join(c.display() for c in caller.candidates)
    else:
        why = (
            "no switch that did it was found in your code — look for a `torch.set_grad_enabled(False)` or "
            "an `__enter__()` of no_grad/inference_mode that is never undone, and re-enable grad before "
            "the training step"
        )
    location = site if site is not None else caller.entry
    file, line = loc_fields(location)
    entry = f" (called from {caller.entry.display()})" if caller.entry is not None and caller.entry != site else ""
    return Finding(
        ERROR,
        NAME,
        f"{format_params(names)} {verb} no gradient: {state} when the forward was called{entry} "
        f"({probe} on entry), so the whole forward ran without autograd; {why}. The diagnosis ran the "
        "forward in your mode, as the training step will, and left the mode as it found it.",
        module=blame.module,
        params=names,
        file=file,
        line=line,
        extra={
            "caller_grad_enabled": caller.grad_enabled,
            "caller_inference_mode": caller.inference_mode,
            "grad_off_site": site_json(site),
            "found_by": caller.how,
            "candidates": [site_json(c) for c in caller.candidates],
            "entry": site_json(caller.entry),
        },
    )


def describe_disable(info: "DisableInfo", module: str) -> tuple[str, str, Optional["SourceLocation"], dict[str, Any]]:
    """(what disabled grad, the fix, the location to report, extra JSON)."""
    site = info.site
    extra: dict[str, Any] = {}
    if site is None:
        return (
            "grad disabled (the statement could not be located statically)",
            f"make sure {module} runs with grad enabled",
            None,
            extra,
        )
    where = site.location.display()
    statement = site.statement
    if info.site_kind not in (None, "user"):
        extra["call_site"] = site_json(info.user_call_site)
        entered = f" (your call into it: {info.user_call_site.display()}" + (
            f" `{info.user_call_site.code}`)" if info.user_call_site and info.user_call_site.code else ")"
        ) if info.user_call_site else ""
        what = f"`{statement}` in library code at {where}{entered}"
        if site.kind == "inference_mode":
            fix = (
                "the library returns inference tensors: clone its output outside inference mode "
                "(`x = x.clone()`) before it reaches a trainable layer, or call the library "
                "forward under torch.no_grad() instead of its inference_mode decorator"
            )
        else:
            fix = f"call {module} outside the library code that disables grad"
        return what, fix, site.location, extra
    what = f"`{statement}` at {where}"
    if site.form == "with":
        fix = f"move {module} out of the block"
    elif site.form == "decorator":
        fn = site.location.function or "the function"
        fix = f"remove the decorator from `{fn}` or call {module} outside it"
    else:
        fix = f"re-enable grad before {module} runs (or scope the switch with `with torch.no_grad():`)"
    return what, fix, site.location, extra


def _blame_finding(ctx: "DiagnosisContext", blame: "Blame") -> Finding:
    names = ctx.param_names(blame.pids)
    verb = "gets" if len(names) == 1 else "get"
    subject = blame.module or blame.owner_name
    info = blame.info
    if info is None or info.site is None:
        if blame.event is not None:
            # Found by the op that consumed the output with grad off; no statement located.
            loc = blame.event.location
            what = f"grad was disabled when `{blame.event.op}` consumed its output at {loc.display() if loc else '?'}"
            file, line = loc_fields(loc)
            return Finding(
                ERROR, NAME,
                f"{format_params(names)} {verb} no gradient: {what} — run that code with grad enabled.",
                module=subject, params=names, file=file, line=line,
            )
    assert info is not None  # a blame without an event always carries where grad went off
    culprit = blame.culprit or subject
    subject = blame.module or culprit
    what, fix, location, extra = describe_disable(info, culprit)
    if culprit == subject or culprit.startswith(subject + "."):
        body = f"{subject} ran with grad disabled by {what}"
    else:
        body = (
            f"{culprit} ran with grad disabled by {what}; {culprit} must carry gradient back to "
            f"{subject} (its own parameters may stay frozen)"
        )
    file, line = loc_fields(location)
    extra["culprit_module"] = culprit
    return Finding(
        ERROR,
        NAME,
        f"{format_params(names)} {verb} no gradient: {body} — {fix}.",
        module=subject,
        params=names,
        file=file,
        line=line,
        extra=extra,
    )


def _explain_forward_error(ctx: "DiagnosisContext") -> list[Finding]:
    """A finding that explains an exception raised by the forward on inference tensors."""
    trace = ctx.trace
    run_error = ctx.run_error
    assert trace is not None and run_error is not None
    failed = trace.failed_op
    message = run_error.message
    inference = "Inference tensors" in message or (failed is not None and failed.inference_inputs)
    if not inference:
        return []
    # Who produced inference tensors: a module whose own forward turned inference mode
    # on (decorator/with), or a grad-disabled region entered in inference mode.
    producer: Optional["ModuleCall"] = next(
        (c for c in trace.calls if c.inner_disable is not None and c.inner_disable.site is not None), None
    )
    info: Optional["DisableInfo"] = producer.inner_disable if producer else None
    if info is None:
        for call in trace.calls:
            if call.disable is not None and call.inference_mode and call.disable.site is not None:
                parent = trace.calls[call.parent] if call.parent is not None else None
                if parent is None or not parent.inference_mode:
                    producer, info = call, call.disable
                    break
    consumer = trace.calls[failed.call_index] if failed and failed.call_index is not None else None
    pids: list[int] = []
    consumer_name = "a module"
    if consumer is not None:
        consumer_name = consumer.name
        # Name every trainable parameter of the report-level module that failed.
        index = next((ctx.report_of_param[p] for p in consumer.trainable_param_ids if p in ctx.report_of_param), None)
        if index is None:
            index = ctx.report_index_of_module(consumer.name)
        if index is not None:
            pids = [p for p in ctx.trainable if ctx.report_of_param.get(p) == index]
            consumer_name = ctx.report_names[index].removesuffix(":own")
    names = ctx.param_names(pids)
    module = ctx.report_module(pids) or consumer_name
    failing_at = f" at {failed.location.display()}" if failed and failed.location else ""
    if info is not None and producer is not None:
        what, fix, location, extra = describe_disable(info, module)
        file, line = loc_fields(location)
        extra["explains_error"] = True
        extra["culprit_module"] = producer.name
        text = (
            f"{consumer_name} received inference tensors from {producer.name}, whose forward runs under "
            f"{what}; autograd cannot save them for backward, so the forward raised "
            f"\"{message[:90]}\"{failing_at}. {fix[0].upper() + fix[1:]}."
        )
        subject = f"{format_params(names)} cannot get gradient: " if names else ""
        return [Finding(ERROR, NAME, subject + text, module=module, params=names, file=file, line=line, extra=extra)]
    file, line = loc_fields(failed.location if failed else None)
    return [
        Finding(
            ERROR,
            NAME,
            f"{consumer_name} received inference tensors (created under torch.inference_mode()) and the "
            f"forward raised \"{message[:90]}\"{failing_at}; the inference_mode region could not be "
            "located — clone the tensor outside inference mode or use torch.no_grad() instead.",
            module=module,
            params=names,
            file=file,
            line=line,
            extra={"explains_error": True},
        )
    ]


__all__ = ["CALLER", "FIX", "MEANING", "NAME", "check", "describe_disable", "observe_caller"]
