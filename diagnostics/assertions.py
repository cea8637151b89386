"""``assert_grad_flow``: the one-line check for users' own tests.

    from diagnostics import assert_grad_flow

    def test_proj_trains(model, batch):
        assert_grad_flow(model, batch, expect_trainable=["proj"])

Raises ``AssertionError`` whose message is the report's findings (each with its fix).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from .engine import diagnose
from .report import Report


def assert_grad_flow(
    model: nn.Module,
    batch: Any,
    expect_trainable: Optional[Sequence[str]] = None,
    *,
    allow_warnings: bool = True,
    **kwargs: Any,
) -> Report:
    """Diagnose ``model`` on ``batch`` and fail loudly when gradient does not flow.

    Args:
        model: the model.
        batch: ``model(**batch)`` input (see :func:`diagnostics.diagnose`).
        expect_trainable: parameter prefixes / patterns that must train.
        allow_warnings: when ``False``, warnings (e.g. ``wasted_tracking``) fail too.
        **kwargs: passed to :func:`diagnostics.diagnose` (``lint`` defaults to ``False``).

    Returns:
        The report, for further assertions.

    Raises:
        AssertionError: on any error finding (or warning, with ``allow_warnings=False``),
            or when the model raised an error the diagnosis cannot explain.
    """
    kwargs.setdefault("lint", False)
    report = diagnose(model, batch, expect_trainable, **kwargs)
    failing = report.status == "error" or (
        not allow_warnings and any(f.severity == "warning" for f in report.findings)
    )
    if failing:
        header = f"gradient flow check failed for {report.model_name} (loss grad_fn={report.loss.grad_fn}):"
        raise AssertionError(header + "\n" + report.findings_text())
    return report


__all__ = ["assert_grad_flow"]
