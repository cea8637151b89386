"""``history_truncated``: ``--data`` history needs more than ``max_pages`` pages.

The renderer keeps the last ``max_pages`` pages (the most recent history) and drops the
oldest: facts there never reach the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ._base import WARNING, Finding

if TYPE_CHECKING:
    from ..data_findings import DataScan

NAME = "history_truncated"
ORDER = 201  # no post-run check: grad_flow builds it from the --data scan
MEANING = "--data rows whose history needs more than `max_pages` pages: the oldest pages are dropped"
FIX = "raise `max_pages` (None keeps every page) or shorten the history"


def finding(scan: "DataScan") -> Optional[Finding]:
    """One warning naming every cut row, with the pages each needs."""
    from ..data_findings import lines_phrase, row_finding

    rows = [r for r in scan.rows if r.needed > r.pages]
    if not rows:
        return None
    first = rows[0]
    return row_finding(
        scan, WARNING, NAME, rows,
        f"the history of {len(rows)} of {len(scan.rows)} {scan.unit} ({lines_phrase([r.line for r in rows])}) "
        f"needs more than max_pages={scan.max_pages} pages, so its oldest pages are dropped and the model never "
        f"sees them (line {first.line}: needs {first.needed} pages, kept the last {first.pages}). Raise "
        "`max_pages` in config.json (None keeps every page) or shorten the history.",
        pages_needed=[r.needed for r in rows],
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
