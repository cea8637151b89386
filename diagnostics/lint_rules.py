"""The rules of :mod:`diagnostics.lint`: what one function's ``ast`` says about gradient.

:func:`lint_tree` starts from every class's ``forward`` (and, for a subclass of a model
defined elsewhere, every method it overrides), follows ``self.method(...)`` and same-file
function calls, and runs :class:`_FunctionLinter` on each function reached. That walks the
statements in order with the grad context in effect, so the *innermost* ``no_grad`` /
``inference_mode`` / ``set_grad_enabled`` / ``enable_grad`` decides which submodule calls
run with grad off, and tracks cuts (``.detach()``, ``.data``, numpy round trips) to what
the function returns. Pure ``ast``: no torch, nothing imported or run.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .syntax import canonical_name, display_path, dotted_name, grad_effect, import_aliases

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


def _rewraps_a_value(arg: ast.AST) -> bool:
    """``torch.tensor(x)`` re-wraps a value; ``torch.tensor([1, 2])`` builds a constant."""
    return not isinstance(arg, (ast.Constant, ast.List, ast.Tuple, ast.ListComp))


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


@dataclass
class _Disabler:
    """A construct that switches grad off, and the submodule calls it decides.

    A call is attributed to the innermost grad context around it only: in
    ``with no_grad(): with enable_grad(): self.proj(x)`` the ``no_grad`` decides nothing.
    """

    node: ast.AST  # the With statement, the call statement, or the decorator expression
    expr: ast.AST  # the grad expression itself
    kind: str  # no_grad / inference_mode / set_grad_enabled
    form: str  # with / call / decorator
    callees: list[str] = field(default_factory=list)  # X of self.X(...) run with grad off by this one
    restored: bool = False  # call form: grad is switched back on later in the function


def _is_statement_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], (ast.stmt, ast.excepthandler, ast.match_case))


class _FunctionLinter:
    """Lint one function body."""

    def __init__(
        self, filename: str, qualname: str, func: ast.AST, class_name: Optional[str],
        aliases: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.filename = filename
        self.qualname = qualname
        self.func = func
        self.class_name = class_name or ""
        self.aliases = dict(aliases or {})
        self.findings: list[LintFinding] = []
        self.disablers: list[_Disabler] = []

    def add(self, line: int, severity: str, kind: str, message: str) -> None:
        self.findings.append(LintFinding(self.filename, line, severity, kind, message, self.qualname))

    def run(self) -> list[LintFinding]:
        state: Optional[_Disabler] = None
        for decorator in getattr(self.func, "decorator_list", []):
            effect = grad_effect(decorator, self.aliases)
            if effect is None:
                continue
            if effect[0] == "off":
                state = _Disabler(decorator, decorator, effect[1], "decorator")
                self.disablers.append(state)
            else:  # @enable_grad() below @no_grad() runs inside it: the no_grad decides nothing
                if state is not None:
                    self.disablers.remove(state)
                state = None
        self._walk(list(getattr(self.func, "body", [])), state)
        for disabler in self.disablers:
            getattr(self, f"_report_{disabler.form}")(disabler)
        self._cuts()
        return self.findings

    # ------------------------------------------------------------------ grad state
    def _calls(self, node: ast.AST, state: Optional[_Disabler]) -> None:
        """Attribute the ``self.X(...)`` calls in an expression to the grad context in effect."""
        if state is None:
            return
        state.callees.extend(_self_callees([node]))

    def _walk(self, statements: list[ast.stmt], state: Optional[_Disabler]) -> Optional[_Disabler]:
        """Walk statements in order with the grad context in effect; return the one in effect after."""
        for stmt in statements:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # A nested function runs when called, not here: scan it with grad as its caller has it.
                self._walk(stmt.body, None)
                continue
            if isinstance(stmt, ast.ClassDef):
                continue
            if isinstance(stmt, (ast.With, ast.AsyncWith)):
                inner, grad_items = state, False
                for item in stmt.items:  # `with a(), b():` enters a then b: the later one is inner
                    self._calls(item.context_expr, inner)
                    effect = grad_effect(item.context_expr, self.aliases)
                    if effect is None:
                        continue
                    grad_items = True
                    if effect[0] == "off":
                        inner = _Disabler(stmt, item.context_expr, effect[1], "with")
                        self.disablers.append(inner)
                    else:
                        inner = None
                end = self._walk(stmt.body, inner)
                # Leaving a grad context restores the mode it found; a plain `with` keeps what its body set.
                state = state if grad_items else end
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                call = stmt.value
                name = canonical_name(call.func, self.aliases) or ""
                if name.rsplit(".", 1)[-1] in ("set_grad_enabled", "_set_grad_enabled"):
                    for arg in [*call.args, *(k.value for k in call.keywords)]:
                        self._calls(arg, state)
                    effect = grad_effect(call, self.aliases)
                    turns_on = effect is not None and effect[0] == "on"
                    literal = bool(call.args or call.keywords) and isinstance(
                        (call.args or [k.value for k in call.keywords])[0], ast.Constant
                    )
                    if turns_on or (not literal and state is not None and state.form == "call"):
                        # set_grad_enabled(True), or set_grad_enabled(prev) restoring an earlier switch-off
                        if state is not None and state.form == "call":
                            state.restored = True
                        state = None
                    else:
                        state = _Disabler(stmt, call, "set_grad_enabled", "call")
                        self.disablers.append(state)
                    continue
            # Any other statement: its own expressions run in the current context, then its bodies.
            for _, value in ast.iter_fields(stmt):
                if _is_statement_list(value):
                    continue
                for node in value if isinstance(value, list) else [value]:
                    if isinstance(node, ast.AST):
                        self._calls(node, state)
            ends: list[Optional[_Disabler]] = []
            for _, value in ast.iter_fields(stmt):
                if not _is_statement_list(value):
                    continue
                for entry in value:
                    if isinstance(entry, (ast.excepthandler, ast.match_case)):
                        ends.append(self._walk(entry.body, state))  # type: ignore[attr-defined]
                if isinstance(value[0], ast.stmt):
                    ends.append(self._walk(value, state))
            changed = [end for end in ends if end is not state]
            if changed:  # a branch switched grad: after the statement it may be in that state
                state = changed[-1]
        return state

    # ------------------------------------------------------------------ findings
    def _split(self, disabler: _Disabler) -> tuple[list[str], list[str]]:
        unique = list(dict.fromkeys(disabler.callees))
        return unique, [c for c in unique if not ENCODER_NAME.search(c)]

    def _report_decorator(self, disabler: _Disabler) -> None:
        text = f"@{ast.unparse(disabler.expr)}"
        line = disabler.node.lineno  # type: ignore[attr-defined]
        if disabler.kind == "inference_mode":
            self.add(
                line, "warning", "grad_disabled",
                f"{text} on {self.qualname}: everything it returns is an inference tensor; a trainable "
                "layer fed with it raises 'Inference tensors cannot be saved for backward', and "
                "nothing inside gets gradient",
            )
            return
        unique, others = self._split(disabler)
        frozen = bool(ENCODER_NAME.search(self.class_name)) or (bool(unique) and not others)
        severity = "info" if frozen else "warning"
        self.add(
            line, severity, "grad_disabled",
            f"{text} on {self.qualname}: nothing it computes gets or passes gradient"
            + (" (fine for a frozen encoder with nothing trainable upstream)" if frozen else ""),
        )

    def _report_with(self, disabler: _Disabler) -> None:
        self._report_block(disabler, f"with {ast.unparse(disabler.expr)}")

    def _report_call(self, disabler: _Disabler) -> None:
        statement = ast.unparse(disabler.expr)
        if not disabler.restored:
            self.add(
                disabler.node.lineno, "warning", "grad_disabled",  # type: ignore[attr-defined]
                f"`{statement}` in {self.qualname}: grad stays disabled for everything after it "
                "(including the caller) until re-enabled — prefer a `with` block",
            )
            return
        self._report_block(disabler, statement)

    def _report_block(self, disabler: _Disabler, statement: str) -> None:
        line = disabler.node.lineno  # type: ignore[attr-defined]
        unique, others = self._split(disabler)
        if unique and not others:
            self.add(
                line, "info", "grad_disabled",
                f"`{statement}` around {', '.join('self.' + c for c in unique)} only — fine for a frozen "
                "encoder with nothing trainable upstream",
            )
        elif not unique:
            self.add(
                line, "info", "grad_disabled",
                f"`{statement}` in {self.qualname} runs no submodule with grad disabled — fine unless its "
                "result must carry gradient",
            )
        else:
            self.add(
                line, "warning", "grad_disabled",
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
                    base = canonical_name(node.func.value, self.aliases)
                    if base in ("torch", "th") and _rewraps_a_value(node.args[0]):
                        cuts.append((node, f"torch.{attr}(...) re-wrap"))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                # from torch import from_numpy; from_numpy(x)
                name = canonical_name(node.func, self.aliases) or ""
                if name.startswith("torch.") and name[6:] in _REWRAPS and _rewraps_a_value(node.args[0]):
                    cuts.append((node, f"{name}(...) re-wrap"))
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
    aliases = import_aliases(tree)
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
                findings.extend(_FunctionLinter(filename, qualname, func, class_name, aliases).run())
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



__all__ = ["ENCODER_NAME", "LintFinding", "lint_tree"]
