"""Module-level graph picture: a graphviz ``.dot`` written by hand, rendered when possible.

Nodes are the report-level modules plus ``loss``; solid edges are autograd
dependencies, dashed edges data flow seen without autograd (e.g. a frozen encoder
under ``no_grad`` feeding ``proj``). Colours:

* green — trainable and getting gradient;
* blue — frozen, on the gradient path (carries gradient back to a trainable module);
* grey — frozen and untracked (fine);
* orange — frozen and tracked for nothing (wasted_tracking);
* red — broken: trainable without gradient, or named by an error finding.

The ``.dot`` is always written; ``dot`` (graphviz) renders it to ``.svg``/``.png``
when installed — otherwise the message says how to install it. No Python graphviz
package is needed (only ``--full-graph`` uses torchviz).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .report import ModuleState, Report

GREEN = "#a1d99b"
LIGHT_GREEN = "#c7e9c0"
BLUE = "#9ecae1"
GREY = "#e0e0e0"
ORANGE = "#fdae6b"
RED = "#fb6a4a"

INSTALL_HINT = "install graphviz to render it (Debian/Ubuntu: `apt-get install graphviz`; macOS: `brew install graphviz`)"


def _quote(text: str) -> str:
    # graphviz: backslash and quote escaped; a real newline becomes graphviz's centred line break.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def node_colour(state: ModuleState) -> tuple[str, str]:
    """(fill colour, short label) for a module state."""
    if state.trainable:
        if state.gets_grad is False or state.broken:
            return RED, "trainable, NO GRADIENT"
        return (GREEN if state.kind == "trainable" else LIGHT_GREEN), state.kind
    if state.broken:
        return RED, "frozen, cuts gradient"
    if state.wasted_bytes:
        return ORANGE, "frozen, tracked for nothing"
    if state.carries_to:
        return BLUE, "frozen, carries grad"
    if not state.ran:
        return GREY, "frozen, did not run"
    return GREY, "frozen, untracked"


def module_dot(report: Report) -> str:
    """The module-level picture as graphviz source."""
    lines = [
        "digraph grad_flow {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
        f"  label={_quote(f'{report.model_name}: {report.status.upper()}')}; labelloc=t;",
    ]
    for state in report.modules:
        colour, label = node_colour(state)
        params = f"{state.trainable:,} / {state.total:,} trainable"
        text = _quote(f"{state.name}\n{label}\n{params}")
        lines.append(f"  {_quote(state.name)} [label={text}, fillcolor={_quote(colour)}];")
    loss_colour = RED if not report.loss.requires_grad else "white"
    loss_label = f"loss\ngrad_fn={report.loss.grad_fn}"
    lines.append(f'  "loss" [shape=ellipse, label={_quote(loss_label)}, fillcolor={_quote(loss_colour)}];')
    for edge in report.edges:
        style = "solid" if edge.autograd else "dashed"
        lines.append(f"  {_quote(edge.source)} -> {_quote(edge.target)} [style={style}];")
    lines += [
        "  subgraph cluster_legend {",
        '    label="legend"; fontsize=9; style=dotted;',
        f'    "legend_trainable" [label="trainable", fillcolor={_quote(GREEN)}];',
        f'    "legend_carries" [label="frozen, carries grad", fillcolor={_quote(BLUE)}];',
        f'    "legend_untracked" [label="frozen, untracked", fillcolor={_quote(GREY)}];',
        f'    "legend_wasted" [label="tracked for nothing", fillcolor={_quote(ORANGE)}];',
        f'    "legend_broken" [label="broken", fillcolor={_quote(RED)}];',
        # invisible chain: in a left-to-right layout the legend becomes one row, not a tall column
        '    "legend_trainable" -> "legend_carries" -> "legend_untracked" -> "legend_wasted" -> "legend_broken" [style=invis];',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render(dot_path: Path, out_path: Path) -> tuple[Optional[Path], str]:
    """Render ``dot_path`` to ``out_path`` (format from its suffix) with graphviz ``dot``.

    Returns:
        (the rendered path or ``None``, a message for the user).
    """
    exe = shutil.which("dot")
    if exe is None:
        return None, f"graphviz `dot` not found: wrote {dot_path} only — {INSTALL_HINT}, then run `dot -Tsvg {dot_path} -o {out_path}`"
    fmt = out_path.suffix.lstrip(".") or "svg"
    try:
        subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(out_path)], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"`dot` failed to render {dot_path}: {detail.decode(errors='replace').strip() or exc}"
    return out_path, f"wrote {out_path}"


def write_graphs(report: Report, path: str | Path, full_graph: bool = False) -> list[str]:
    """Write the module picture (and, with ``full_graph``, torchviz's autograd graph).

    ``path`` names the output: ``x.dot`` writes ``x.dot`` and renders ``x.svg``;
    ``x.svg`` / ``x.png`` / ``x.pdf`` write ``x.dot`` and render to that format; any
    other name gets ``.dot`` and ``.svg`` appended.

    Returns:
        Messages for stderr (what was written, or why rendering was skipped).
    """
    target = Path(path)
    if target.suffix in (".svg", ".png", ".pdf"):
        dot_path, out_path = target.with_suffix(".dot"), target
    elif target.suffix == ".dot":
        dot_path, out_path = target, target.with_suffix(".svg")
    else:
        dot_path, out_path = Path(str(target) + ".dot"), Path(str(target) + ".svg")
    dot_path.parent.mkdir(parents=True, exist_ok=True)
    dot_path.write_text(module_dot(report), encoding="utf-8")
    messages = [f"wrote {dot_path}"]
    messages.append(render(dot_path, out_path)[1])
    if full_graph:
        full_dot = dot_path.with_name(dot_path.stem + ".autograd.dot")
        full_out = out_path.with_name(out_path.stem + ".autograd" + out_path.suffix)
        if report.autograd_dot is None:
            messages.append(
                "no autograd graph to draw: the loss has no grad_fn"
                if report.loss.requires_grad is False or report.loss.requires_grad is None
                else "no autograd graph: torchviz is not installed (`pip install torchviz`)"
            )
        else:
            full_dot.write_text(report.autograd_dot, encoding="utf-8")
            messages.append(f"wrote {full_dot}")
            messages.append(render(full_dot, full_out)[1])
    return messages


__all__ = ["INSTALL_HINT", "module_dot", "node_colour", "render", "write_graphs"]
