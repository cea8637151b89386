"""What one diagnosis knows, shared by every cause's check.

:class:`DiagnosisContext` is built by :func:`diagnostics.engine.diagnose` in stages
(parameter maps before the forward, then the trace, the loss, the graph, the
backward) and handed to each cause module's ``check(ctx)``. It holds lookups, not
conclusions: what a cause concludes is the cause module's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn

from .graph import GraphSummary
from .source import CodeClassifier, SourceLocation

if TYPE_CHECKING:
    from .blame import Blame
    from .report import RunError
    from .trace import DisableInfo, ForwardTrace


def named_batch_tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for the tensors of a batch (mapping keys, ``batch[i]``, or ``batch``)."""
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [(f"batch[{i}]", v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]
    if isinstance(batch, torch.Tensor):
        return [("batch", batch)]
    return []


@dataclass
class CallerGradMode:
    """The grad mode the caller had when the diagnosis (the forward) started.

    Attributes:
        grad_enabled: ``torch.is_grad_enabled()`` on entry.
        inference_mode: ``torch.is_inference_mode_enabled()`` on entry.
        site: where the caller's code switched grad off, when found (an enclosing
            ``with no_grad()``, or an unrestored ``set_grad_enabled(False)``).
        how: how ``site`` was found: ``"enclosing"`` (a ``with`` block or decorator
            around the call), ``"stack"`` (an earlier unrestored switch in a calling
            function), ``"watched"`` (:func:`~diagnostics.freeze.grad_left_off`),
            ``"static"`` (an unrestored switch somewhere in the user's loaded code).
        candidates: other unrestored switches in the user's code (when several).
        entry: the user's frame that called into the diagnosis (or the forward).
    """

    grad_enabled: bool = True
    inference_mode: bool = False
    site: Optional[SourceLocation] = None
    statement: Optional[str] = None
    how: Optional[str] = None
    candidates: list[SourceLocation] = field(default_factory=list)
    entry: Optional[SourceLocation] = None

    @property
    def off(self) -> bool:
        """Autograd could not record anything in the caller's mode."""
        return not self.grad_enabled or self.inference_mode


@dataclass
class DiagnosisContext:
    """Per-diagnosis lookups and results.

    Attributes:
        model: the diagnosed model.
        classifier: user vs library code.
        names: param id -> qualified name.
        params: param id -> parameter (every one, registration order).
        trainable: param id -> parameter, for ``requires_grad=True`` ones.
        owner: param id -> (owning module name, owning module id).
        report_names: report-level module names (``X:own`` for a module's own params).
        report_of_param: param id -> index into ``report_names``.
        batch: the batch as given.
        batch_names: tensor id -> batch key.
        trace: the forward trace (set after the forward).
        graph: the walk from ``loss.grad_fn``.
        loss: the loss tensor, when found.
        run_error: what the forward / loss extraction / backward raised.
        got_grad: param ids that got ``.grad`` in the backward (``None`` if none ran).
        grad_values: param id -> the gradient the backward produced.
        backward_ran: the backward completed.
        blames: why each trainable parameter without gradient got none (:mod:`diagnostics.blame`).
        caller: the caller's grad mode on entry.
        wasted_bytes: report module -> bytes saved for nothing (set by ``wasted_tracking``).
    """

    model: nn.Module
    classifier: CodeClassifier
    names: dict[int, str]
    params: dict[int, nn.Parameter]
    trainable: dict[int, nn.Parameter]
    owner: dict[int, tuple[str, int]]
    report_names: list[str]
    report_of_param: dict[int, int]
    batch: Any = None
    batch_names: dict[int, str] = field(default_factory=dict)
    trace: Optional["ForwardTrace"] = None
    graph: GraphSummary = field(default_factory=GraphSummary)
    loss: Optional[torch.Tensor] = None
    run_error: Optional["RunError"] = None
    got_grad: Optional[set[int]] = None
    grad_values: dict[int, torch.Tensor] = field(default_factory=dict)
    backward_ran: bool = False
    blames: list["Blame"] = field(default_factory=list)
    caller: CallerGradMode = field(default_factory=CallerGradMode)
    wasted_bytes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_model(
        cls, model: nn.Module, classifier: CodeClassifier, level: Sequence[tuple[str, nn.Module]]
    ) -> "DiagnosisContext":
        """Parameter maps of ``model``; ``level`` is :func:`~diagnostics.params.report_level_modules`."""
        names: dict[int, str] = {}
        params: dict[int, nn.Parameter] = {}
        trainable: dict[int, nn.Parameter] = {}
        owner: dict[int, tuple[str, int]] = {}
        # One pass over the modules, reading each one's own parameter dict: cheaper than
        # model.named_parameters() plus module.parameters(recurse=False) per module.
        for module_name, module in model.named_modules():
            for local, p in module._parameters.items():
                if p is None or id(p) in names:
                    continue
                names[id(p)] = f"{module_name}.{local}" if module_name else local
                owner[id(p)] = (module_name or "(root)", id(module))
                params[id(p)] = p
                if p.requires_grad:
                    trainable[id(p)] = p
        report_of_param: dict[int, int] = {}
        for index, (name, module) in enumerate(level):
            for p in module.parameters(recurse=not name.endswith(":own")):
                report_of_param.setdefault(id(p), index)
        return cls(model, classifier, names, params, trainable, owner, [n for n, _ in level], report_of_param)

    # ------------------------------------------------------------------ lookups
    def param_names(self, pids: Sequence[int]) -> list[str]:
        """Qualified names of parameter ids (``?`` for unknown ones)."""
        return [self.names.get(p, "?") for p in pids]

    def report_module(self, pids: Sequence[int]) -> Optional[str]:
        """The report-level module of the first of ``pids`` that has one."""
        for pid in pids:
            index = self.report_of_param.get(pid)
            if index is not None:
                return self.report_names[index].removesuffix(":own")
        return None

    def report_index_of_module(self, module_name: str) -> Optional[int]:
        """Index of the most specific report module containing ``module_name``."""
        best: Optional[int] = None
        for i, name in enumerate(self.report_names):
            base = name.removesuffix(":own")
            if module_name == base or module_name.startswith(base + "."):
                if best is None or len(base) > len(self.report_names[best]):
                    best = i
        return best

    def report_name_of_module(self, module_name: str) -> Optional[str]:
        """Name of the most specific report module containing ``module_name`` (root included)."""
        best = None
        for name in self.report_names:
            base = name.removesuffix(":own")
            if module_name == base or module_name.startswith(base + ".") or base in ("(root)", ""):
                if best is None or len(base) > len(best):
                    best = base
        return best

    def transition_disable(self, call_index: Optional[int]) -> tuple[Optional["DisableInfo"], Optional[str]]:
        """(where grad became disabled, the module entered there) above a module call."""
        if call_index is None or self.trace is None:
            return None, None
        transition = self.trace.transition_of(call_index)
        if transition is None or transition.disable is None:
            return None, None
        return transition.disable, transition.name

    def checkpointed_report_bits(self) -> int:
        """Bits of report modules whose trainable params ran in a reentrant checkpoint with grad inputs.

        Those parameters are hidden from the graph walk (the checkpoint recomputes them
        during backward) but do get gradient.
        """
        trace = self.trace
        mask = 0
        if trace is None:
            return mask
        for call in trace.calls:
            if not call.trainable_param_ids or call.grad_enabled:
                continue
            info, _ = self.transition_disable(call.index)
            checkpoint = info.checkpoint if info is not None else None
            if checkpoint is not None and checkpoint.inputs_require_grad:
                for pid in call.trainable_param_ids:
                    index = self.report_of_param.get(pid)
                    if index is not None:
                        mask |= 1 << index
        return mask


__all__ = ["CallerGradMode", "DiagnosisContext", "named_batch_tensors"]
