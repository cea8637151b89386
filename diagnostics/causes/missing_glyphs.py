"""``missing_glyphs``: ``--data`` history holds characters the font cannot draw.

The renderer draws them as the font's empty box (``.notdef``), so the OCR encoder reads
nothing there and proj learns from blanks — Chinese history with a Latin-only font is the
usual case. Found while rendering each row (:func:`diagnostics.mem_adapter.scan_rows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ._base import WARNING, Finding

if TYPE_CHECKING:
    from ..data_findings import DataScan

NAME = "missing_glyphs"
ORDER = 200  # no post-run check: grad_flow builds it from the --data scan
MEANING = (
    "--data rows whose history holds characters the font cannot draw: they are rendered "
    "as empty boxes the OCR encoder cannot read"
)
FIX = "set `font_path` to a font that covers them (e.g. a CJK font for Chinese)"


def finding(scan: "DataScan") -> Optional[Finding]:
    """One warning naming every row with boxes and the renderer's own message for the first."""
    from ..data_findings import lines_phrase, row_finding

    rows = [r for r in scan.rows if r.missing]
    if not rows:
        return None
    chars = sum(r.missing for r in rows)
    first = rows[0]
    return row_finding(
        scan, WARNING, NAME, rows,
        f"{chars:,} characters in the history of {len(rows)} of {len(scan.rows)} {scan.unit} "
        f"({lines_phrase([r.line for r in rows])}) are drawn as empty boxes: font {scan.font_path!r} has "
        "no glyph for them, so the OCR encoder reads nothing there and proj learns from blanks. "
        f"Line {first.line}: {first.missing_message} (in a MEMModel dir: `font_path` in config.json)",
        characters=chars,
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
