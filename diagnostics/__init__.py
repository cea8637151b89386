"""Gradient-flow and parameter diagnostics for any ``nn.Module`` + batch.

    from diagnostics import diagnose, assert_grad_flow
    report = diagnose(model, batch, expect_trainable=["proj"])
    print(report.to_text())

Command lines: ``python -m diagnostics.grad_flow`` (runtime diagnosis) and
``python -m diagnostics.lint`` (static scan). The package never imports ``ocrmem``
except in :mod:`diagnostics.mem_adapter`.
"""

from __future__ import annotations

from .assertions import assert_grad_flow
from .causes import CAUSES, Finding
from .engine import diagnose, extract_loss, run_forward
from .errors import CannotRunError, DiagnosticsError, FactoryError, LossNotFoundError
from .freeze import FreezeWatch, static_freeze_sites
from .load_triage import LoadTriage, TriageFinding, classify_message
from .params import ParameterTable, check_expectations, parameter_table
from .report import Report, merge_reports

_LAZY = {"LintFinding", "lint_file", "lint_paths"}


def __getattr__(name: str) -> object:
    # diagnostics.lint is also a `python -m` entry point; importing it eagerly here would
    # make runpy warn that it was imported before execution.
    if name in _LAZY:
        from . import lint

        return getattr(lint, name)
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")


__all__ = [
    "CAUSES",
    "CannotRunError",
    "DiagnosticsError",
    "FactoryError",
    "Finding",
    "FreezeWatch",
    "LintFinding",
    "LoadTriage",
    "LossNotFoundError",
    "ParameterTable",
    "Report",
    "TriageFinding",
    "assert_grad_flow",
    "check_expectations",
    "classify_message",
    "diagnose",
    "extract_loss",
    "lint_file",
    "lint_paths",
    "merge_reports",
    "parameter_table",
    "run_forward",
    "static_freeze_sites",
]
