"""The causes catalogue: one module per cause, and the ``Finding`` record they produce.

A finding's ``cause`` is exactly one of the names in :data:`CAUSES`; the JSON output
promises that. Each cause module (``diagnostics/causes/<name>.py``) holds, side by
side, its catalogue entry (``NAME``, ``MEANING``, ``FIX``, ``ORDER``), the text of
its findings, and — when it has one — ``check(ctx) -> list[Finding]``, which the
engine runs after the forward and backward, in ``ORDER``. Adding a cause is one new
module here (found by :func:`_discover`) plus its tests.

The package imports no torch: the catalogue (``--help``'s glossary) loads instantly.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Callable, Mapping

from ._base import (
    CATALOGUE,
    ERROR,
    INFO,
    SEVERITIES,
    WARNING,
    Finding,
    format_bytes,
    format_params,
    severity_rank,
)


def _discover() -> list[ModuleType]:
    """Every public module of this package that defines ``NAME``, in ``ORDER``."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found.append(module)
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


CAUSE_MODULES: tuple[ModuleType, ...] = tuple(_discover())
CATALOGUE.update({m.NAME: (m.MEANING, m.FIX) for m in CAUSE_MODULES})

#: cause -> (what it means, the generic fix). Messages built by the checks are more
#: specific; these are the fallbacks and the ``--help`` glossary.
CAUSES: Mapping[str, tuple[str, str]] = CATALOGUE

#: the post-run checks, in order.
CHECKS: tuple[Callable[..., list[Finding]], ...] = tuple(m.check for m in CAUSE_MODULES if hasattr(m, "check"))

from .detached import NAME as DETACHED  # noqa: E402  (after discovery: same modules)
from .grad_disabled import NAME as GRAD_DISABLED  # noqa: E402
from .nan_loss import NAME as NAN_LOSS  # noqa: E402
from .no_trainable_params import NAME as NO_TRAINABLE_PARAMS  # noqa: E402
from .not_trainable import NAME as NOT_TRAINABLE  # noqa: E402
from .reentrant_checkpoint import NAME as REENTRANT_CHECKPOINT  # noqa: E402
from .unused_param import NAME as UNUSED_PARAM  # noqa: E402
from .wasted_tracking import NAME as WASTED_TRACKING  # noqa: E402

__all__ = [
    "CAUSES",
    "CAUSE_MODULES",
    "CHECKS",
    "DETACHED",
    "ERROR",
    "Finding",
    "GRAD_DISABLED",
    "INFO",
    "NAN_LOSS",
    "NOT_TRAINABLE",
    "NO_TRAINABLE_PARAMS",
    "REENTRANT_CHECKPOINT",
    "SEVERITIES",
    "UNUSED_PARAM",
    "WARNING",
    "WASTED_TRACKING",
    "format_bytes",
    "format_params",
    "severity_rank",
]
