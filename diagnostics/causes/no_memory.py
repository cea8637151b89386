"""``no_memory``: ``--data`` rows too short to compress get no memory pages.

On the seed path the model keeps history of at most ``context_threshold`` tokens as text;
on the fast path an empty ``history`` renders no page. Such a row trains nothing in proj;
a batch of only such rows gives proj no gradient at all (a warning; otherwise info).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ._base import INFO, WARNING, Finding

if TYPE_CHECKING:
    from ..data_findings import DataScan

NAME = "no_memory"
ORDER = 202  # no post-run check: grad_flow builds it from the --data scan
MEANING = (
    "--data rows too short to compress get no memory pages; a batch of only such rows "
    "trains nothing in proj"
)
FIX = "filter such rows out or lower `context_threshold`"


def finding(scan: "DataScan") -> Optional[Finding]:
    """The rows without memory, with the share of batches that have none at all."""
    from ..data_findings import format_lines, lines_phrase, row_finding

    empty = [r for r in scan.rows if r.pages == 0]
    if not empty:
        return None
    by_batch: dict[int, list[bool]] = {}
    for r in scan.rows:
        by_batch.setdefault(r.batch, []).append(r.pages == 0)
    empty_batches = sorted(b for b, flags in by_batch.items() if all(flags))
    why = (
        f"the history is at most context_threshold={scan.context_threshold} tokens, too short to compress, so "
        "the model keeps it as text"
        if scan.seed_path
        else f"the context before the reply is at most context_threshold={scan.context_threshold} tokens, so it "
        "stays text (as ocrmem.train trains it)"
        if scan.chats else "the `history` is empty"
    )
    if empty_batches:
        share = (
            f"{len(empty_batches)} of {scan.batches_built} batches (batch {format_lines(empty_batches)}) "
            f"{'has' if len(empty_batches) == 1 else 'have'} no memory at all: proj takes no part there and gets "
            "no gradient."
        )
    else:
        share = f"0 of {scan.batches_built} batches are without memory; proj still trains on the other {scan.unit}."
    return row_finding(
        scan, WARNING if empty_batches else INFO, NAME, empty,
        f"{len(empty)} of {len(scan.rows)} {scan.unit} ({lines_phrase([r.line for r in empty])}) get no memory pages: "
        f"{why}. {share} Filter such {scan.unit} out, or lower `context_threshold`, if they are meant to train proj.",
        batches_without_memory=empty_batches,
        batches_total=scan.batches_built,
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
