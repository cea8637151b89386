"""The checks the regression suite applies — to our code and to the buggy variant of each problem.

Each check raises AssertionError on the buggy behaviour; every test file runs it twice: on the
original bug (``pytest.raises(AssertionError)``: the harness catches it) and on ocrmem (passes).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch


def run_silently(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; fail if it emits any Python warning or any log record at WARNING or above."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    loggers = [root, logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not messages, f"expected silence, got: {messages}"
    return result


def assert_proj_learns(model: torch.nn.Module, batch: dict) -> None:
    """The loss has a grad_fn, backward runs, and every proj parameter gets a finite non-zero grad."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert out.loss.grad_fn is not None, "loss has no grad_fn: backward would raise 'element 0 of tensors ...'"
    out.loss.backward()
    for name, param in model.proj.named_parameters():
        assert param.grad is not None, f"proj.{name} got no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"proj.{name} gradient is zero"
