"""Static scan of ``forward`` code for constructs that stop gradient.

``python -m diagnostics.lint PATH...`` parses each file (``ast``, nothing is
imported or run), starts from every class's ``forward`` and follows the functions it
calls in the same file (``self.method(...)`` and module-level functions), and reports:

* grad-disabled blocks — ``with torch.no_grad()``, ``with torch.inference_mode()``,
  ``torch.set_grad_enabled(False)`` and the decorators: *info* when the block only
  calls modules named like an encoder / vision tower (the LLaVA pattern, fine when
  nothing trainable is upstream), *warning* otherwise;
* cuts — ``.detach()``, ``.data``, ``.numpy()``, ``.tolist()``, ``.item()``,
  ``torch.tensor(x)`` / ``torch.as_tensor(x)`` / ``torch.from_numpy(x)`` re-wraps:
  *warning* when the value flows to what the function returns, *info* otherwise.

Output lines read ``path:line: severity: message``; ``--json`` prints
``{"version": 1, "findings": [...]}``. Exit status 1 when any finding is a warning
or an error, else 0; 2 when a path cannot be read.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .source import display_path, dotted_name, grad_disable_kind, parse_file

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_CANNOT_RUN = 2

#: attribute names of modules that are normally frozen feature extractors.
ENCODER_NAME = re.compile(r"enc|vision|visual|tower|image|ocr|sam|clip|vit|backbone|teacher|pixel", re.I)

_CUT_METHODS = {"detach": ".detach()", "detach_": ".detach_()", "numpy": ".numpy()", "tolist": ".tolist()", "item": ".item()"}
_REWRAPS = {"tensor", "as_tensor", "from_numpy"}


@dataclass(frozen=True)
class LintFinding:
    """One static finding.

    Attributes:
        file: path of the file.
        line: 1-based line.
        severity: ``"warning"`` or ``"info"``.
        kind: ``grad_disabled`` or ``detached`` (the engine's cause names).
        message: what and why.
        function: the function it is in (``Class.method``).
    """

    file: str
    line: int
    severity: str
    kind: str
    message: str
    function: str

    def to_text(self) -> str:
        """``path:line: severity: message``."""
        return f"{display_path(self.file)}:{self.line}: {self.severity}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": display_path(self.file),
            "line": self.line,
            "severity": self.severity,
            "kind": self.kind,
            "message": self.message,
            "function": self.function,
        }


def _self_callees(nodes: Iterable[ast.AST]) -> list[str]:
    """Names X of ``self.X(...)`` / ``self.X.y(...)`` calls among ``nodes``."""
    names = []
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                name = dotted_name(sub.func)
                if name and name.startswith("self.") and name.count(".") >= 1:
                    names.append(name.split(".")[1])
    return names


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _target_names(target: ast.AST) -> set[str]:
    """Names bound by an assignment target (``a``, ``a, b``); not ``self`` in ``self.x = ...``."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(e) for e in target.elts)) if target.elts else set()
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return set()


class _FunctionLinter:
    """Lint one function body."""

    def __init__(self, filename: str, qualname: str, func: ast.AST, class_name: Optional[str]) -> None:
        self.filename = filename
        self.qualname = qualname
        self.func = func
        self.class_name = class_name or ""
        self.findings: list[LintFinding] = []

    def add(self, line: int, severity: str, kind: str, message: str) -> None:
        self.findings.append(LintFinding(self.filename, line, severity, kind, message, self.qualname))

    def run(self) -> list[LintFinding]:
        func = self.func
        for decorator in getattr(func, "decorator_list", []):
            kind = grad_disable_kind(decorator)
            if kind is None:
                continue
            text = f"@{ast.unparse(decorator)}"
            if kind == "inference_mode":
                self.add(
                    decorator.lineno, "warning", "grad_disabled",
                    f"{text} on {self.qualname}: everything it returns is an inference tensor; a trainable "
                    "layer fed with it raises 'Inference tensors cannot be saved for backward', and "
                    "nothing inside gets gradient",
                )
            else:
                severity = "info" if ENCODER_NAME.search(self.class_name) else "warning"
                self.add(
                    decorator.lineno, severity, "grad_disabled",
                    f"{text} on {self.qualname}: nothing it computes gets or passes gradient"
                    + (" (fine for a frozen encoder with nothing trainable upstream)" if severity == "info" else ""),
                )
        body_nodes = list(ast.walk(func))
        for node in body_nodes:
            if isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    kind = grad_disable_kind(item.context_expr)
                    if kind is not None:
                        self._with_block(node, item.context_expr)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                if grad_disable_kind(node.value) == "set_grad_enabled":
                    self.add(
                        node.lineno, "warning", "grad_disabled",
                        f"`{ast.unparse(node.value)}` in {self.qualname}: grad stays disabled for everything "
                        "after it (including the caller) until re-enabled — prefer a `with` block",
                    )
        self._cuts()
        return self.findings

    def _with_block(self, node: ast.AST, expr: ast.AST) -> None:
        callees = _self_callees(getattr(node, "body", []))
        unique = list(dict.fromkeys(callees))
        statement = f"with {ast.unparse(expr)}"
        others = [c for c in unique if not ENCODER_NAME.search(c)]
        if unique and not others:
            self.add(
                node.lineno, "info", "grad_disabled",
                f"`{statement}` around {', '.join('self.' + c for c in unique)} only — fine for a frozen "
                "encoder with nothing trainable upstream",
            )
        elif not unique:
            self.add(
                node.lineno, "info", "grad_disabled",
                f"`{statement}` in {self.qualname} calls no submodule — fine unless its result must carry gradient",
            )
        else:
            self.add(
                node.lineno, "warning", "grad_disabled",
                f"`{statement}` runs {', '.join('self.' + c for c in others)} with grad disabled: if "
                f"{'it is' if len(others) == 1 else 'they are'} trainable, or must carry gradient back to "
                "something trainable, no gradient flows — keep only frozen encoders inside",
            )

    def _cuts(self) -> None:
        func = self.func
        cuts: list[tuple[ast.AST, str]] = []
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr = node.func.attr
                if attr in _CUT_METHODS and not node.args:
                    cuts.append((node, _CUT_METHODS[attr]))
                elif attr in _REWRAPS and node.args:
                    base = dotted_name(node.func.value)
                    arg = node.args[0]
                    if base in ("torch", "th") and not isinstance(arg, (ast.Constant, ast.List, ast.Tuple, ast.ListComp)):
                        cuts.append((node, f"torch.{attr}(...) re-wrap"))
            elif isinstance(node, ast.Attribute) and node.attr == "data" and isinstance(node.ctx, ast.Load):
                cuts.append((node, ".data"))
        if not cuts:
            return
        tainted_by: dict[int, set[str]] = {}
        statements = [n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Return))]
        for cut, _ in cuts:
            names: set[str] = set()
            for stmt in statements:
                value = getattr(stmt, "value", None)
                if value is None or not any(sub is cut for sub in ast.walk(value)):
                    continue
                if isinstance(stmt, ast.Return):
                    names.add("<return>")
                else:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]  # type: ignore[attr-defined]
                    for t in targets:
                        names |= _target_names(t)
            tainted_by[id(cut)] = names
        # Propagate through assignments until nothing changes (order-insensitive).
        for cut, _ in cuts:
            names = tainted_by[id(cut)]
            changed = True
            while changed:
                changed = False
                for stmt in statements:
                    value = getattr(stmt, "value", None)
                    if value is None or not (_names_in(value) & names):
                        continue
                    if isinstance(stmt, ast.Return):
                        if "<return>" not in names:
                            names.add("<return>")
                            changed = True
                        continue
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]  # type: ignore[attr-defined]
                    for t in targets:
                        new = _target_names(t) - names
                        if new:
                            names |= new
                            changed = True
        # A re-wrap (torch.tensor(x)) is only suspicious when x itself came out of a cut:
        # torch.tensor(list_of_ints) is ordinary bookkeeping.
        cut_tainted: set[str] = set()
        for cut, label in cuts:
            if "re-wrap" not in label:
                cut_tainted |= tainted_by[id(cut)]
        for cut, label in cuts:
            flows = "<return>" in tainted_by[id(cut)]
            if "re-wrap" in label and flows:
                arg = cut.args[0]  # type: ignore[attr-defined]
                inner_cut = any(sub is other for sub in ast.walk(arg) for other, _ in cuts)
                flows = inner_cut or bool(_names_in(arg) & cut_tainted)
            code = ast.unparse(cut)
            if len(code) > 60:
                code = code[:57] + "..."
            if flows:
                self.add(
                    cut.lineno, "warning", "detached",
                    f"{label} in {self.qualname} (`{code}`) flows to what it returns: gradient stops there",
                )
            else:
                self.add(
                    cut.lineno, "info", "detached",
                    f"{label} in {self.qualname} (`{code}`): no gradient through this value (fine for bookkeeping)",
                )


def lint_tree(tree: ast.Module, filename: str) -> list[LintFinding]:
    """Lint an already-parsed module."""
    functions: dict[str, ast.AST] = {
        n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    findings: list[LintFinding] = []
    emitted: set[int] = set()
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    by_name = {c.name: c for c in classes}

    def resolve(cls: ast.ClassDef, depth: int = 0) -> dict[str, tuple[str, ast.AST]]:
        """Methods visible on ``cls``: its own, then those of bases defined in this file."""
        methods: dict[str, tuple[str, ast.AST]] = {
            m.name: (cls.name, m) for m in cls.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if depth < 10:
            for base in cls.bases:
                base_cls = by_name.get(dotted_name(base) or "")
                if base_cls is not None and base_cls is not cls:
                    for k, v in resolve(base_cls, depth + 1).items():
                        methods.setdefault(k, v)
        return methods

    plain_bases = {"Module", "nn.Module", "torch.nn.Module", "object"}
    for cls in classes:
        methods = resolve(cls)
        roots = [methods["forward"]] if "forward" in methods else []
        # A subclass of a model defined elsewhere (class Mine(MEMModel)) may override methods the
        # inherited forward calls: every method it defines is a root.
        inherits_forward = "forward" not in methods and any(
            (dotted_name(b) or "") not in plain_bases and dotted_name(b) not in by_name for b in cls.bases
        )
        if inherits_forward:
            roots += [
                (cls.name, m) for m in cls.body
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name != "forward"
                and not m.name.startswith("__")
            ]
        if not roots:
            continue
        queue: list[tuple[str, ast.AST, Optional[str]]] = [(f"{owner}.{func.name}", func, owner) for owner, func in roots]
        visited: set[int] = set()
        while queue:
            qualname, func, class_name = queue.pop()
            if id(func) in visited:
                continue
            visited.add(id(func))
            if id(func) not in emitted:
                emitted.add(id(func))
                findings.extend(_FunctionLinter(filename, qualname, func, class_name).run())
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                name = dotted_name(node.func)
                if name is None:
                    continue
                if name.startswith("self.") and name.count(".") == 1 and name[5:] in methods:
                    owner, method = methods[name[5:]]
                    queue.append((f"{owner}.{name[5:]}", method, owner))
                elif "." not in name and name in functions:
                    queue.append((name, functions[name], None))
    findings.sort(key=lambda f: (f.file, f.line))
    return findings


_LINT_CACHE: dict[str, tuple[float, list[LintFinding]]] = {}


def lint_file(path: str | os.PathLike[str]) -> list[LintFinding]:
    """Lint one file. Raises ``OSError`` when it cannot be read; syntax errors give no findings."""
    filename = os.fspath(path)
    mtime = Path(filename).stat().st_mtime  # raises OSError for a missing file
    cached = _LINT_CACHE.get(filename)
    if cached is not None and cached[0] == mtime:
        return list(cached[1])
    tree = parse_file(filename)
    findings = lint_tree(tree, filename) if tree is not None else []
    _LINT_CACHE[filename] = (mtime, findings)
    return list(findings)


def lint_paths(paths: Sequence[str | os.PathLike[str]]) -> list[LintFinding]:
    """Lint files and directories (``*.py`` below them, skipping hidden/venv dirs)."""
    findings: list[LintFinding] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            for file in sorted(p.rglob("*.py")):
                if any(part.startswith(".") or part in ("__pycache__", "site-packages") for part in file.parts[len(p.parts):]):
                    continue
                findings.extend(lint_file(file))
        else:
            findings.extend(lint_file(p))
    return findings


def lint_for_report(model: Any, findings: Sequence[Any], classifier: Any) -> list[LintFinding]:
    """Lint findings for the files a diagnosis involves.

    The files are those defining the model's own (user-code) classes plus the files
    named by engine findings (library files included: that is where a decorator may
    sit). Only findings of severity warning, or at a line an engine finding names,
    are kept, so the report stays short.
    """
    import inspect

    files: set[str] = set()
    for module in model.modules():
        try:
            filename = inspect.getsourcefile(type(module))
        except TypeError:
            continue
        if filename and classifier.is_user(filename):
            files.add(os.path.abspath(filename))
    class_names = {klass.__name__ for module in model.modules() for klass in type(module).__mro__}
    named_lines: set[tuple[str, int]] = set()
    for finding in findings:
        if finding.file:
            path = os.path.abspath(finding.file)
            files.add(path)
            if finding.line:
                named_lines.add((path, finding.line))
    out: list[LintFinding] = []
    for filename in sorted(files):
        try:
            for lint in lint_file(filename):
                owner = lint.function.split(".")[0] if "." in lint.function else None
                if owner is not None and owner not in class_names:
                    continue  # another class in the same file: not part of this model
                if lint.severity != "info" or (os.path.abspath(lint.file), lint.line) in named_lines:
                    out.append(lint)
        except OSError:
            continue
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diagnostics.lint`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m diagnostics.lint",
        description=(
            "Statically scan forward() methods (and the same-file functions they call) for code that "
            "stops gradient: no_grad / inference_mode / set_grad_enabled(False) blocks and decorators, "
            ".detach(), .data, .numpy(), .tolist(), .item() and torch.tensor re-wraps. Nothing is imported "
            "or executed. For the runtime truth use `python -m diagnostics.grad_flow`."
        ),
        epilog=(
            "examples:\n"
            "  python -m diagnostics.lint my_model.py\n"
            "  python -m diagnostics.lint src/ --json > lint.json\n\n"
            "severities: info = usually fine (e.g. no_grad around a frozen vision encoder only);\n"
            "warning = gradient probably stops here.\n"
            "exit status: 0 no warning, 1 at least one warning, 2 a path could not be read."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Python files or directories to scan")
    parser.add_argument("--json", action="store_true", help="print JSON ({'version': 1, 'findings': [...]})")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        findings = lint_paths(args.paths)
    except OSError as exc:
        print(f"diagnostics.lint: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.json:
        print(json.dumps({"version": 1, "findings": [f.to_json() for f in findings]}, indent=2))
    else:
        for finding in findings:
            print(finding.to_text())
    return EXIT_FINDINGS if any(f.severity in ("warning", "error") for f in findings) else EXIT_OK


__all__ = [
    "ENCODER_NAME",
    "EXIT_CANNOT_RUN",
    "EXIT_FINDINGS",
    "EXIT_OK",
    "LintFinding",
    "build_parser",
    "lint_file",
    "lint_for_report",
    "lint_paths",
    "lint_tree",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
