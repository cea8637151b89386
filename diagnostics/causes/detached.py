"""``detached``: an op cut a trainable module's output out of the graph.

``.detach()``, ``.data``, a numpy or Python round-trip, a ``torch.tensor`` re-wrap:
the trace records each such op applied to a tensor that requires grad (with the
first frame outside torch); the blame step picks the one downstream of the
parameters' output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import ERROR, Finding, format_params, loc_fields

if TYPE_CHECKING:
    from ..blame import Blame
    from ..context import DiagnosisContext

NAME = "detached"
ORDER = 30
MEANING = (
    "a tensor on the path from a trainable module to the loss was cut from the graph "
    "(.detach(), .data, a numpy/list round-trip or a torch.tensor re-wrap)"
)
FIX = "keep the tensor in the graph: drop the detach/re-wrap on that path"


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """One finding per cut op that separates trainable parameters from the loss."""
    return [_finding(ctx, blame) for blame in ctx.blames if blame.cause == NAME]


def _finding(ctx: "DiagnosisContext", blame: "Blame") -> Finding:
    event = blame.event
    assert event is not None  # detached blames come from a recorded cut
    names = ctx.param_names(blame.pids)
    verb = "gets" if len(names) == 1 else "get"
    subject = blame.module or blame.owner_name
    loc = event.location
    code = loc.code if loc else None
    how = event.op
    if code and ".numpy(" in code:
        how = f"a numpy round-trip ({event.op})"
    elif event.op in (".tolist()", ".item()"):
        how = f"a Python round-trip ({event.op})"
    file, line = loc_fields(loc)
    where = f"{loc.display()}" + (f" `{code}`" if code else "") if loc else "an unknown place"
    fix = "keep the tensor in the graph (drop the detach/re-wrap)"
    if event.op == ".data":
        fix = "use the tensor itself, not `.data` (which bypasses autograd)"
    return Finding(
        ERROR,
        NAME,
        f"{format_params(names)} {verb} no gradient: the output of {subject} is cut from the graph by "
        f"{how} at {where} — {fix}.",
        module=subject,
        params=names,
        file=file,
        line=line,
        extra={"op": event.op},
    )


__all__ = ["FIX", "MEANING", "NAME", "check"]
