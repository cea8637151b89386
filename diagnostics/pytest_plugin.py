"""pytest plugin: the ``grad_flow`` fixture.

Registered through the ``pytest11`` entry point ``ocrmem_grad_flow`` (see
``pyproject.toml``), so an installed package offers it to every test suite::

    def test_adapter_trains(grad_flow, model, batch):
        grad_flow(model, batch, expect_trainable=["proj"])

The fixture returns :func:`diagnostics.assert_grad_flow`.
"""

from __future__ import annotations

from typing import Callable

import pytest

from .assertions import assert_grad_flow


@pytest.fixture
def grad_flow() -> Callable[..., object]:
    """``assert_grad_flow(model, batch, expect_trainable=[...])`` — raises AssertionError with the findings."""
    return assert_grad_flow


__all__ = ["grad_flow"]
