"""Findings about the user's ``--data`` rows, as the renderer and the history split see them.

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

from .causes import FEWER_BATCHES, HISTORY_TRUNCATED, INFO, MISSING_GLYPHS, NO_MEMORY, WARNING, Finding


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
        context_threshold / max_pages / font_path: the model's settings that decided.
    """

    path: str
    rows: list[RowCheck] = field(default_factory=list)
    available: int = 0
    batches_asked: int = 1
    batches_built: int = 1
    batch_size: int = 1
    seed_path: bool = False
    context_threshold: Optional[int] = None
    max_pages: Optional[int] = None
    font_path: Optional[str] = None


def format_lines(lines: list[int], limit: int = 12) -> str:
    """``1, 4, 5`` / ``1, 2, ... and 30 more`` for messages."""
    shown = ", ".join(map(str, lines[:limit]))
    return shown if len(lines) <= limit else f"{shown} and {len(lines) - limit} more"


def lines_phrase(lines: list[int]) -> str:
    """``JSONL line 3`` / ``JSONL lines 1, 4, 5``."""
    return f"JSONL line {lines[0]}" if len(lines) == 1 else f"JSONL lines {format_lines(lines)}"


def _finding(scan: DataScan, severity: str, cause: str, rows: list[RowCheck], message: str, **extra: object) -> Finding:
    lines = [r.line for r in rows]
    batches = sorted({r.batch for r in rows})
    return Finding(
        severity, cause, message, file=scan.path, line=lines[0] if lines else None,
        extra={"lines": lines, "batches": batches, **extra},
    )


def data_findings(scan: DataScan) -> list[Finding]:
    """The findings for ``scan``: missing glyphs, truncated history, rows without memory,
    fewer batches than asked. Empty for clean data."""
    findings: list[Finding] = []
    total = len(scan.rows)
    missing = [r for r in scan.rows if r.missing]
    if missing:
        chars = sum(r.missing for r in missing)
        first = missing[0]
        findings.append(_finding(
            scan, WARNING, MISSING_GLYPHS, missing,
            f"{chars:,} characters in the history of {len(missing)} of {total} rows ("
            f"{lines_phrase([r.line for r in missing])}) are drawn as empty boxes: font {scan.font_path!r} has "
            f"no glyph for them, so the OCR encoder reads nothing there and proj learns from blanks. "
            f"Line {first.line}: {first.missing_message} (in a MEMModel dir: `font_path` in config.json)",
            characters=chars,
        ))
    truncated = [r for r in scan.rows if r.needed > r.pages]
    if truncated:
        first = truncated[0]
        findings.append(_finding(
            scan, WARNING, HISTORY_TRUNCATED, truncated,
            f"the history of {len(truncated)} of {total} rows ({lines_phrase([r.line for r in truncated])}) "
            f"needs more than max_pages={scan.max_pages} pages, so its oldest pages are dropped and the model never "
            f"sees them (line {first.line}: needs {first.needed} pages, kept the last {first.pages}). Raise "
            "`max_pages` in config.json (None keeps every page) or shorten the history.",
            pages_needed=[r.needed for r in truncated],
        ))
    empty = [r for r in scan.rows if r.pages == 0]
    if empty:
        by_batch: dict[int, list[RowCheck]] = {}
        for r in scan.rows:
            by_batch.setdefault(r.batch, []).append(r)
        empty_batches = sorted(b for b, rows in by_batch.items() if all(r.pages == 0 for r in rows))
        why = (
            f"the history is at most context_threshold={scan.context_threshold} tokens, too short to compress, so "
            "the model keeps it as text"
            if scan.seed_path else "the `history` is empty"
        )
        if empty_batches:
            share = (
                f"{len(empty_batches)} of {scan.batches_built} batches (batch {format_lines(empty_batches)}) "
                f"{'has' if len(empty_batches) == 1 else 'have'} no memory at all: proj takes no part there and gets "
                "no gradient."
            )
        else:
            share = f"0 of {scan.batches_built} batches are without memory; proj still trains on the other rows."
        findings.append(_finding(
            scan, WARNING if empty_batches else INFO, NO_MEMORY, empty,
            f"{len(empty)} of {total} rows ({lines_phrase([r.line for r in empty])}) get no memory pages: "
            f"{why}. {share} Filter such rows out, or lower `context_threshold`, if they are meant to train proj.",
            batches_without_memory=empty_batches,
            batches_total=scan.batches_built,
        ))
    if scan.batches_built < scan.batches_asked:
        findings.append(Finding(
            WARNING, FEWER_BATCHES,
            f"--batches {scan.batches_asked} asked for {scan.batches_asked} batches of {scan.batch_size} rows, but "
            f"{scan.path} holds {scan.available} rows: diagnosed {scan.batches_built} "
            f"batch{'es' if scan.batches_built != 1 else ''}. Give more rows or a smaller --batches.",
            file=scan.path,
            extra={"batches_asked": scan.batches_asked, "batches_built": scan.batches_built, "rows": scan.available},
        ))
    return findings


__all__ = ["DataScan", "RowCheck", "data_findings", "format_lines", "lines_phrase"]
