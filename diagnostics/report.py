"""The diagnosis result: human text, stable JSON, exit status.

JSON schema: ``diagnostics/report.schema.json`` (JSON Schema 2020-12, pinned by
``tests/diagnostics/test_diag_report_schema.py``). ``version`` is bumped on every change
of the schema file; the history is in the schema's ``description``:

* 1 — first release.
* 2 — the ``--data`` causes ``missing_glyphs``, ``history_truncated``, ``no_memory`` and
  ``fewer_batches``; batch numbers (``batches[].index``, a finding's ``batches``) count
  from 1, as the text and the progress lines do (0-based in version 1).

Outline::

    {"version": 2, "status": "ok" | "error",
     "loss": {"requires_grad", "grad_fn", "value", ...},
     "params": {"total", "trainable", "modules": {NAME: {"total", "trainable"}}, ...},
     "findings": [{"severity", "cause", "message", "module", "params", "file", "line", ...}],
     "modules": [...], "gradient_paths": [...], "lint": [...], "load": [...],
     "error": null | {...}, "batches": [...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

from .causes import ERROR, INFO, WARNING, Finding, severity_rank
from .params import ParameterTable

SCHEMA_VERSION = 2

#: the JSON Schema of :meth:`Report.to_json` (shipped as package data).
SCHEMA_FILE = "report.schema.json"


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), e.g. for ``jsonschema.validate(report, load_schema())``."""
    from importlib.resources import files

    return json.loads(files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))

#: the exception a backward on a loss without grad_fn raises — the user's error.
NO_GRAD_FN_ERROR = "RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn"


class _JsonFinding(Protocol):
    severity: str

    def to_json(self) -> dict[str, Any]: ...

    def to_text(self) -> str: ...


@dataclass
class LossInfo:
    """The loss as found in the model output.

    Attributes:
        requires_grad: ``loss.requires_grad`` (``None`` when there was no loss).
        grad_fn: name of ``loss.grad_fn`` or ``None``.
        value: ``loss.item()`` when finite or NaN/inf as a string-safe float.
        source: how it was found (``"tensor"``, ``".loss"``, ``"['loss']"``).
    """

    requires_grad: Optional[bool] = None
    grad_fn: Optional[str] = None
    value: Optional[float] = None
    source: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        value = self.value
        if value is not None and not math.isfinite(value):
            value_json: Any = str(value)  # JSON has no NaN; keep it readable
        else:
            value_json = value
        return {
            "requires_grad": self.requires_grad,
            "grad_fn": self.grad_fn,
            "value": value_json,
            "source": self.source,
        }


@dataclass
class ModuleState:
    """What happened to one report-level module.

    Attributes:
        name: qualified name.
        total / trainable: parameter elements.
        ran: it (or a submodule) was called during the forward.
        tracked: its output required grad.
        on_path: its output is on the loss's autograd graph.
        carries_to: trainable modules whose gradient flows through it.
        gets_grad: for trainable modules: all trainable params got gradient.
        saved_bytes: bytes saved for backward inside it.
        wasted_bytes: of those, bytes saved although nothing trainable is upstream.
        broken: it is named by an error finding.
    """

    name: str
    total: int
    trainable: int
    ran: bool = False
    tracked: bool = False
    on_path: bool = False
    carries_to: list[str] = field(default_factory=list)
    gets_grad: Optional[bool] = None
    saved_bytes: int = 0
    wasted_bytes: int = 0
    broken: bool = False

    @property
    def kind(self) -> str:
        """``trainable``, ``partly trainable`` or ``frozen``."""
        if self.trainable == 0:
            return "frozen"
        return "trainable" if self.trainable == self.total else "partly trainable"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "total": self.total,
            "trainable": self.trainable,
            "ran": self.ran,
            "tracked": self.tracked,
            "on_path": self.on_path,
            "carries_to": list(self.carries_to),
            "gets_grad": self.gets_grad,
            "saved_bytes": self.saved_bytes,
            "wasted_bytes": self.wasted_bytes,
        }


@dataclass
class RunError:
    """An exception raised while running the model.

    Attributes:
        stage: ``"forward"``, ``"loss"`` or ``"backward"``.
        type: exception class name.
        message: exception message (first line).
        explained: a grad-related finding explains it (exit 1, not 2).
        file / line: first user frame of the traceback.
    """

    stage: str
    type: str
    message: str
    explained: bool = False
    file: Optional[str] = None
    line: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "type": self.type,
            "message": self.message,
            "explained": self.explained,
            "file": self.file,
            "line": self.line,
        }

    def one_line(self) -> str:
        where = f" at {self.file}:{self.line}" if self.file else ""
        return f"{self.stage} raised {self.type}: {self.message.splitlines()[0] if self.message else ''}{where}"


@dataclass
class Edge:
    """A module-level edge for the picture: ``source`` feeds ``target``."""

    source: str
    target: str
    autograd: bool


@dataclass
class Report:
    """Everything a diagnosis found. Build with :func:`diagnostics.diagnose`."""

    model_name: str
    loss: LossInfo
    params: ParameterTable
    findings: list[Finding] = field(default_factory=list)
    modules: list[ModuleState] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    lint: list[Any] = field(default_factory=list)
    load: list[Any] = field(default_factory=list)
    error: Optional[RunError] = None
    warnings: list[str] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    autograd_dot: Optional[str] = None

    # ------------------------------------------------------------------ status
    @property
    def errors(self) -> list[Finding]:
        """Findings of severity error."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def status(self) -> str:
        """``"error"`` if any error finding, load error or unexplained run error."""
        if self.errors or any(getattr(f, "severity", None) == ERROR for f in self.load):
            return "error"
        if self.error is not None:
            return "error"
        return "ok"

    @property
    def cannot_run(self) -> bool:
        """The model raised something no finding explains: the diagnosis is incomplete."""
        return self.error is not None and not self.error.explained

    def sorted_findings(self) -> list[Finding]:
        """Findings, errors first (stable within a severity)."""
        return sorted(self.findings, key=lambda f: severity_rank(f.severity))

    # ------------------------------------------------------------------ output
    def to_json(self) -> dict[str, Any]:
        """The stable machine-readable form."""
        return {
            "version": SCHEMA_VERSION,
            "status": self.status,
            "model": self.model_name,
            "loss": self.loss.to_json(),
            "params": self.params.to_json(),
            "findings": [f.to_json() for f in self.sorted_findings()],
            "modules": [m.to_json() for m in self.modules],
            "gradient_paths": list(self.paths),
            "lint": [f.to_json() for f in self.lint],
            "load": [f.to_json() for f in self.load],
            "error": self.error.to_json() if self.error else None,
            "warnings": list(self.warnings),
            "batches": list(self.batches),
            "stats": dict(self.stats),
        }

    def findings_text(self) -> str:
        """Only the findings, one per paragraph (used by ``assert_grad_flow``)."""
        lines = []
        for f in self.sorted_findings():
            lines.append(f"{f.severity.upper()} [{f.cause}]{_where(f)}: {f.message}")
        if self.error is not None and not self.error.explained:
            lines.append(f"ERROR [could not run]: {self.error.one_line()}")
        return "\n".join(lines)

    def to_text(self) -> str:
        """The human report (not meant for parsing)."""
        out: list[str] = []
        n_warnings = sum(1 for f in self.findings if f.severity == WARNING)
        noted = f" ({n_warnings} warning{'s' if n_warnings != 1 else ''} below)" if n_warnings else ""
        out.append(f"Gradient-flow report: {self.model_name} — status: {self.status.upper()}{noted}")
        out.append("")
        out.append(self._loss_text())
        out.append("")
        out.append("Parameters")
        out.append(self.params.summary_line())
        out.append("Detailed breakdown:")
        out.extend(self.params.breakdown_lines())
        if self.paths:
            out.append("")
            out.append("Gradient path")
            out.extend(f"  {p}" for p in self.paths)
        if self.error is not None:
            out.append("")
            label = "explained below" if self.error.explained else "not a gradient-flow problem"
            out.append(f"Run error ({label}): {self.error.one_line()}")
        out.append("")
        if self.findings:
            counts = {s: sum(1 for f in self.findings if f.severity == s) for s in (ERROR, WARNING, INFO)}
            summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
            out.append(f"Findings ({summary})")
            for f in self.sorted_findings():
                out.append(f"  {f.severity.upper()} [{f.cause}]{_where(f)}")
                out.append(f"    {f.message}")
        else:
            out.append("Findings: none — every trainable parameter gets a finite, non-zero gradient.")
        if self.load:
            out.append("")
            out.append("Load-time messages")
            out.extend(f"  {f.to_text()}" for f in self.load)
        if self.lint:
            out.append("")
            out.append("Static scan (python -m diagnostics.lint)")
            out.extend(f"  {f.to_text()}" for f in self.lint)
        if self.batches and len(self.batches) > 1:
            out.append("")
            out.append("Batches")
            for b in self.batches:
                out.append(f"  batch {b['index']}: {b['status']} (loss grad_fn: {b.get('grad_fn')})")
        return "\n".join(out)

    def _loss_text(self) -> str:
        loss = self.loss
        if loss.requires_grad is None:
            return "loss: none (the forward did not produce one)"
        value = "n/a" if loss.value is None else f"{loss.value:.4f}"
        text = f"loss: {value} (requires_grad={loss.requires_grad}, grad_fn={loss.grad_fn})"
        if not loss.requires_grad:
            text += (
                "\n  The loss has no grad_fn: loss.backward() raises\n"
                f"  `{NO_GRAD_FN_ERROR}`.\n"
                "  Nothing trainable took part in computing it with grad enabled; the findings say why."
            )
        return text


def _where(finding: Finding) -> str:
    """`` FILE:LINE``, `` FILE`` or nothing."""
    if not finding.file:
        return ""
    return f" {finding.file}:{finding.line}" if finding.line is not None else f" {finding.file}"


def merge_reports(reports: Sequence[Report]) -> Report:
    """Combine per-batch reports: findings deduplicated with the batches they occur in.

    Batches are numbered from 1 (``batches[].index`` and a finding's ``extra["batches"]``),
    as the progress lines and the text count them.

    The merged report keeps the first report's loss/params/paths, except that the
    loss, paths and modules of the first *failing* batch are shown when one fails
    (that is the batch worth explaining).
    """
    if not reports:
        raise ValueError("`reports` must not be empty")
    if len(reports) == 1:
        return reports[0]
    failing = next((r for r in reports if r.status == "error"), reports[0])
    merged = Report(
        model_name=failing.model_name,
        loss=failing.loss,
        params=failing.params,
        modules=failing.modules,
        paths=failing.paths,
        edges=failing.edges,
        lint=failing.lint,
        load=reports[0].load,
        error=next((r.error for r in reports if r.cannot_run), failing.error),
        autograd_dot=failing.autograd_dot,
    )
    by_key: dict[tuple[Any, ...], Finding] = {}
    for index, report in enumerate(reports, start=1):
        for finding in report.findings:
            key = finding.key()
            if key not in by_key:
                copy = Finding(
                    finding.severity, finding.cause, finding.message, finding.module,
                    list(finding.params), finding.file, finding.line, dict(finding.extra),
                )
                copy.extra["batches"] = []
                by_key[key] = copy
            by_key[key].extra["batches"].append(index)
        merged.batches.append(
            {
                "index": index,
                "status": report.status,
                "grad_fn": report.loss.grad_fn,
                "loss": report.loss.to_json()["value"],
                "causes": sorted({f.cause for f in report.findings if f.severity == ERROR}),
            }
        )
        merged.warnings.extend(w for w in report.warnings if w not in merged.warnings)
    for finding in by_key.values():
        batches = finding.extra["batches"]
        if len(batches) < len(reports):
            finding.message += f" (batches {', '.join(map(str, batches))} of {len(reports)})"
    merged.findings = list(by_key.values())
    merged.stats = {"batches": len(reports)}
    return merged


__all__ = [
    "Edge",
    "LossInfo",
    "ModuleState",
    "NO_GRAD_FN_ERROR",
    "Report",
    "RunError",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "load_schema",
    "merge_reports",
]
