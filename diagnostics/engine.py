"""``diagnose(model, batch)``: find where gradient stops, and why, for any ``nn.Module``.

The steps, in the order :func:`diagnose` runs them (see ``DESIGN.md``, "Diagnostics engine"):

1. count parameters and check ``expect_trainable`` (:mod:`diagnostics.params`);
2. run the forward under :class:`~diagnostics.trace.ForwardTrace`;
3. walk ``loss.grad_fn`` to the ``AccumulateGrad`` nodes it reaches (:mod:`diagnostics.graph`);
4. run ``loss.backward()`` and keep the gradients (every ``.grad`` restored after) — or, with
   ``backward="autograd_grad"``, get them from ``torch.autograd.grad`` without touching ``.grad``
   or firing the post-accumulate hooks distributed engines reduce from; ``backward=False``:
   graph only;
5. blame a mechanism for every trainable parameter without gradient (:mod:`diagnostics.blame`);
6. run every cause's check (:mod:`diagnostics.causes`, one module per cause);
7. build the module view (:mod:`diagnostics.module_view`) and the report.

The model is left as it was: hooks removed, ``.grad`` restored, ``requires_grad``
untouched, train/eval mode untouched.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .blame import attribute_missing
from .causes import CHECKS, Finding, not_trainable
from .causes.grad_disabled import observe_caller
from .causes.nan_loss import scalar
from .context import DiagnosisContext, named_batch_tensors
from .errors import LossNotFoundError
from .freeze import script_freeze_sites, static_freeze_sites
from .graph import walk_graph
from .module_view import module_states
from .params import check_expectations, matches, parameter_table, report_level_modules
from .report import LossInfo, Report, RunError
from .source import CodeClassifier, SourceLocation, display_path, iter_frames, user_source_files
from .trace import ForwardTrace

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
    caller = observe_caller(classifier, sys._getframe(1), model)
    level = report_level_modules(model)
    ctx = DiagnosisContext.for_model(model, classifier, level)
    ctx.batch = batch
    ctx.caller = caller
    ctx.batch_names = {id(t): key for key, t in named_batch_tensors(batch)}

    # 1. parameters and expectations
    table = parameter_table(model, expect_trainable)
    sites, guessed = _freeze_sites(ctx, expect_trainable, freeze_sites)
    findings: list[Finding] = check_expectations(model, expect_trainable, sites, guessed)

    # 2. the forward, traced
    trace = ForwardTrace(
        model, classifier, set(ctx.trainable), {id(m) for _, m in level}, measure_saved=measure_saved
    )
    ctx.trace = trace
    output: Any = None
    forward_fn = forward or (lambda m, b: run_forward(m, b))
    # In the caller's own grad mode (a step run with grad off is the bug to report, not
    # to fix); the block restores the mode on exit whatever the forward switched.
    with torch.set_grad_enabled(caller.grad_enabled):
        try:
            with trace:
                output = forward_fn(model, batch)
        except Exception as exc:  # the model's own failure is data for the diagnosis
            ctx.run_error = _run_error("forward", exc, classifier)
    forward_done = time.perf_counter()
    loss_info = LossInfo()
    if ctx.run_error is None:
        try:
            ctx.loss, source = extract_loss(output)
            loss_info = LossInfo(
                requires_grad=ctx.loss.requires_grad,
                grad_fn=type(ctx.loss.grad_fn).__name__ if ctx.loss.grad_fn is not None else None,
                value=scalar(ctx.loss),
                source=source,
            )
        except LossNotFoundError as exc:
            ctx.run_error = RunError("loss", type(exc).__name__, str(exc))

    # 3. the graph behind the loss
    ctx.graph = walk_graph(ctx.loss.grad_fn if ctx.loss is not None else None)
    autograd_dot = _autograd_dot(ctx.loss, model) if full_graph and ctx.loss is not None else None

    # 4. the backward
    mode = {True: "backward", False: "none"}.get(backward, backward)  # type: ignore[call-overload]
    if mode not in ("backward", "autograd_grad", "none"):
        raise ValueError(f"backward={backward!r}: use True/'backward', 'autograd_grad' or False/'none'.")
    if mode != "none" and ctx.loss is not None and ctx.loss.requires_grad:
        # Reentrant checkpointing cannot run under autograd.grad(inputs=...): graph only there.
        if mode == "backward":
            _run_backward(ctx)
        elif not ctx.graph.checkpoint_nodes:
            _grad_without_accumulating(ctx)
    backward_done = time.perf_counter()

    # 5. blame, 6. every cause's check
    forward_failed = ctx.run_error is not None and ctx.run_error.stage == "forward"
    reached = ctx.got_grad if ctx.got_grad is not None else set(ctx.graph.reached)
    if ctx.loss is not None or forward_failed:
        ctx.blames = attribute_missing(ctx, [pid for pid in ctx.trainable if pid not in reached])
    for check in CHECKS:
        findings.extend(check(ctx))
    findings = _dedupe(findings)
    if forward_failed:
        ctx.run_error.explained = any(f.extra.get("explains_error") for f in findings)  # type: ignore[union-attr]

    # 7. the module view and the report
    modules, paths, edges = module_states(ctx, level, findings)
    report = Report(
        model_name=type(model).__name__,
        loss=loss_info,
        params=table,
        findings=findings,
        modules=modules,
        paths=paths,
        edges=edges,
        error=ctx.run_error,
        warnings=[f"{w.category.__name__}: {w.message}" for w in trace.warnings][:20],
        autograd_dot=autograd_dot,
    )
    if lint:
        report.lint = _lint(model, findings, classifier)
    report.stats = {
        "forward_s": round(forward_done - started, 4),
        "backward_s": round(backward_done - forward_done, 4),
        "total_s": round(time.perf_counter() - started, 4),
        "graph_nodes": ctx.graph.node_count,
        "module_calls": len(trace.calls),
    }
    trace.release()
    return report


# ====================================================================== steps


def _freeze_sites(
    ctx: DiagnosisContext,
    expect_trainable: Optional[Sequence[str]],
    given: Optional[dict[str, SourceLocation]],
) -> tuple[dict[str, SourceLocation], dict[str, SourceLocation]]:
    """Where each frozen-but-expected parameter was frozen, ``(sites, guessed)``.

    In order: ``given`` (a FreezeWatch), a static scan of the model's own classes, a
    statement of the user's scripts whose written path covers the parameter, PEFT's
    ``get_peft_model(...)`` call; ``guessed`` (the message says so): for the rest, a freezing
    statement of the user's scripts whose target is not written out, or a whole-model freeze.
    """
    sites = dict(given or {})
    frozen_expected = [
        name for pid, name in ctx.names.items()
        if pid not in ctx.trainable and any(matches(name, e) for e in expect_trainable or ())
    ]
    missing = [n for n in frozen_expected if n not in sites]
    guessed: dict[str, SourceLocation] = {}
    if missing:
        sites.update(static_freeze_sites(ctx.model, missing, ctx.classifier))
        missing = [n for n in missing if n not in sites]
    if missing:
        # A stock model frozen by the user's own functions: the statements of the files on the stack first.
        frames = [f for f in iter_frames(sys._getframe(1)) if ctx.classifier.kind(f.f_code.co_filename) == "user"]
        files = user_source_files(ctx.classifier, frames)
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        near = [f for f in files if f == main or any(f == fr.f_code.co_filename for fr in frames)]
        sure, guessed = script_freeze_sites(missing, near, [f for f in files if f not in near])
        sites.update(sure)
        missing = [n for n in missing if n not in sites]
    if missing and not_trainable.is_peft(ctx.model):
        # Frozen by the library: the user's statement is the get_peft_model(...) call.
        site = not_trainable.peft_freeze_site(ctx.classifier)
        if site is not None:
            sites.update({n: site for n in missing})
    guessed = {n: loc for n, loc in guessed.items() if n not in sites}
    return sites, guessed


def _run_backward(ctx: DiagnosisContext) -> None:
    """``loss.backward()`` with every ``.grad`` saved and restored; gradients kept in ``ctx``."""
    assert ctx.loss is not None
    extra_leaves = [v for k, v in ctx.graph.reached.items() if k not in ctx.names]
    everyone = list(ctx.params.values()) + extra_leaves
    saved = [(p, p.grad) for p in everyone]
    for p in everyone:
        p.grad = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            ctx.loss.backward()
        ctx.backward_ran = True
        ctx.got_grad = {id(p) for p in everyone if p.requires_grad and p.grad is not None}
        ctx.grad_values = {id(p): p.grad for p in everyone if p.grad is not None}
    except Exception as exc:
        ctx.run_error = _run_error("backward", exc, ctx.classifier)
    finally:
        for p, grad in saved:
            p.grad = grad


#: (model classes, finding lines, user roots) -> (file mtimes, lint findings); see :func:`_lint`.
_LINT_CACHE: dict[tuple[Any, ...], tuple[tuple[tuple[str, float], ...], list[Any]]] = {}


def _lint(model: nn.Module, findings: list[Finding], classifier: CodeClassifier) -> list[Any]:
    """:func:`diagnostics.lint.lint_for_report`, memoised while the files involved are unchanged.

    A training loop diagnoses the same model every N steps: the source does not change
    between calls, and re-locating and re-walking it was a tenth of the diagnosis.
    """
    from .lint import lint_for_report

    classes = frozenset(type(m) for m in model.modules())
    key = (classes, tuple((f.file, f.line) for f in findings), classifier.user_roots)
    files = {getattr(sys.modules.get(k.__module__), "__file__", None) for k in classes}
    files.update(f.file for f in findings if f.file)
    mtimes = []
    for name in sorted(f for f in files if isinstance(f, str)):
        try:
            mtimes.append((name, os.stat(name).st_mtime))
        except OSError:
            mtimes.append((name, -1.0))
    stamp = tuple(mtimes)
    cached = _LINT_CACHE.get(key)
    if cached is not None and cached[0] == stamp:
        return list(cached[1])
    result = lint_for_report(model, findings, classifier)
    if len(_LINT_CACHE) > 32:
        _LINT_CACHE.clear()
    _LINT_CACHE[key] = (stamp, list(result))
    return result


def _grad_without_accumulating(ctx: DiagnosisContext) -> None:
    """The gradients from ``torch.autograd.grad``: ``AccumulateGrad`` never runs, so no ``.grad``
    is written and no post-accumulate hook fires (DDP's reducer, DeepSpeed ZeRO's reduction)."""
    assert ctx.loss is not None
    leaves = [p for p in ctx.params.values() if p.requires_grad]
    leaves += [v for k, v in ctx.graph.reached.items() if k not in ctx.names and v.requires_grad]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            grads = torch.autograd.grad(ctx.loss, leaves, allow_unused=True)
        ctx.backward_ran = True
        ctx.grad_values = {id(p): g for p, g in zip(leaves, grads) if g is not None}
        ctx.got_grad = {pid for pid in ctx.grad_values if pid in ctx.trainable}
    except Exception as exc:
        ctx.run_error = _run_error("backward", exc, ctx.classifier)


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
