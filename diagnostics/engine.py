"""``diagnose(model, batch)``: find where gradient stops, and why, for any ``nn.Module``.

The steps (see ``DESIGN.md``, "Diagnostics engine"):

1. count parameters and check ``expect_trainable``;
2. run the forward under :class:`~diagnostics.trace.ForwardTrace`;
3. walk ``loss.grad_fn`` to the ``AccumulateGrad`` nodes it reaches;
4. explain every trainable parameter that gets no gradient from what the trace saw
   (grad disabled, detached, reentrant checkpoint, never ran...), and flag frozen
   modules tracked for nothing;
5. run ``loss.backward()`` and check every trainable gradient is finite and non-zero;
   restore ``.grad`` of every parameter afterwards (or, ``backward="autograd_grad"``, get the
   gradients from ``torch.autograd.grad`` without touching ``.grad`` or firing the
   post-accumulate hooks distributed engines reduce from; ``backward=False``: graph only).

The model is left as it was: hooks removed, ``.grad`` restored, ``requires_grad``
untouched, train/eval mode untouched.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .causes import (
    DETACHED,
    ERROR,
    GRAD_DISABLED,
    INFO,
    NAN_LOSS,
    NOT_TRAINABLE,
    REENTRANT_CHECKPOINT,
    UNUSED_PARAM,
    WARNING,
    WASTED_TRACKING,
    Finding,
    format_bytes,
    format_params,
)
from .errors import LossNotFoundError
from .freeze import static_freeze_sites
from .graph import GraphSummary, ReachMemo, walk_graph
from .params import check_expectations, matches, parameter_table, report_level_modules
from .report import Edge, LossInfo, ModuleState, Report, RunError
from .source import CodeClassifier, SourceLocation, display_path
from .trace import DisableInfo, ForwardTrace, ModuleCall

ForwardFn = Callable[[nn.Module, Any], Any]


def run_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch``: ``**batch`` for mappings, ``*batch`` for tuples/lists."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def move_batch(batch: Any, device: str | torch.device, dtype: Optional[torch.dtype]) -> Any:
    """Move tensors of a batch to ``device``; cast floating ones to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device)
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def extract_loss(output: Any) -> tuple[torch.Tensor, str]:
    """The loss in a model output: a tensor, ``output.loss`` or ``output["loss"]``.

    Raises:
        LossNotFoundError: when none of those is a scalar tensor.
    """
    if isinstance(output, torch.Tensor):
        if output.numel() != 1:
            raise LossNotFoundError(
                f"the model returned a tensor of shape {tuple(output.shape)}, not a scalar loss; "
                "pass `labels` in the batch or wrap the model so that it returns the loss"
            )
        return output, "tensor"
    loss = getattr(output, "loss", None)
    source = ".loss"
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
        source = "['loss']"
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss, source
    raise LossNotFoundError(
        f"could not find a loss in the model output ({type(output).__name__}): expected a scalar "
        "tensor, an object with `.loss`, or a mapping with 'loss' — did the batch carry `labels`?"
    )


@dataclass
class _Context:
    """Per-diagnosis lookups shared by the helpers below."""

    model: nn.Module
    classifier: CodeClassifier
    names: dict[int, str]  # param id -> name
    trainable: dict[int, nn.Parameter]
    owner: dict[int, tuple[str, int]]  # param id -> (owner module name, owner module id)
    report_names: list[str]
    report_of_param: dict[int, int]
    trace: ForwardTrace
    graph: GraphSummary
    batch_names: dict[int, str]


def diagnose(
    model: nn.Module,
    batch: Any,
    expect_trainable: Optional[Sequence[str]] = None,
    *,
    forward: Optional[ForwardFn] = None,
    backward: bool | str = True,
    user_roots: Optional[Sequence[str]] = None,
    freeze_sites: Optional[dict[str, SourceLocation]] = None,
    lint: bool = True,
    measure_saved: bool = True,
    full_graph: bool = False,
) -> Report:
    """Diagnose gradient flow for one batch.

    Args:
        model: any ``nn.Module``; its output must be a scalar loss tensor, have
            ``.loss``, or map ``"loss"``.
        batch: passed as ``model(**batch)`` (mapping), ``model(*batch)`` (tuple/list)
            or ``model(batch)``; or to ``forward``.
        expect_trainable: parameter-name prefixes (``"proj"``) or fnmatch patterns
            (``"*lora_*"``) that must exist and be trainable.
        forward: ``forward(model, batch) -> output`` replacing the default call.
        backward: how gradients are computed and checked. ``True``/``"backward"``: run
            ``loss.backward()`` (every ``.grad`` restored after); ``"autograd_grad"``:
            ``torch.autograd.grad(loss, params)``, which returns the gradients without
            running ``AccumulateGrad``, so ``.grad`` is never written and post-accumulate
            hooks (DDP's reducer, DeepSpeed ZeRO's reduction) do not fire;
            ``False``/``"none"``: no backward, answer from the autograd graph only.
        user_roots: directories holding the user's code (default: the working
            directory); frames there are what findings point at.
        freeze_sites: parameter name -> where it was frozen (from
            :class:`~diagnostics.freeze.FreezeWatch`); a static scan is used otherwise.
        lint: cross-reference :mod:`diagnostics.lint` findings for the files involved.
        measure_saved: count bytes saved for backward per module (wasted_tracking).
        full_graph: keep a torchviz rendering of the autograd graph in
            ``report.autograd_dot`` (needs torchviz).

    Returns:
        The :class:`~diagnostics.report.Report`. Exceptions raised by the model are
        caught and recorded in ``report.error``; they are ``explained`` when a
        gradient-flow finding accounts for them.
    """
    started = time.perf_counter()
    classifier = CodeClassifier(user_roots)
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    trainable = {id(p): p for _, p in named if p.requires_grad}
    owner: dict[int, tuple[str, int]] = {}
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), (module_name or "(root)", id(module)))
    level = report_level_modules(model)
    report_names = [n for n, _ in level]
    report_of_param: dict[int, int] = {}
    for index, (name, module) in enumerate(level):
        params = module.parameters(recurse=not name.endswith(":own"))
        for p in params:
            report_of_param.setdefault(id(p), index)

    table = parameter_table(model, expect_trainable)
    frozen_expected = [
        n for n, p in named if not p.requires_grad and any(matches(n, e) for e in expect_trainable or ())
    ]
    sites = dict(freeze_sites or {})
    missing = [n for n in frozen_expected if n not in sites]
    if missing:
        sites.update(static_freeze_sites(model, missing, classifier))
    findings: list[Finding] = check_expectations(model, expect_trainable, sites)

    batch_names = {id(t): key for key, t in _named_batch_tensors(batch)}
    trace = ForwardTrace(
        model, classifier, set(trainable), {id(m) for _, m in level}, measure_saved=measure_saved
    )
    output: Any = None
    run_error: Optional[RunError] = None
    loss: Optional[torch.Tensor] = None
    loss_info = LossInfo()
    forward_fn = forward or (lambda m, b: run_forward(m, b))
    with torch.inference_mode(False), torch.enable_grad():
        try:
            with trace:
                output = forward_fn(model, batch)
        except Exception as exc:  # the model's own failure is data for the diagnosis
            run_error = _run_error("forward", exc, classifier)
    forward_done = time.perf_counter()
    if run_error is None:
        try:
            loss, source = extract_loss(output)
            loss_info = LossInfo(
                requires_grad=loss.requires_grad,
                grad_fn=type(loss.grad_fn).__name__ if loss.grad_fn is not None else None,
                value=_scalar(loss),
                source=source,
            )
        except LossNotFoundError as exc:
            run_error = RunError("loss", type(exc).__name__, str(exc))
    graph = walk_graph(loss.grad_fn if loss is not None else None)
    ctx = _Context(model, classifier, names, trainable, owner, report_names, report_of_param, trace, graph, batch_names)

    autograd_dot = _autograd_dot(loss, model) if full_graph and loss is not None else None

    # ---------------------------------------------------------------- backward
    got_grad: Optional[set[int]] = None
    grad_values: dict[int, torch.Tensor] = {}
    backward_ran = False
    mode = {True: "backward", False: "none"}.get(backward, backward)  # type: ignore[call-overload]
    if mode not in ("backward", "autograd_grad", "none"):
        raise ValueError(f"backward={backward!r}: use True/'backward', 'autograd_grad' or False/'none'.")
    # Reentrant checkpointing cannot run under autograd.grad(inputs=...): answer from the graph there.
    if mode == "autograd_grad" and loss is not None and loss.requires_grad and not graph.checkpoint_nodes:
        leaves = [p for _, p in named if p.requires_grad]
        leaves += [v for k, v in graph.reached.items() if k not in names and v.requires_grad]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            backward_ran = True
            grad_values = {id(p): g for p, g in zip(leaves, grads) if g is not None}
            got_grad = {pid for pid in grad_values if pid in trainable}
        except Exception as exc:
            run_error = _run_error("backward", exc, classifier)
    elif mode == "backward" and loss is not None and loss.requires_grad:
        extra_leaves = [v for k, v in graph.reached.items() if k not in names]
        everyone = [p for _, p in named] + extra_leaves
        saved = [(p, p.grad) for p in everyone]
        for p in everyone:
            p.grad = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                loss.backward()
            backward_ran = True
            got_grad = {id(p) for p in everyone if p.requires_grad and p.grad is not None}
            grad_values = {id(p): p.grad for p in everyone if p.grad is not None}
        except Exception as exc:
            run_error = _run_error("backward", exc, classifier)
        finally:
            for p, grad in saved:
                p.grad = grad
    backward_done = time.perf_counter()

    # ---------------------------------------------------------------- findings
    if run_error is not None and run_error.stage == "forward":
        findings.extend(_explain_forward_error(ctx, run_error))
    if loss is not None:
        findings.extend(_check_loss_value(loss, batch, grad_values, ctx))
    findings.extend(_unregistered(ctx))
    reached_or_grad = got_grad if got_grad is not None else set(graph.reached)
    missing_ids = [
        pid for pid in trainable
        if pid not in reached_or_grad
    ]
    if trainable and (loss is not None or (run_error is not None and run_error.stage == "forward")):
        findings.extend(_explain_missing(ctx, missing_ids, run_error))
    if backward_ran:
        findings.extend(_check_grad_values(ctx, grad_values, loss))
    wasted = _wasted_tracking(ctx)
    findings.extend(wasted.findings)
    findings = _dedupe(findings)
    if run_error is not None and run_error.stage == "forward":
        run_error.explained = any(f.extra.get("explains_error") for f in findings)

    modules, paths, edges = _module_states(ctx, level, loss, got_grad, wasted.bytes_by_report, findings)
    report = Report(
        model_name=type(model).__name__,
        loss=loss_info,
        params=table,
        findings=findings,
        modules=modules,
        paths=paths,
        edges=edges,
        error=run_error,
        warnings=[f"{w.category.__name__}: {w.message}" for w in trace.warnings][:20],
        autograd_dot=autograd_dot,
    )
    if lint:
        from .lint import lint_for_report

        report.lint = lint_for_report(model, findings, classifier)
    report.stats = {
        "forward_s": round(forward_done - started, 4),
        "backward_s": round(backward_done - forward_done, 4),
        "total_s": round(time.perf_counter() - started, 4),
        "graph_nodes": graph.node_count,
        "module_calls": len(trace.calls),
    }
    trace.release()
    return report


# ====================================================================== helpers


def _scalar(loss: torch.Tensor) -> Optional[float]:
    try:
        return float(loss.detach().float().item())
    except Exception:
        return None


def _named_batch_tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [(f"batch[{i}]", v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]
    if isinstance(batch, torch.Tensor):
        return [("batch", batch)]
    return []


def _run_error(stage: str, exc: BaseException, classifier: CodeClassifier) -> RunError:
    file = line = None
    library = None
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        kind = classifier.kind(frame.f_code.co_filename)
        if kind == "user":
            file, line = display_path(frame.f_code.co_filename), lineno
            break
        if kind == "library" and library is None:
            library = (display_path(frame.f_code.co_filename), lineno)
    if file is None and library is not None:
        file, line = library
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RunError(stage, type(exc).__name__, message, False, file, line)


def _autograd_dot(loss: torch.Tensor, model: nn.Module) -> Optional[str]:
    if loss.grad_fn is None:
        return None
    try:
        from torchviz import make_dot
    except ImportError:
        return None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return make_dot(loss, params=params).source


def _report_module(ctx: _Context, pids: Sequence[int]) -> Optional[str]:
    for pid in pids:
        index = ctx.report_of_param.get(pid)
        if index is not None:
            return ctx.report_names[index].removesuffix(":own")
    return None


def _loc_fields(location: Optional[SourceLocation]) -> tuple[Optional[str], Optional[int]]:
    if location is None:
        return None, None
    return display_path(location.file), location.line


def _site_json(location: Optional[SourceLocation]) -> Optional[dict[str, Any]]:
    if location is None:
        return None
    return {"file": display_path(location.file), "line": location.line, "code": location.code}


# --------------------------------------------------------------- grad disabled


def _describe_disable(info: DisableInfo, module: str) -> tuple[str, str, Optional[SourceLocation], dict[str, Any]]:
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
        extra["call_site"] = _site_json(info.user_call_site)
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


def _checkpoint_finding(ctx: _Context, info: DisableInfo, pids: list[int], module: Optional[str], inner: str) -> Finding:
    checkpoint = info.checkpoint
    assert checkpoint is not None
    names = [ctx.names.get(p, "?") for p in pids]
    where = checkpoint.call_site.display() if checkpoint.call_site else "an unknown place"
    user = ""
    if checkpoint.user_call_site and checkpoint.call_site and checkpoint.user_call_site != checkpoint.call_site:
        user = f" (reached from your code at {checkpoint.user_call_site.display()})"
    file, line = _loc_fields(checkpoint.call_site)
    return Finding(
        ERROR,
        REENTRANT_CHECKPOINT,
        f"{format_params(names)} get no gradient: {inner}{' (and the like)' if len(names) > 4 else ''} "
        "runs inside torch.utils.checkpoint with "
        f"use_reentrant=True, called at {where}{user}, and none of the checkpoint's inputs "
        "requires grad — its output has no grad_fn, so the parameters inside are never reached. "
        "Pass use_reentrant=False (HF: `gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        "{'use_reentrant': False})`), or make an input require grad "
        "(`model.enable_input_require_grads()`).",
        module=module,
        params=names,
        file=file,
        line=line,
        extra={"checkpoint_call_site": _site_json(checkpoint.call_site)},
    )


def _grad_disabled_finding(
    ctx: _Context, info: DisableInfo, pids: list[int], module: Optional[str], culprit: str
) -> Finding:
    names = [ctx.names.get(p, "?") for p in pids]
    subject = module or culprit
    what, fix, location, extra = _describe_disable(info, culprit)
    if culprit == subject or subject is None or culprit.startswith(subject + "."):
        body = f"{subject} ran with grad disabled by {what}"
    else:
        body = (
            f"{culprit} ran with grad disabled by {what}; {culprit} must carry gradient back to "
            f"{subject} (its own parameters may stay frozen)"
        )
    file, line = _loc_fields(location)
    extra["culprit_module"] = culprit
    verb = "gets" if len(names) == 1 else "get"
    return Finding(
        ERROR,
        GRAD_DISABLED,
        f"{format_params(names)} {verb} no gradient: {body} — {fix}.",
        module=subject,
        params=names,
        file=file,
        line=line,
        extra=extra,
    )


# --------------------------------------------------------------- explanations


def _explain_missing(ctx: _Context, missing: list[int], run_error: Optional[RunError]) -> list[Finding]:
    """One finding per (cause, site) for trainable params that get no gradient."""
    if not missing:
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

    # Resolve each owner to (key, builder); owners with the same key share one finding.
    resolved: dict[tuple[Any, ...], tuple[Callable[[list[int]], Finding], list[int]]] = {}

    def add(key: tuple[Any, ...], builder: Callable[[list[int]], Finding], pids: list[int]) -> None:
        if key in resolved:
            resolved[key][1].extend(pids)
        else:
            resolved[key] = (builder, list(pids))

    for owner_id, pids in by_owner.items():
        owner_name = ctx.owner.get(pids[0], ("?", -1))[0]
        module = _report_module(ctx, pids)
        calls = calls_by_module.get(owner_id, [])

        # (a) the owner ran with grad disabled: find the transition above it.
        off = [c for c in calls if not c.grad_enabled or c.inference_mode]
        if calls and len(off) == len(calls):
            transition = trace.transition_of(off[0].index)
            if transition is not None and transition.disable is not None:
                info = transition.disable
                name = transition.name
                if info.checkpoint is not None:
                    if not info.checkpoint.inputs_require_grad:
                        add(
                            ("ckpt", module, info.checkpoint.call_site),
                            lambda ps, info=info, module=module, name=name: _checkpoint_finding(ctx, info, ps, module, name),
                            pids,
                        )
                        continue
                else:
                    add(
                        ("off", module, name, info.site),
                        lambda ps, info=info, module=module, name=name: _grad_disabled_finding(ctx, info, ps, module, name),
                        pids,
                    )
                    continue
        # (b) an op cut the gradient downstream (detach, or a consumer under no_grad).
        bit = owner_bits[owner_id]
        event = next(
            (e for e, m in zip(trace.events, event_masks) if m & bit and not _benign(ctx, e)),
            None,
        )
        if event is not None:
            add(
                ("event", module, id(event)),
                lambda ps, event=event, module=module, owner_name=owner_name: _event_finding(ctx, event, ps, module, owner_name),
                pids,
            )
            continue
        # (c) the forward raised before/while the module could take part.
        if run_error is not None:
            continue  # the run error (or its explanation) covers these parameters
        # (d) it never ran, or ran without reaching the loss.
        if not calls:
            add(("never", module or owner_name), lambda ps, owner_name=owner_name, module=module: _unused(
                ctx, ps, module,
                f"{module or owner_name} never ran during this forward. If that depends on the batch (e.g. no "
                "history to compress, no image), the batch trains nothing there — skip such batches "
                "explicitly or make sure the module runs; diagnose several batches (`--batches N`)",
            ), pids)
            continue
        reached_out = any(node in ctx.graph.depth for c in calls for node in c.output_nodes)
        if reached_out:
            add(("unused-inside", owner_name), lambda ps, owner_name=owner_name, module=module: _unused(
                ctx, ps, module,
                f"{owner_name} ran and its output reaches the loss, but its forward does not use "
                f"{format_params([ctx.names.get(p, '?') for p in ps])} — remove the unused parameters or use them",
            ), pids)
        else:
            add(("unreached", module), lambda ps, module=module: _unused(
                ctx, ps, module,
                f"{module} ran with grad enabled but its output never reaches the loss (it is "
                "discarded, overwritten, or replaced by a copy) — make sure the output is what "
                "the loss is computed from",
            ), pids)
    return [builder(pids) for builder, pids in resolved.values()]


def _unused(ctx: _Context, pids: list[int], module: Optional[str], text: str) -> Finding:
    names = [ctx.names.get(p, "?") for p in pids]
    verb = "gets" if len(names) == 1 else "get"
    return Finding(
        ERROR, UNUSED_PARAM, f"{format_params(names)} {verb} no gradient: {text}.", module=module, params=names
    )


def _benign(ctx: _Context, event: Any) -> bool:
    """Grad-disabled ops inside a reentrant checkpoint whose inputs require grad are fine."""
    if event.kind != "grad_disabled":
        return False
    info = event.disable
    if info is not None and info.checkpoint is not None and info.checkpoint.inputs_require_grad:
        return True
    if event.call_index is not None:
        transition = ctx.trace.transition_of(event.call_index)
        if transition is not None and transition.disable is not None:
            checkpoint = transition.disable.checkpoint
            if checkpoint is not None and checkpoint.inputs_require_grad:
                return True
    return False


def _event_finding(ctx: _Context, event: Any, pids: list[int], module: Optional[str], owner_name: str) -> Finding:
    names = [ctx.names.get(p, "?") for p in pids]
    verb = "gets" if len(names) == 1 else "get"
    subject = module or owner_name
    if event.kind == "grad_disabled":
        info = event.disable
        culprit = subject
        if event.call_index is not None:
            transition = ctx.trace.transition_of(event.call_index)
            if transition is not None and transition.disable is not None:
                info = transition.disable
                culprit = transition.name
        if info is not None and info.checkpoint is not None:
            return _checkpoint_finding(ctx, info, pids, module, culprit)
        if info is None or info.site is None:
            loc = event.location
            info = DisableInfo(site=None)
            what = f"grad was disabled when `{event.op}` consumed its output at {loc.display() if loc else '?'}"
            file, line = _loc_fields(loc)
            return Finding(
                ERROR, GRAD_DISABLED,
                f"{format_params(names)} {verb} no gradient: {what} — run that code with grad enabled.",
                module=subject, params=names, file=file, line=line,
            )
        return _grad_disabled_finding(ctx, info, pids, module, culprit)
    # detached
    loc = event.location
    code = loc.code if loc else None
    how = event.op
    if code and ".numpy(" in code:
        how = f"a numpy round-trip ({event.op})"
    elif event.op in (".tolist()", ".item()"):
        how = f"a Python round-trip ({event.op})"
    file, line = _loc_fields(loc)
    where = f"{loc.display()}" + (f" `{code}`" if code else "") if loc else "an unknown place"
    fix = "keep the tensor in the graph (drop the detach/re-wrap)"
    if event.op == ".data":
        fix = "use the tensor itself, not `.data` (which bypasses autograd)"
    return Finding(
        ERROR,
        DETACHED,
        f"{format_params(names)} {verb} no gradient: the output of {subject} is cut from the graph by "
        f"{how} at {where} — {fix}.",
        module=subject,
        params=names,
        file=file,
        line=line,
        extra={"op": event.op},
    )


def _explain_forward_error(ctx: _Context, run_error: RunError) -> list[Finding]:
    """Findings that explain an exception raised by the forward (inference tensors...)."""
    trace = ctx.trace
    failed = trace.failed_op
    message = run_error.message
    inference = "Inference tensors" in message or (failed is not None and failed.inference_inputs)
    if not inference:
        return []
    # Who produced inference tensors: a module whose own forward turned inference mode
    # on (decorator/with), or a grad-disabled region entered in inference mode.
    producer: Optional[ModuleCall] = next(
        (c for c in trace.calls if c.inner_disable is not None and c.inner_disable.site is not None), None
    )
    info: Optional[DisableInfo] = producer.inner_disable if producer else None
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
            index = _report_index_of_module(ctx, consumer.name)
        if index is not None:
            pids = [p for p in ctx.trainable if ctx.report_of_param.get(p) == index]
            consumer_name = ctx.report_names[index].removesuffix(":own")
    names = [ctx.names.get(p, "?") for p in pids]
    module = _report_module(ctx, pids) or consumer_name
    failing_at = f" at {failed.location.display()}" if failed and failed.location else ""
    if info is not None and producer is not None:
        what, fix, location, extra = _describe_disable(info, module)
        file, line = _loc_fields(location)
        extra["explains_error"] = True
        extra["culprit_module"] = producer.name
        text = (
            f"{consumer_name} received inference tensors from {producer.name}, whose forward runs under "
            f"{what}; autograd cannot save them for backward, so the forward raised "
            f"\"{message[:90]}\"{failing_at}. {fix[0].upper() + fix[1:]}."
        )
        subject = f"{format_params(names)} cannot get gradient: " if names else ""
        return [Finding(ERROR, GRAD_DISABLED, subject + text, module=module, params=names, file=file, line=line, extra=extra)]
    file, line = _loc_fields(failed.location if failed else None)
    return [
        Finding(
            ERROR,
            GRAD_DISABLED,
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


def _unregistered(ctx: _Context) -> list[Finding]:
    """Trainable parameters used by the forward that the model does not own."""
    findings = []
    seen: set[int] = set()
    calls_by_name: dict[str, ModuleCall] = {}
    for call in ctx.trace.calls:
        if not call.registered:
            calls_by_name.setdefault(call.name, call)
    reported_modules: set[str] = set()
    for name, call in calls_by_name.items():
        if not call.trainable_param_ids:
            continue
        parent = ctx.trace.calls[call.parent] if call.parent is not None else None
        if parent is not None and not parent.registered:
            continue  # report the outermost unregistered module only
        seen.update(call.trainable_param_ids)
        reported_modules.add(name)
        file, line = _loc_fields(call.call_site)
        owner = parent.name if parent is not None else "the model"
        held = _holder_name(ctx, parent, call)
        if held:
            name = f"{held} ({name.strip('<>')})"
        findings.append(
            Finding(
                ERROR,
                NOT_TRAINABLE,
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
                NOT_TRAINABLE,
                f"{len(stray)} trainable parameter(s) of shape {shapes} receive gradient but are not "
                "registered in the model (not in model.parameters()): the optimizer never sees them — "
                "register them as attributes or in nn.ParameterList / nn.ModuleList.",
                extra={"unregistered": True},
            )
        )
    return findings


def _holder_name(ctx: _Context, parent: Optional[ModuleCall], call: ModuleCall) -> Optional[str]:
    """``projectors[0]`` when the unregistered module sits in a plain list/dict attribute."""
    module = call.module_ref() if call.module_ref is not None else None
    if module is None or parent is None:
        return None
    owner = next((m for m in ctx.model.modules() if id(m) == parent.module_id), None)
    if owner is None:
        return None
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


# --------------------------------------------------------------- values


def _all_labels_ignored(batch: Any) -> Optional[str]:
    for key, tensor in _named_batch_tensors(batch):
        if "label" in key.lower() and not tensor.is_floating_point() and tensor.numel() > 0:
            if bool((tensor == -100).all()):
                return key
    return None


def _check_loss_value(loss: torch.Tensor, batch: Any, grads: dict[int, torch.Tensor], ctx: _Context) -> list[Finding]:
    value = _scalar(loss)
    if value is None or math.isfinite(value):
        return []
    key = _all_labels_ignored(batch)
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
            NAN_LOSS,
            f"the loss is {value}: {why}; every gradient will be NaN — {fix}.",
            extra={"value": str(value), "labels_key": key},
        )
    ]


def _check_grad_values(ctx: _Context, grads: dict[int, torch.Tensor], loss: Optional[torch.Tensor]) -> list[Finding]:
    findings: list[Finding] = []
    non_finite, zero = [], []
    for pid, p in ctx.trainable.items():
        grad = grads.get(pid)
        if grad is None:
            continue
        g = grad.detach()
        if not bool(torch.isfinite(g).all()):
            non_finite.append(ctx.names[pid])
        elif not bool(g.any()):
            zero.append(ctx.names[pid])
    loss_finite = loss is not None and _scalar(loss) is not None and math.isfinite(_scalar(loss) or 0.0)
    if non_finite and loss_finite:
        findings.append(
            Finding(
                ERROR,
                NAN_LOSS,
                f"{format_params(non_finite)} got non-finite gradients although the loss is finite — "
                "look for overflow (fp16), log/sqrt of 0, or division by zero in the forward.",
                module=_report_module(ctx, [pid for pid in ctx.trainable if ctx.names[pid] in non_finite]),
                params=non_finite,
            )
        )
    if zero:
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
        findings.append(
            Finding(
                severity,
                UNUSED_PARAM,
                f"{format_params(zero)} got an all-zero gradient: {why}.",
                module=_report_module(ctx, [pid for pid in ctx.trainable if ctx.names[pid] in zero]),
                params=zero,
            )
        )
    return findings


# --------------------------------------------------------------- waste


@dataclass
class _Waste:
    findings: list[Finding]
    bytes_by_report: dict[str, int]


def _wasted_tracking(ctx: _Context) -> _Waste:
    """Frozen module calls tracked by autograd with nothing trainable upstream."""
    trace = ctx.trace
    calls = trace.calls
    if not calls:
        return _Waste([], {})
    modules = {id(m): m for m in ctx.model.modules()}
    frozen_cache: dict[int, bool] = {}

    def frozen(call: ModuleCall) -> bool:
        cached = frozen_cache.get(call.module_id)
        if cached is None:
            module = modules.get(call.module_id)
            if module is None:  # unregistered: look at what the call recorded
                cached = not call.trainable_param_ids
            else:
                cached = not any(p.requires_grad for p in module.parameters())
            frozen_cache[call.module_id] = cached
        return cached

    total_bytes = [c.saved_bytes for c in calls]
    for call in reversed(calls):
        if call.parent is not None:
            total_bytes[call.parent] += total_bytes[call.index]
    trainable_memo = ReachMemo(
        lambda v: 1 if v.requires_grad and (id(v) in ctx.trainable or isinstance(v, nn.Parameter)) else 0,
        checkpoint_mask=1 if _checkpointed_report_bits(ctx) else 0,
    )
    # Name the input that made the frozen module tracked: batch tensors or tensors
    # switched to requires_grad during the forward.
    leaves: list[tuple[str, Optional[SourceLocation]]] = []
    leaf_bits: dict[int, int] = {}
    for tensor, location in trace.requires_grad_sites:
        if id(tensor) not in leaf_bits:
            leaf_bits[id(tensor)] = 1 << len(leaves)
            leaves.append((ctx.batch_names.get(id(tensor), "a tensor"), location))
    for tid, key in ctx.batch_names.items():
        if tid not in leaf_bits:
            leaf_bits[tid] = 1 << len(leaves)
            leaves.append((key, None))
    leaf_memo = ReachMemo(lambda v: leaf_bits.get(id(v), 0))

    wasted = [False] * len(calls)
    for call in calls:
        if not call.inputs_tracked or not frozen(call) or total_bytes[call.index] <= 0:
            continue
        if any(trainable_memo.of(s) for s in call.input_sources):
            continue
        wasted[call.index] = True
    totals: dict[str, list[Any]] = {}
    for call in calls:
        if not wasted[call.index]:
            continue
        if call.parent is not None and wasted[call.parent]:
            continue
        entry = totals.setdefault(call.name, [0, 0, 0, call])
        entry[0] += total_bytes[call.index]
        entry[1] += 1
        for source in call.input_sources:
            entry[2] |= leaf_memo.of(source)
    findings = []
    by_report: dict[str, int] = {}
    for name, (nbytes, count, leaf_mask, call) in totals.items():
        culprits = [leaves[i] for i in range(len(leaves)) if leaf_mask >> i & 1]
        known = [f"`{n}`" for n, _ in culprits if n != "a tensor"]
        inputs = (", ".join(known) + (" requires" if len(known) == 1 else " require")) if known else "its input requires"
        site = next((loc for _, loc in culprits if loc is not None), None)
        where = f" (made to require grad at {site.display()})" if site else ""
        location = site or call.call_site
        file, line = _loc_fields(location)
        times = f" over {count} calls" if count > 1 else ""
        findings.append(
            Finding(
                WARNING,
                WASTED_TRACKING,
                f"{name} is frozen but autograd tracked it because {inputs} grad{where}, although "
                f"no trainable parameter lies upstream of it: {format_bytes(nbytes)} ({nbytes:,} bytes) saved "
                f"for backward{times} for nothing — do not set requires_grad on its inputs, run it under "
                "torch.no_grad(), or detach what enters it.",
                module=name,
                file=file,
                line=line,
                extra={"bytes": nbytes, "calls": count},
            )
        )
        report_name = _report_name_of_module(ctx, name)
        if report_name:
            by_report[report_name] = by_report.get(report_name, 0) + nbytes
    return _Waste(findings, by_report)


def _report_index_of_module(ctx: _Context, module_name: str) -> Optional[int]:
    best: Optional[int] = None
    for i, name in enumerate(ctx.report_names):
        base = name.removesuffix(":own")
        if module_name == base or module_name.startswith(base + "."):
            if best is None or len(base) > len(ctx.report_names[best]):
                best = i
    return best


def _report_name_of_module(ctx: _Context, module_name: str) -> Optional[str]:
    best = None
    for name in ctx.report_names:
        base = name.removesuffix(":own")
        if module_name == base or module_name.startswith(base + ".") or base in ("(root)", ""):
            if best is None or len(base) > len(best):
                best = base
    return best


# --------------------------------------------------------------- module view


def _module_states(
    ctx: _Context,
    level: list[tuple[str, nn.Module]],
    loss: Optional[torch.Tensor],
    got_grad: Optional[set[int]],
    wasted_bytes: dict[str, int],
    findings: list[Finding],
) -> tuple[list[ModuleState], list[str], list[Edge]]:
    trace = ctx.trace
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

    memo = ReachMemo(leaf, node_bits, checkpoint_mask=_checkpointed_report_bits(ctx))
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


def _checkpointed_report_bits(ctx: _Context) -> int:
    """Bits of report modules whose trainable params ran inside a reentrant checkpoint with grad inputs."""
    trace = ctx.trace
    mask = 0
    for call in trace.calls:
        if not call.trainable_param_ids or call.grad_enabled:
            continue
        transition = trace.transition_of(call.index)
        if transition is None or transition.disable is None:
            continue
        checkpoint = transition.disable.checkpoint
        if checkpoint is not None and checkpoint.inputs_require_grad:
            for pid in call.trainable_param_ids:
                index = ctx.report_of_param.get(pid)
                if index is not None:
                    mask |= 1 << index
    return mask


def _children(node: Any) -> list[Any]:
    try:
        return [n for n, _ in node.next_functions if n is not None]
    except (AttributeError, RuntimeError):
        return []


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """Drop exact repeats (same key and parameters)."""
    out: list[Finding] = []
    seen: set[tuple[Any, ...]] = set()
    for finding in findings:
        key = finding.key()
        if key in seen:
            continue
        seen.add(key)
        out.append(finding)
    return out


__all__ = ["diagnose", "extract_loss", "move_batch", "run_forward"]
