"""Findings about the user's ``--data`` rows, as the renderer and the history split see them.

Each cause's text lives beside its catalogue entry (``diagnostics/causes/missing_glyphs.py``,
``history_truncated.py``, ``no_memory.py``, ``fewer_batches.py``); this module holds the
per-row record they read and runs them in order.

The renderer warns about characters its font cannot draw and about history cut to
``max_pages``; the seed path gives a row no memory when its history is too short to
compress. None of that stops gradient, so the engine cannot see it, yet each silently
wastes training signal: a row drawn as empty boxes teaches ``proj`` nothing. This module
turns the per-row facts that :func:`diagnostics.mem_adapter.load_model_dir` collects into
findings naming the JSONL lines (1-based, as an editor shows them) and batches (1-based,
as the progress lines and the report count them).

Torch-free: :mod:`diagnostics.mem_adapter` (the only module importing ``ocrmem``) fills a
:class:`DataScan`; this module only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .causes import Finding


@dataclass
class RowCheck:
    """What rendering one data row found.

    Attributes:
        line: JSONL line number (1-based).
        batch: the batch the row is in (1-based).
        pages: pages of memory the row gets (0: no memory).
        needed: pages its history needs (more than ``pages`` when cut to ``max_pages``).
        missing: characters drawn as the font's empty box.
        missing_message: the renderer's own warning about them.
        truncated_message: the renderer's own warning about the dropped pages.
    """

    line: int
    batch: int
    pages: int
    needed: int
    missing: int = 0
    missing_message: Optional[str] = None
    truncated_message: Optional[str] = None


@dataclass
class DataScan:
    """Every row of ``--data`` that went into a batch, plus what was asked for.

    Attributes:
        path: the data file as given.
        rows: one check per row used, in batch order.
        available: rows in the file.
        batches_asked / batches_built: ``--batches`` and how many the rows filled.
        batch_size: ``--batch-size``.
        seed_path: the model split history itself (``--seed-path``).
        chats: the file holds chats: a "row" is one sample per assistant turn, its history split
            off by ``context_threshold`` (as ``ocrmem.train --train-data`` does).
        context_threshold / max_pages / font_path: the model's settings that decided.
    """

    path: str
    rows: list[RowCheck] = field(default_factory=list)
    available: int = 0
    batches_asked: int = 1
    batches_built: int = 1
    batch_size: int = 1
    seed_path: bool = False
    chats: bool = False
    context_threshold: Optional[int] = None
    max_pages: Optional[int] = None
    font_path: Optional[str] = None

    @property
    def unit(self) -> str:
        """What the messages count: ``rows``, or ``samples`` (assistant turns) of chats."""
        return "samples" if self.chats else "rows"


def format_lines(lines: list[int], limit: int = 12) -> str:
    """``1, 4, 5`` / ``1, 2, ... and 30 more`` for messages."""
    shown = ", ".join(map(str, lines[:limit]))
    return shown if len(lines) <= limit else f"{shown} and {len(lines) - limit} more"


def lines_phrase(lines: list[int]) -> str:
    """``JSONL line 3`` / ``JSONL lines 1, 4, 5`` (each line once: a chat's samples share its line)."""
    lines = list(dict.fromkeys(lines))
    return f"JSONL line {lines[0]}" if len(lines) == 1 else f"JSONL lines {format_lines(lines)}"


def row_finding(scan: DataScan, severity: str, cause: str, rows: list[RowCheck], message: str, **extra: object) -> Finding:
    """A finding about ``rows``: at the first row's line, with every line and batch in the JSON."""
    lines = [r.line for r in rows]
    batches = sorted({r.batch for r in rows})
    return Finding(
        severity, cause, message, file=scan.path, line=lines[0] if lines else None,
        extra={"lines": lines, "batches": batches, **extra},
    )


def data_findings(scan: DataScan) -> list[Finding]:
    """The findings for ``scan``: missing glyphs, truncated history, rows without memory,
    fewer batches than asked. Empty for clean data."""
    from .causes import fewer_batches, history_truncated, missing_glyphs, no_memory

    found = [cause.finding(scan) for cause in (missing_glyphs, history_truncated, no_memory, fewer_batches)]
    return [f for f in found if f is not None]


__all__ = ["DataScan", "RowCheck", "data_findings", "format_lines", "lines_phrase", "row_finding"]
