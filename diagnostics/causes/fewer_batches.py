"""``fewer_batches``: ``--batches`` asked for more batches than the ``--data`` rows fill.

The diagnosis then covers fewer batches than the user believes; say so instead of
silently diagnosing what there is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ._base import WARNING, Finding

if TYPE_CHECKING:
    from ..data_findings import DataScan

NAME = "fewer_batches"
ORDER = 203  # no post-run check: grad_flow builds it from the --data scan
MEANING = "--batches asked for more batches than the --data rows fill"
FIX = "give more rows or a smaller --batches"


def finding(scan: "DataScan") -> Optional[Finding]:
    """A warning when the file ran out of rows before ``--batches`` batches were filled."""
    if scan.batches_built >= scan.batches_asked:
        return None
    plural = "es" if scan.batches_built != 1 else ""
    return Finding(
        WARNING, NAME,
        f"--batches {scan.batches_asked} asked for {scan.batches_asked} batches of {scan.batch_size} {scan.unit}, but "
        f"{scan.path} holds {scan.available} {scan.unit}: diagnosed {scan.batches_built} batch{plural}. Give more rows "
        "or a smaller --batches.",
        file=scan.path,
        extra={"batches_asked": scan.batches_asked, "batches_built": scan.batches_built, "rows": scan.available},
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
