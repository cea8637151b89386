"""``wasted_tracking``: a frozen module tracked by autograd with nothing trainable upstream.

Its inputs require grad (often the seed's ``pixel_values.requires_grad_(True)``
workaround), so autograd saves its activations for a backward that can train
nothing there. The trace counts the bytes saved per module call; a frozen call whose
tracked inputs have no trainable parameter upstream is waste. The finding points at
the ``requires_grad`` switch when the trace saw it, else at the module's call site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ._base import WARNING, Finding, format_bytes, loc_fields

if TYPE_CHECKING:
    from ..context import DiagnosisContext
    from ..source import SourceLocation
    from ..trace import ModuleCall

NAME = "wasted_tracking"
ORDER = 80
MEANING = (
    "a frozen module is tracked by autograd although nothing trainable lies upstream "
    "of it, so autograd stores its activations for nothing"
)
FIX = "do not set requires_grad on its inputs; run it under torch.no_grad()"


def check(ctx: "DiagnosisContext") -> list[Finding]:
    """Warnings with byte counts; also fills ``ctx.wasted_bytes`` for the module view."""
    from torch import nn

    from ..graph import ReachMemo

    trace = ctx.trace
    calls = trace.calls if trace is not None else []
    if not calls:
        return []
    # Modules with a trainable parameter somewhere below them: the owners and their ancestors.
    live: set[str] = {"(root)"} if ctx.trainable else set()
    for pid in ctx.trainable:
        parts = ctx.owner[pid][0].split(".")
        live.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))

    def frozen(call: "ModuleCall") -> bool:
        if not call.registered:  # unregistered: look at what the call recorded
            return not call.trainable_param_ids
        return call.name not in live

    total_bytes = [c.saved_bytes for c in calls]
    for call in reversed(calls):
        if call.parent is not None:
            total_bytes[call.parent] += total_bytes[call.index]
    trainable_memo = ReachMemo(
        lambda v: 1 if v.requires_grad and (id(v) in ctx.trainable or isinstance(v, nn.Parameter)) else 0,
        checkpoint_mask=1 if ctx.checkpointed_report_bits() else 0,
    )
    # Name the input that made the frozen module tracked: batch tensors or tensors
    # switched to requires_grad during the forward.
    leaves: list[tuple[str, Optional["SourceLocation"]]] = []
    leaf_bits: dict[int, int] = {}
    for tensor, location in trace.requires_grad_sites:  # type: ignore[union-attr]
        if id(tensor) not in leaf_bits:
            leaf_bits[id(tensor)] = 1 << len(leaves)
            leaves.append((ctx.batch_names.get(id(tensor), "a tensor"), location))
    for tid, key in ctx.batch_names.items():
        if tid not in leaf_bits:
            leaf_bits[tid] = 1 << len(leaves)
            leaves.append((key, None))
    leaf_memo = ReachMemo(lambda v: leaf_bits.get(id(v), 0))

    wasted = [False] * len(calls)
    for call in calls:
        if not call.inputs_tracked or total_bytes[call.index] <= 0 or not frozen(call):
            continue
        if any(trainable_memo.of(s) for s in call.input_sources):
            continue
        wasted[call.index] = True
    totals: dict[str, list[Any]] = {}
    for call in calls:
        if not wasted[call.index]:
            continue
        if call.parent is not None and wasted[call.parent]:
            continue
        entry = totals.setdefault(call.name, [0, 0, 0, call])
        entry[0] += total_bytes[call.index]
        entry[1] += 1
        for source in call.input_sources:
            entry[2] |= leaf_memo.of(source)
    findings = []
    for name, (nbytes, count, leaf_mask, call) in totals.items():
        culprits = [leaves[i] for i in range(len(leaves)) if leaf_mask >> i & 1]
        known = [f"`{n}`" for n, _ in culprits if n != "a tensor"]
        inputs = (", ".join(known) + (" requires" if len(known) == 1 else " require")) if known else "its input requires"
        site = next((loc for _, loc in culprits if loc is not None), None)
        where = f" (made to require grad at {site.display()})" if site else ""
        file, line = loc_fields(site or call.call_site)
        times = f" over {count} calls" if count > 1 else ""
        findings.append(
            Finding(
                WARNING,
                NAME,
                f"{name} is frozen but autograd tracked it because {inputs} grad{where}, although "
                f"no trainable parameter lies upstream of it: {format_bytes(nbytes)} ({nbytes:,} bytes) saved "
                f"for backward{times} for nothing — do not set requires_grad on its inputs, run it under "
                "torch.no_grad(), or detach what enters it.",
                module=name,
                file=file,
                line=line,
                extra={"bytes": nbytes, "calls": count},
            )
        )
        report_name = ctx.report_name_of_module(name)
        if report_name:
            ctx.wasted_bytes[report_name] = ctx.wasted_bytes.get(report_name, 0) + nbytes
    return findings


__all__ = ["FIX", "MEANING", "NAME", "check"]
