"""Exceptions of the diagnostics package.

``DiagnosticsError`` is the base; the CLI maps :class:`CannotRunError` and its
subclasses to exit status 2 ("could not run"), with the message as the one-line reason.
"""

from __future__ import annotations


class DiagnosticsError(Exception):
    """Base class for errors raised by :mod:`diagnostics`."""


class CannotRunError(DiagnosticsError):
    """The diagnosis could not run (bad path, import error, missing factory...)."""


class FactoryError(CannotRunError, ValueError):
    """A ``--factory FILE.py:FUNC`` spec is malformed or its result is unusable."""


class LossNotFoundError(DiagnosticsError, ValueError):
    """The model output holds no scalar loss (no ``.loss``, no ``["loss"]``)."""


__all__ = ["CannotRunError", "DiagnosticsError", "FactoryError", "LossNotFoundError"]
