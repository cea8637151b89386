"""Source locations: which file is the user's, and which statement disabled grad.

Two jobs, both about pointing a human at a line:

* classify a file as *user* code, a third-party *library*, *torch* itself or this
  package (*internal*), so that a finding names the first frame the user wrote;
* statically scan a function (``ast``) for the constructs that disable autograd —
  ``with torch.no_grad()``, ``with torch.inference_mode()``,
  ``torch.set_grad_enabled(False)`` and the ``@torch.no_grad()`` /
  ``@torch.inference_mode()`` decorators — and return the one that encloses the line
  a live frame is executing.

Nothing here imports a model; everything works from file names, code objects and
frames, so it is testable on plain functions.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sysconfig
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

from .syntax import UnparsableSourceError, _is_literal, decode_source, display_path, dotted_name, grad_disable_kind, import_aliases

FileKind = Literal["user", "library", "torch", "internal"]

# torch's folder without importing torch (find_spec reads the path only): `python -m
# diagnostics.lint --help` must not pay seconds for an import it never uses.
_TORCH_DIR = os.path.dirname(os.path.abspath(importlib.util.find_spec("torch").origin or "torch")) + os.sep
_INTERNAL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIRS = tuple(
    {
        os.path.abspath(p) + os.sep
        for p in (sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib"))
        if p
    }
)
# Directory names that mark installed third-party code whatever the user roots are.
_INSTALLED_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


@dataclass(frozen=True)
class SourceLocation:
    """A file and line, with the function and the source text of that line.

    Attributes:
        file: absolute path of the file.
        line: 1-based line number.
        function: name of the function executing there, if known.
        code: the stripped source text of ``line``, if readable.
    """

    file: str
    line: int
    function: Optional[str] = None
    code: Optional[str] = None

    def display(self) -> str:
        """``relative/path.py:LINE`` (relative to the working directory when inside it)."""
        return f"{display_path(self.file)}:{self.line}"


@dataclass(frozen=True)
class GradDisableSite:
    """A statement that turns autograd off.

    Attributes:
        kind: ``"no_grad"``, ``"inference_mode"`` or ``"set_grad_enabled"``.
        form: ``"with"``, ``"decorator"`` or ``"call"``.
        location: where the statement is (the ``with`` line, decorator line or call line).
        statement: short rendering such as ``with torch.no_grad()``.
    """

    kind: str
    form: str
    location: SourceLocation
    statement: str


class CodeClassifier:
    """Decide whether a file is the user's code, a library, torch, or this package.

    Args:
        user_roots: directories holding the user's code. Defaults to the current
            working directory. A file under a ``site-packages``/``dist-packages``
            directory is a library even when it lies inside a user root (virtual
            environments often live inside the project).
    """

    def __init__(self, user_roots: Optional[Sequence[str | os.PathLike[str]]] = None) -> None:
        roots = list(user_roots) if user_roots else [os.getcwd()]
        self.user_roots: tuple[str, ...] = tuple(
            os.path.abspath(os.fspath(r)).rstrip(os.sep) + os.sep for r in roots
        )
        self._cache: dict[str, FileKind] = {}

    def kind(self, filename: str) -> FileKind:
        """Classify ``filename`` (a path as found in ``code.co_filename``)."""
        cached = self._cache.get(filename)
        if cached is not None:
            return cached
        result = self._classify(filename)
        self._cache[filename] = result
        return result

    def _classify(self, filename: str) -> FileKind:
        if not filename or filename.startswith("<"):
            # <frozen importlib>, <string>, <stdin>: never the user's statement of record.
            return "torch"
        path = os.path.abspath(filename)
        if path.startswith(_INTERNAL_DIR):
            return "internal"
        if path.startswith(_TORCH_DIR):
            return "torch"
        if any(marker in path for marker in _INSTALLED_MARKERS):
            return "library"
        if any(path.startswith(d) for d in _STDLIB_DIRS):
            return "torch"  # contextlib, functools...: plumbing, like torch
        if any(path.startswith(root) for root in self.user_roots):
            return "user"
        return "library"

    def is_user(self, filename: str) -> bool:
        """True when ``filename`` is the user's own code."""
        return self.kind(filename) == "user"


def iter_frames(start: Optional[types.FrameType]) -> Iterator[types.FrameType]:
    """Yield ``start`` and its callers, innermost first."""
    frame = start
    while frame is not None:
        yield frame
        frame = frame.f_back


def frame_location(frame: types.FrameType) -> SourceLocation:
    """The location a live frame is executing."""
    code = frame.f_code
    line = frame.f_lineno or code.co_firstlineno
    return SourceLocation(code.co_filename, line, code.co_name, source_line(code.co_filename, line))


def first_frame(
    frames: Iterable[types.FrameType],
    classifier: CodeClassifier,
    prefer: Sequence[FileKind] = ("user", "library"),
) -> Optional[types.FrameType]:
    """The first frame whose file kind is the first kind in ``prefer`` that occurs."""
    best: dict[str, types.FrameType] = {}
    for frame in frames:
        kind = classifier.kind(frame.f_code.co_filename)
        if kind in prefer and kind not in best:
            best[kind] = frame
            if kind == prefer[0]:
                break
    for kind in prefer:
        if kind in best:
            return best[kind]
    return None


# --------------------------------------------------------------------------- ast


@dataclass
class _ParsedFile:
    mtime: float
    lines: list[str]
    tree: Optional[ast.Module]
    #: (function, first line, current line) -> :func:`scan_function`'s answer for this version of the file.
    scans: dict[tuple[str, int, Optional[int]], Optional["GradDisableSite"]] = field(default_factory=dict)


_PARSED: dict[str, _ParsedFile] = {}


def _parsed(filename: str) -> Optional[_ParsedFile]:
    try:
        mtime = os.stat(filename).st_mtime
    except OSError:
        return None
    cached = _PARSED.get(filename)
    if cached is not None and cached.mtime == mtime:
        return cached
    try:
        data = Path(filename).read_bytes()
    except OSError:
        return None
    tree: Optional[ast.Module] = None
    try:
        text = decode_source(data, filename)  # honours a BOM and an encoding cookie
    except UnparsableSourceError:
        text = data.decode("utf-8", errors="replace")
    else:
        try:
            tree = ast.parse(text, filename=filename)
        except (SyntaxError, ValueError, RecursionError):
            tree = None
    parsed = _ParsedFile(mtime, text.splitlines(), tree)
    _PARSED[filename] = parsed
    return parsed


def parse_file(filename: str) -> Optional[ast.Module]:
    """The cached ``ast`` of a file, or ``None`` when it cannot be read or parsed."""
    parsed = _parsed(filename)
    return parsed.tree if parsed else None


def source_line(filename: str, line: int) -> Optional[str]:
    """The stripped text of ``line`` in ``filename``, or ``None``."""
    parsed = _parsed(filename)
    if parsed is None or not 1 <= line <= len(parsed.lines):
        return None
    return parsed.lines[line - 1].strip()


def _render(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover - ast.unparse handles every parsed node
        return "<expression>"


def _walk_own_body(func: ast.AST) -> Iterator[ast.AST]:
    """Walk a function's body without descending into nested functions or classes."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
    stack: list[ast.AST] = [n for n in getattr(func, "body", []) if not isinstance(n, nested)]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            stack.append(child)


def find_function(tree: ast.Module, name: str, first_line: int) -> Optional[ast.AST]:
    """The (Async)FunctionDef named ``name`` whose code starts at ``first_line``.

    A decorated function's code object starts at its first decorator, an undecorated
    one at ``def``. Falls back to the innermost function of that name containing
    ``first_line``.
    """
    fallback: Optional[ast.AST] = None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != name:
            continue
        starts = [node.lineno] + [d.lineno for d in node.decorator_list]
        if first_line in starts:
            return node
        if node.lineno <= first_line <= (node.end_lineno or node.lineno):
            fallback = node
    return fallback


def scan_function(
    filename: str, function: str, first_line: int, current_line: Optional[int]
) -> Optional[GradDisableSite]:
    """Find the construct in a function that has grad disabled at ``current_line``.

    Preference: the innermost ``with`` block around ``current_line``, then the last
    ``set_grad_enabled(False)`` call before it (unless re-enabled after), then a
    decorator. With ``current_line`` ``None`` (the function already returned, or the
    caller only knows the function), any grad-disabling ``with`` or call in the body
    counts, first one first, after the decorators.

    Args:
        filename: file of the function.
        function: the function's name (``code.co_name``).
        first_line: ``code.co_firstlineno``.
        current_line: the line the frame is executing, or ``None``.

    Returns:
        The site, or ``None`` when the function holds no such construct.
    """
    parsed = _parsed(filename)
    if parsed is None or parsed.tree is None:
        return None
    # Answers are immutable and depend only on this version of the file: a training loop
    # diagnosing every N steps scans the same frames each time.
    key = (function, first_line, current_line)
    if key not in parsed.scans:
        parsed.scans[key] = _scan_function(parsed.tree, filename, function, first_line, current_line)
    return parsed.scans[key]


def _scan_function(
    tree: ast.Module, filename: str, function: str, first_line: int, current_line: Optional[int]
) -> Optional[GradDisableSite]:
    if function == "<module>":
        func_node: Optional[ast.AST] = tree
    else:
        func_node = find_function(tree, function, first_line)
    if func_node is None:
        return None

    def site(kind: str, form: str, node: ast.AST, statement: str) -> GradDisableSite:
        line = node.lineno  # type: ignore[attr-defined]
        return GradDisableSite(
            kind, form, SourceLocation(filename, line, function, source_line(filename, line)), statement
        )

    aliases = import_aliases(tree)  # from torch import no_grad as ng; import torch as T
    withs: list[tuple[ast.AST, ast.AST, str]] = []
    calls: list[tuple[ast.Call, str]] = []
    enables: list[ast.Call] = []
    for node in _walk_own_body(func_node):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                kind = grad_disable_kind(item.context_expr, aliases)
                if kind is not None:
                    withs.append((node, item.context_expr, kind))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            kind = grad_disable_kind(node.value, aliases)
            name = dotted_name(node.value.func) or ""
            if kind == "set_grad_enabled":
                calls.append((node.value, kind))
            elif name.rsplit(".", 1)[-1] in ("set_grad_enabled", "_set_grad_enabled"):
                enables.append(node.value)

    if current_line is not None:
        enclosing = [
            (w, expr, kind)
            for (w, expr, kind) in withs
            if w.lineno < current_line <= (w.end_lineno or w.lineno)  # type: ignore[attr-defined]
            or (w.lineno == current_line)  # type: ignore[attr-defined]
        ]
        if enclosing:
            w, expr, kind = max(enclosing, key=lambda t: t[0].lineno)  # type: ignore[attr-defined]
            return site(kind, "with", w, f"with {_render(expr)}")
        before = [c for c, _ in calls if c.lineno <= current_line]
        if before:
            last_off = max(before, key=lambda c: c.lineno)
            re_enabled = [e for e in enables if last_off.lineno < e.lineno <= current_line]
            if not re_enabled:
                return site("set_grad_enabled", "call", last_off, _render(last_off))
    decorators = getattr(func_node, "decorator_list", [])
    for decorator in decorators:
        kind = grad_disable_kind(decorator, aliases)
        if kind is not None:
            return site(kind, "decorator", decorator, f"@{_render(decorator)}")
    if current_line is None:
        candidates: list[tuple[int, GradDisableSite]] = []
        for w, expr, kind in withs:
            candidates.append((w.lineno, site(kind, "with", w, f"with {_render(expr)}")))  # type: ignore[attr-defined]
        for c, kind in calls:
            candidates.append((c.lineno, site(kind, "call", c, _render(c))))
        if candidates:
            return min(candidates, key=lambda t: t[0])[1]
    return None


def scan_callable(fn: object) -> Optional[GradDisableSite]:
    """Scan a function or method (unwrapping decorators) for grad-disabling constructs."""
    seen = 0
    target = fn
    # torch's decorators keep the original under __wrapped__ (functools.wraps).
    while hasattr(target, "__wrapped__") and seen < 10:
        target = target.__wrapped__  # type: ignore[attr-defined]
        seen += 1
    target = getattr(target, "__func__", target)
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    return scan_function(code.co_filename, code.co_name, code.co_firstlineno, None)


def scan_frame(frame: types.FrameType) -> Optional[GradDisableSite]:
    """Scan the function a live frame executes, at the line it is executing."""
    code = frame.f_code
    return scan_function(code.co_filename, code.co_name, code.co_firstlineno, frame.f_lineno)


def _grad_switch(call: ast.Call) -> Optional[tuple[str, str]]:
    """Classify a statement-level call as a grad switch: ``("off", kind)``, ``("restore", "")`` or ``None``.

    Off: ``set_grad_enabled(False)`` (a literal: a variable is the usual way to restore
    a saved mode), or ``__enter__()`` of ``no_grad()`` / ``inference_mode()`` /
    ``set_grad_enabled(False)``. Restore: ``set_grad_enabled(<anything else>)``,
    ``enable_grad().__enter__()``, or any ``__exit__(...)``.
    """
    name = dotted_name(call.func) or ""
    tail = name.rsplit(".", 1)[-1]
    if tail in ("set_grad_enabled", "_set_grad_enabled"):
        mode = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return ("off", "set_grad_enabled") if _is_literal(mode, False) else ("restore", "")
    if isinstance(call.func, ast.Attribute) and call.func.attr == "__exit__":
        return ("restore", "")
    if isinstance(call.func, ast.Attribute) and call.func.attr == "__enter__":
        inner = call.func.value
        kind = grad_disable_kind(inner) if isinstance(inner, ast.Call) else None
        if kind is not None:
            return ("off", kind)
        if isinstance(inner, ast.Call) and (dotted_name(inner.func) or "").endswith("enable_grad"):
            return ("restore", "")
    return None


def unrestored_grad_switches(filename: str) -> list[GradDisableSite]:
    """Statements in ``filename`` that switch grad off and are not undone in the same function.

    ``torch.set_grad_enabled(False)`` or ``torch.no_grad().__enter__()`` with no later
    restore (``set_grad_enabled(True)`` / ``set_grad_enabled(saved)``, ``__exit__``) in
    the same function body (or module body): the mode stays off for whatever the
    caller runs next — an evaluation helper that leaves the training step without
    autograd. ``with`` blocks and decorators always restore, so they never count.
    """
    tree = parse_file(filename)
    if tree is None:
        return []
    found: list[GradDisableSite] = []
    bodies: list[tuple[ast.AST, str]] = [(tree, "<module>")]
    bodies += [
        (node, node.name) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    for body, function in bodies:
        switches: list[tuple[int, str, str, ast.Call]] = []
        for node in _walk_own_body(body):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                hit = _grad_switch(node.value)
                if hit is not None:
                    switches.append((node.lineno, hit[0], hit[1], node.value))
        switches.sort(key=lambda t: t[0])
        for index, (line, what, kind, call) in enumerate(switches):
            if what != "off" or any(w == "restore" for _, w, _, _ in switches[index + 1 :]):
                continue
            location = SourceLocation(filename, line, function, source_line(filename, line))
            found.append(GradDisableSite(kind, "call", location, _render(call)))
    return sorted(found, key=lambda site: site.location.line)


def user_source_files(
    classifier: "CodeClassifier", frames: Sequence[types.FrameType] = (), limit: int = 400
) -> list[str]:
    """The user's Python files: those of ``frames`` first (innermost first), then ``__main__``,
    then every loaded module under the user's roots (import order)."""
    import sys

    files: list[str] = []
    for frame in frames:
        filename = frame.f_code.co_filename
        if filename not in files and classifier.kind(filename) == "user":
            files.append(filename)
    main = sys.modules.get("__main__")
    for module in ([main] if main is not None else []) + list(sys.modules.values()):
        if len(files) >= limit:
            break
        filename = getattr(module, "__file__", None)
        if isinstance(filename, str) and filename.endswith(".py") and filename not in files:
            if classifier.kind(filename) == "user":
                files.append(filename)
    return files


def find_calls(filename: str, names: Sequence[str], flag_keywords: Sequence[str] = ()) -> list[tuple[SourceLocation, ast.Call]]:
    """Calls in ``filename`` to a function or method named one of ``names`` (any prefix), or
    passing one of ``flag_keywords`` as literal ``True`` (``TrainingArguments(gradient_checkpointing=True)``)."""
    tree = parse_file(filename)
    if tree is None:
        return []
    out: list[tuple[SourceLocation, ast.Call]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        tail = (dotted_name(node.func) or "").rsplit(".", 1)[-1]
        flagged = any(k.arg in flag_keywords and _is_literal(k.value, True) for k in node.keywords)
        if tail in names or flagged:
            out.append((SourceLocation(filename, node.lineno, None, source_line(filename, node.lineno)), node))
    return sorted(out, key=lambda t: t[0].line)


def attribute_assignment(cls: type, attr: str) -> Optional[SourceLocation]:
    """Where a class (or a base class) assigns ``self.<attr> = ...``, preferring ``__init__``.

    Used to point at the statement that stores a module in a plain container
    (``self.heads = [nn.Linear(...)]``) rather than at the call that later runs it.
    """
    import inspect

    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            filename = inspect.getsourcefile(klass)
            _, first = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        tree = parse_file(filename) if filename else None
        if tree is None or filename is None:
            continue
        class_node = next(
            (
                n for n in ast.walk(tree)
                if isinstance(n, ast.ClassDef) and n.name == klass.__name__
                and (n.lineno == first or any(d.lineno == first for d in n.decorator_list))
            ),
            None,
        )
        if class_node is None:
            continue
        hits: list[tuple[bool, int]] = []
        for func in class_node.body:
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                targets: list[ast.AST] = []
                if isinstance(node, ast.Assign):
                    targets = list(node.targets)
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    targets = [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == attr and dotted_name(target.value) == "self":
                        hits.append((func.name != "__init__", node.lineno))
        if hits:
            line = min(hits)[1]
            return SourceLocation(filename, line, None, source_line(filename, line))
    return None


def is_installed_path(path: str) -> bool:
    """True for files under ``site-packages`` / ``dist-packages``."""
    return any(marker in os.path.abspath(path) for marker in _INSTALLED_MARKERS)


__all__ = [
    "CodeClassifier",
    "attribute_assignment",
    "FileKind",
    "GradDisableSite",
    "SourceLocation",
    "display_path",
    "dotted_name",
    "find_calls",
    "find_function",
    "first_frame",
    "frame_location",
    "grad_disable_kind",
    "is_installed_path",
    "iter_frames",
    "parse_file",
    "scan_callable",
    "scan_frame",
    "scan_function",
    "source_line",
    "unrestored_grad_switches",
    "user_source_files",
]

