"""Helpers for the diagnostics tests: locate source lines without hard-coding numbers."""

from __future__ import annotations

import inspect
import os
from typing import Any


def line_of(obj: Any, snippet: str, occurrence: int = 1) -> int:
    """Absolute line number of the ``occurrence``-th line of ``obj``'s source containing ``snippet``."""
    lines, start = inspect.getsourcelines(obj)
    seen = 0
    for offset, text in enumerate(lines):
        if snippet in text:
            seen += 1
            if seen == occurrence:
                return start + offset
    raise AssertionError(f"{snippet!r} not found in the source of {obj!r}")


def same_file(reported: str | None, obj: Any) -> bool:
    """Whether a finding's ``file`` (relative to cwd or absolute) is ``obj``'s source file."""
    if reported is None:
        return False
    return os.path.abspath(reported) == os.path.abspath(inspect.getsourcefile(obj) or "")
