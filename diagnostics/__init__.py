"""Gradient-flow and parameter diagnostics for any ``nn.Module`` + batch.

    from diagnostics import diagnose, assert_grad_flow
    report = diagnose(model, batch, expect_trainable=["proj"])
    print(report.to_text())

Command lines: ``python -m diagnostics.grad_flow`` (runtime diagnosis) and
``python -m diagnostics.lint`` (static scan). The package never imports ``ocrmem``
except in :mod:`diagnostics.mem_adapter`.
"""

from __future__ import annotations

import importlib

#: public name -> the submodule that defines it. Imported on first access (PEP 562): the
#: package is also the home of two ``python -m`` entry points whose ``--help`` must not pay
#: for torch, and importing ``diagnostics.lint`` eagerly would make runpy warn that it was
#: imported before execution.
_LAZY = {
    "assert_grad_flow": "assertions",
    "CAUSES": "causes",
    "Finding": "causes",
    "diagnose": "engine",
    "extract_loss": "engine",
    "run_forward": "engine",
    "CannotRunError": "errors",
    "DiagnosticsError": "errors",
    "FactoryError": "errors",
    "LossNotFoundError": "errors",
    "FreezeWatch": "freeze",
    "static_freeze_sites": "freeze",
    "LoadTriage": "load_triage",
    "TriageFinding": "load_triage",
    "classify_message": "load_triage",
    "ParameterTable": "params",
    "check_expectations": "params",
    "parameter_table": "params",
    "Report": "report",
    "merge_reports": "report",
    "LintFinding": "lint",
    "lint_file": "lint",
    "lint_paths": "lint",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if module != "lint":  # keep lint out of globals so `python -m diagnostics.lint` stays clean
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
