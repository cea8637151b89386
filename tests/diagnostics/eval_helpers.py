"""Evaluation helpers as users write them: one leaves grad off for the training step that follows.

Used by ``test_diag_engine_grad_mode.py``; the lines the diagnosis must name are found by
searching this file's source, never hard-coded. Keep exactly one unrestored literal switch here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def evaluate_and_forget(model: nn.Module, batch: dict[str, Any]) -> float:
    """The bug: switch grad off for a quick evaluation and never switch it back on."""
    torch.set_grad_enabled(False)
    model.eval()
    loss = model(**batch).loss
    model.train()
    return float(loss)


def evaluate_properly(model: nn.Module, batch: dict[str, Any]) -> float:
    """Healthy: the same evaluation scoped by ``with torch.no_grad()``."""
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss
    model.train()
    return float(loss)


def set_training_mode(model: nn.Module, training: bool) -> None:
    """A mode switch through a variable: only a runtime watch can tell it left grad off."""
    model.train(training)
    torch.set_grad_enabled(training)
