"""The causes catalogue and the ``Finding`` record every check produces.

A finding's ``cause`` is exactly one of the names in :data:`CAUSES`; the JSON output
promises that. Each cause has a one-line explanation and a fix sentence so that the
report never names a problem without saying what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

# Severities, most severe first. Only ``error`` makes the run fail (exit 1).
ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES: tuple[str, ...] = (ERROR, WARNING, INFO)

GRAD_DISABLED = "grad_disabled"
DETACHED = "detached"
NOT_TRAINABLE = "not_trainable"
NO_TRAINABLE_PARAMS = "no_trainable_params"
REENTRANT_CHECKPOINT = "reentrant_checkpoint"
NAN_LOSS = "nan_loss"
UNUSED_PARAM = "unused_param"
WASTED_TRACKING = "wasted_tracking"
# Data causes (--data): the renderer or the history split wasted a row; never an error.
MISSING_GLYPHS = "missing_glyphs"
HISTORY_TRUNCATED = "history_truncated"
NO_MEMORY = "no_memory"
FEWER_BATCHES = "fewer_batches"

#: cause -> (what it means, the generic fix). Messages built by the engine are more
#: specific; these are the fallbacks and the ``--help`` glossary.
CAUSES: Mapping[str, tuple[str, str]] = {
    GRAD_DISABLED: (
        "a trainable module (or a frozen one that must carry gradient back to it) ran "
        "with autograd disabled (no_grad / inference_mode / set_grad_enabled(False))",
        "run the trainable module outside the grad-disabled block",
    ),
    DETACHED: (
        "a tensor on the path from a trainable module to the loss was cut from the graph "
        "(.detach(), .data, a numpy/list round-trip or a torch.tensor re-wrap)",
        "keep the tensor in the graph: drop the detach/re-wrap on that path",
    ),
    NOT_TRAINABLE: (
        "a parameter expected to train is frozen, missing, or not registered in the model",
        "set requires_grad=True on it after any freezing loop, and register modules as "
        "attributes or in nn.ModuleList/ModuleDict",
    ),
    NO_TRAINABLE_PARAMS: (
        "the model has no parameter with requires_grad=True",
        "unfreeze the part you mean to train (e.g. `model.proj.requires_grad_(True)`)",
    ),
    REENTRANT_CHECKPOINT: (
        "torch.utils.checkpoint with use_reentrant=True ran over inputs that do not "
        "require grad: its output has no grad_fn and the parameters inside get none",
        "pass use_reentrant=False, or make an input require grad "
        "(`model.enable_input_require_grads()`)",
    ),
    NAN_LOSS: (
        "the loss (or a gradient) is NaN or infinite",
        "check the labels (all -100 leaves no token to average over) and the inputs; "
        "skip batches without supervised tokens",
    ),
    UNUSED_PARAM: (
        "a trainable parameter took no part in this batch's loss",
        "make sure the module runs and its output reaches the loss for every batch, or "
        "skip such batches explicitly",
    ),
    WASTED_TRACKING: (
        "a frozen module is tracked by autograd although nothing trainable lies upstream "
        "of it, so autograd stores its activations for nothing",
        "do not set requires_grad on its inputs; run it under torch.no_grad()",
    ),
    MISSING_GLYPHS: (
        "--data rows whose history holds characters the font cannot draw: they are rendered "
        "as empty boxes the OCR encoder cannot read",
        "set `font_path` to a font that covers them (e.g. a CJK font for Chinese)",
    ),
    HISTORY_TRUNCATED: (
        "--data rows whose history needs more than `max_pages` pages: the oldest pages are dropped",
        "raise `max_pages` (None keeps every page) or shorten the history",
    ),
    NO_MEMORY: (
        "--data rows too short to compress get no memory pages; a batch of only such rows "
        "trains nothing in proj",
        "filter such rows out or lower `context_threshold`",
    ),
    FEWER_BATCHES: (
        "--batches asked for more batches than the --data rows fill",
        "give more rows or a smaller --batches",
    ),
}


@dataclass
class Finding:
    """One diagnosis, ready for the human report and the JSON output.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        cause: one of :data:`CAUSES`.
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
        if self.cause not in CAUSES:
            raise ValueError(f"`cause` must be one of {sorted(CAUSES)}, got {self.cause!r}")
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


__all__ = [
    "CAUSES",
    "DETACHED",
    "ERROR",
    "FEWER_BATCHES",
    "Finding",
    "GRAD_DISABLED",
    "HISTORY_TRUNCATED",
    "INFO",
    "MISSING_GLYPHS",
    "NAN_LOSS",
    "NOT_TRAINABLE",
    "NO_MEMORY",
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
