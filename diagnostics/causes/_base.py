"""The ``Finding`` record every check produces, severities, and message helpers.

Torch-free on purpose: the causes catalogue (and so ``--help``'s glossary) loads
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..source import SourceLocation

# Severities, most severe first. Only ``error`` makes the run fail (exit 1).
ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES: tuple[str, ...] = (ERROR, WARNING, INFO)

#: cause name -> (what it means, the generic fix); filled by ``diagnostics.causes``
#: from each cause module's ``NAME`` / ``MEANING`` / ``FIX``.
CATALOGUE: dict[str, tuple[str, str]] = {}


@dataclass
class Finding:
    """One diagnosis, ready for the human report and the JSON output.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        cause: one of :data:`diagnostics.causes.CAUSES`.
        message: full sentence(s) including the fix.
        module: the module the finding is about (qualified name), if any.
        params: parameter names concerned.
        file: file of the statement responsible (relative to cwd when inside it).
        line: its line.
        extra: additional JSON fields (``bytes``, ``call_site``...). Never rename keys.
    """

    severity: str
    cause: str
    message: str
    module: Optional[str] = None
    params: list[str] = field(default_factory=list)
    file: Optional[str] = None
    line: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cause not in CATALOGUE:
            raise ValueError(f"`cause` must be one of {sorted(CATALOGUE)}, got {self.cause!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form (extra keys are added, never replace the base ones)."""
        data: dict[str, Any] = {
            "severity": self.severity,
            "cause": self.cause,
            "message": self.message,
            "module": self.module,
            "params": list(self.params),
            "file": self.file,
            "line": self.line,
        }
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return data

    def key(self) -> tuple[Any, ...]:
        """Identity used to merge the same finding seen on several batches."""
        return (self.severity, self.cause, self.module, self.file, self.line, tuple(self.params))


def severity_rank(severity: str) -> int:
    """0 for error, 1 for warning, 2 for info (sort key)."""
    return SEVERITIES.index(severity)


def format_params(names: list[str], limit: int = 4) -> str:
    """``a, b, c and 5 more`` for messages."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


def format_bytes(n: int) -> str:
    """Human-readable byte count (``1.5 MiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def loc_fields(location: Optional["SourceLocation"]) -> tuple[Optional[str], Optional[int]]:
    """``(file, line)`` of a finding from a location (file relative to cwd when inside it)."""
    if location is None:
        return None, None
    from ..source import display_path

    return display_path(location.file), location.line


def site_json(location: Optional["SourceLocation"]) -> Optional[dict[str, Any]]:
    """``{"file", "line", "code"}`` for a location in a finding's extra JSON."""
    if location is None:
        return None
    from ..source import display_path

    return {"file": display_path(location.file), "line": location.line, "code": location.code}


__all__ = [
    "CATALOGUE",
    "ERROR",
    "Finding",
    "INFO",
    "SEVERITIES",
    "WARNING",
    "format_bytes",
    "format_params",
    "loc_fields",
    "severity_rank",
    "site_json",
]
