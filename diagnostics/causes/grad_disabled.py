"""``grad_disabled``: a trainable module (or a frozen carrier) ran with autograd off.

Found three ways:

* the forward raised on inference tensors (a module whose forward is
  ``@torch.inference_mode()``, its output fed to a trainable layer);
* the blame step (:mod:`diagnostics.blame`) traced the parameters' calls to a
  transition into ``no_grad`` / ``inference_mode`` / ``set_grad_enabled(False)``, or
  found an op that consumed their output with grad off.

The location is the statement that switched grad off when it is the user's; when it
sits in a library, the user's call into that library goes in ``call_site``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ._base import ERROR, Finding, format_params, loc_fields, site_json

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import DiagnosisContext
    from ..source import SourceLocation
    from ..trace import DisableInfo, ModuleCall

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
            findings.append(_blame_finding(ctx, blame))
    return findings


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


__all__ = ["FIX", "MEANING", "NAME", "check", "describe_disable"]
