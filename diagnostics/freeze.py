"""Where was a parameter frozen? Dynamically while the model is built, or statically.

* :class:`FreezeWatch` — wrap model construction (``with FreezeWatch() as watch:
  model = build()``); it records, for every tensor set to ``requires_grad=False``
  (``p.requires_grad = False``, ``p.requires_grad_(False)``,
  ``module.requires_grad_(False)``), the first user frame that did it. The CLI wraps
  ``--factory`` functions and the MEMModel adapter's loading in one.
* :func:`static_freeze_sites` — for a model built elsewhere, scan the source of the
  model's own classes for freezing statements and match them to parameter names by
  the object they freeze (``self.parameters()`` covers everything in that module,
  ``self.proj.requires_grad_(False)`` covers ``proj``).
* :func:`script_freeze_sites` — for a stock model (no class of the user's) frozen by the
  user's own functions or script: the freezing statements of the user's files, matched by
  the attribute path they write (``model.model.visual.merger.requires_grad_(False)`` covers
  ``model.visual.merger``; a path spelled from a wrapper or an alias property matches as a
  dotted suffix).
"""

from __future__ import annotations

import ast
import inspect
import sys
import weakref
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .source import CodeClassifier, SourceLocation, dotted_name, frame_location, iter_frames, parse_file, source_line

_REQUIRES_GRAD_SET = torch.Tensor.requires_grad.__set__  # type: ignore[attr-defined]
_REQUIRES_GRAD_ = torch.Tensor.requires_grad_
_SET_GRAD = torch._C._set_grad_enabled

#: the last watch whose block ended with grad off, with the switch (see :func:`grad_left_off`).
_GRAD_LEFT_OFF: list[tuple[SourceLocation, "FreezeWatch"]] = []


class FreezeWatch(TorchFunctionMode):
    """Record where tensors were frozen while the code inside the block runs.

    Args:
        classifier: decides which frame is the user's (default: cwd is the user's tree).

    After the block, :meth:`sites_for` maps a model's parameter names to locations.
    It also watches grad-mode switches (``set_grad_enabled``, ``no_grad().__enter__()``):
    when the block ends with grad off, the switch that did it is kept for
    :func:`grad_left_off` (a factory that leaves grad off breaks the training step
    that follows, and the diagnosis names the line).
    """

    def __init__(self, classifier: Optional[CodeClassifier] = None) -> None:
        super().__init__()
        self.classifier = classifier or CodeClassifier()
        self._sites: dict[int, tuple[Any, SourceLocation]] = {}
        self.last_grad_off: Optional[SourceLocation] = None

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        _GRAD_LEFT_OFF.clear()
        if not torch.is_grad_enabled() and self.last_grad_off is not None:
            _GRAD_LEFT_OFF.append((self.last_grad_off, self))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if kwargs is None:
            kwargs = {}
        if func is _SET_GRAD:
            enabled = bool(args[0]) if args else True
            if enabled:
                self.last_grad_off = None
            elif torch.is_grad_enabled():  # an on -> off transition: keep the first switch
                self.last_grad_off = self._location()
        elif func is _REQUIRES_GRAD_ or func == _REQUIRES_GRAD_SET:
            value = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
            tensor = args[0] if args else None
            if isinstance(tensor, torch.Tensor):
                self._note(tensor, bool(value))
        return func(*args, **kwargs)

    def _note(self, tensor: torch.Tensor, requires_grad: bool) -> None:
        key = id(tensor)
        if requires_grad:
            self._sites.pop(key, None)
            return
        location = self._location()
        if location is not None:
            try:
                ref: Any = weakref.ref(tensor)
            except TypeError:
                ref = None
            self._sites[key] = (ref, location)

    def _location(self) -> Optional[SourceLocation]:
        """First user frame of the current stack, else first library frame."""
        library = None
        for frame in iter_frames(sys._getframe(2)):
            kind = self.classifier.kind(frame.f_code.co_filename)
            if kind == "user":
                return frame_location(frame)
            if kind == "library" and library is None:
                library = frame_location(frame)
        return library

    def sites_for(self, model: nn.Module) -> dict[str, SourceLocation]:
        """Parameter name -> where it was (last) frozen, for the model's frozen params."""
        out: dict[str, SourceLocation] = {}
        for name, p in model.named_parameters():
            entry = self._sites.get(id(p))
            if entry is None or p.requires_grad:
                continue
            ref, location = entry
            if ref is not None and ref() is not p:
                continue  # the id was reused by another tensor
            out[name] = location
        return out


def grad_left_off(model: Optional[nn.Module] = None) -> Optional[SourceLocation]:
    """The switch the last :class:`FreezeWatch` block left grad off by, while grad is still off.

    With ``model``, only when that block also froze some of the model's parameters
    (it built or loaded this model): a record from another block may be stale.
    """
    if not _GRAD_LEFT_OFF or torch.is_grad_enabled():
        return None
    location, watch = _GRAD_LEFT_OFF[-1]
    if model is not None and not watch.sites_for(model):
        return None
    return location


def _freeze_target(node: ast.AST) -> Optional[tuple[ast.AST, int]]:
    """If ``node`` freezes something, return (object expression, line)."""
    if isinstance(node, ast.Assign):
        for target in node.targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == "requires_grad"
                and isinstance(node.value, ast.Constant)
                and node.value.value is False
            ):
                return target.value, node.lineno
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        call = node.value
        if isinstance(call.func, ast.Attribute) and call.func.attr == "requires_grad_":
            arg = call.args[0] if call.args else next(
                (k.value for k in call.keywords if k.arg == "requires_grad"), None
            )
            if isinstance(arg, ast.Constant) and arg.value is False:
                return call.func.value, node.lineno
    return None


def _scope_of(expr: ast.AST, loops: dict[str, ast.AST]) -> Optional[str]:
    """Module path (relative to ``self``) an expression covers; ``""`` for all of self."""
    if isinstance(expr, ast.Name) and expr.id in loops:
        expr = loops[expr.id]
    if isinstance(expr, ast.Call):
        expr = expr.func
        if isinstance(expr, ast.Attribute) and expr.attr in ("parameters", "named_parameters", "modules", "children"):
            expr = expr.value
    name = dotted_name(expr)
    if name is None:
        return None
    if name == "self":
        return ""
    if name.startswith("self."):
        path = name[len("self.") :]
        for suffix in (".weight", ".bias"):
            if path.endswith(suffix):
                return path
        return path
    return None


def _scan_class(cls: type) -> list[tuple[str, SourceLocation]]:
    try:
        filename = inspect.getsourcefile(cls)
        _, first = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return []
    if filename is None:
        return []
    tree = parse_file(filename)
    if tree is None:
        return []
    class_node = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__
         and (n.lineno == first or any(d.lineno == first for d in n.decorator_list))),
        None,
    )
    if class_node is None:
        return []
    found: list[tuple[str, SourceLocation]] = []
    for func in class_node.body:
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        loops: dict[str, ast.AST] = {}
        for node in ast.walk(func):
            _bind_loop_names(node, loops)
        for node in ast.walk(func):
            hit = _freeze_target(node)
            if hit is None:
                continue
            expr, line = hit
            scope = _scope_of(expr, loops)
            if scope is None:
                continue
            found.append((scope, SourceLocation(filename, line, func.name, source_line(filename, line))))
    return found


def static_freeze_sites(
    model: nn.Module, frozen_names: list[str], classifier: Optional[CodeClassifier] = None
) -> dict[str, SourceLocation]:
    """Best guess at the statement that froze each of ``frozen_names``.

    Scans the classes (user code only) of the model's modules for freezing
    statements; a statement freezing ``self.X`` inside the module named ``M`` covers
    parameters under ``M.X``; the most specific cover wins.
    """
    classifier = classifier or CodeClassifier()
    covers: list[tuple[str, SourceLocation]] = []
    seen: set[type] = set()
    for module_name, module in model.named_modules():
        cls = type(module)
        for klass in cls.__mro__:
            if klass in (nn.Module, object) or not isinstance(klass, type):
                continue
            try:
                filename = inspect.getsourcefile(klass)
            except TypeError:
                continue
            if filename is None or not classifier.is_user(filename):
                continue
            if (klass, module_name) in seen:  # type: ignore[comparison-overlap]
                continue
            seen.add((klass, module_name))  # type: ignore[arg-type]
            for scope, location in _scan_class(klass):
                prefix = ".".join(p for p in (module_name, scope) if p)
                covers.append((prefix, location))
    out: dict[str, SourceLocation] = {}
    for name in frozen_names:
        best: Optional[tuple[str, SourceLocation]] = None
        for prefix, location in covers:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, location)
        if best is not None:
            out[name] = best[1]
    return out


# ---------------------------------------------------------------- the user's scripts

#: filename -> (mtime, [(path or None, location)]): the freezing statements of one file version.
_SCRIPT_FREEZES: dict[str, tuple[float, list[tuple[Optional[str], SourceLocation]]]] = {}


def _object_path(expr: ast.AST, bindings: dict[str, ast.AST], depth: int = 0) -> Optional[str]:
    """The module path an expression names below the variable it starts from (``""``: the
    variable itself), or ``None`` when it is not written out (``get_submodule(name)``, ``x[i]``).

    ``bindings`` maps the function's loop variables to what they iterate and its plain
    ``alias = model.x.y`` assignments to their value, so ``for p in tower.parameters():`` after
    ``tower = model.vision_tower`` gives ``vision_tower``.
    """
    if depth > 8:
        return None
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        attr = expr.func.attr
        if attr in ("parameters", "named_parameters", "modules", "children", "named_modules"):
            return _object_path(expr.func.value, bindings, depth + 1)
        if attr in ("get_submodule", "get_parameter") and expr.args and isinstance(expr.args[0], ast.Constant):
            base = _object_path(expr.func.value, bindings, depth + 1)
            target = expr.args[0].value
            if base is None or not isinstance(target, str):
                return None
            return ".".join(p for p in (base, target) if p)
        return None
    if isinstance(expr, ast.Attribute):
        base = _object_path(expr.value, bindings, depth + 1)
        return None if base is None else ".".join(p for p in (base, expr.attr) if p)
    if isinstance(expr, ast.Name):
        bound = bindings.get(expr.id)
        if bound is None:
            return ""  # a root: the model (or the module) the function was handed
        return _object_path(bound, {k: v for k, v in bindings.items() if k != expr.id}, depth + 1)
    return None


def _bind_loop_names(node: ast.AST, out: dict[str, ast.AST]) -> bool:
    """For a ``for`` loop or comprehension, map each loop variable to the iterable; ``True`` if it was one."""
    if not isinstance(node, (ast.For, ast.comprehension)):
        return False
    target = node.target
    for t in [target] if isinstance(target, ast.Name) else list(getattr(target, "elts", [])):
        if isinstance(t, ast.Name):
            out[t.id] = node.iter
    return True


def _bindings(func: ast.AST) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in ast.walk(func):
        if _bind_loop_names(node, out):
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            navigates = isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in (
                "get_submodule", "parameters", "named_parameters", "modules", "children", "named_modules"
            )
            if isinstance(value, (ast.Attribute, ast.Subscript)) or navigates:  # an alias of a part
                out.setdefault(node.targets[0].id, value)
            # anything else (`model = build()`) makes the name a root
    return out


def script_freezes(filename: str) -> list[tuple[Optional[str], SourceLocation]]:
    """Every freezing statement of ``filename`` (functions and module body) with the module path
    it writes (see :func:`_object_path`); memoised per file version."""
    import os

    from .source import _walk_own_body

    try:
        mtime = os.stat(filename).st_mtime
    except OSError:
        return []
    cached = _SCRIPT_FREEZES.get(filename)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    tree = parse_file(filename)
    found: list[tuple[Optional[str], SourceLocation]] = []
    if tree is not None:
        bodies: list[tuple[ast.AST, str]] = [(tree, "<module>")]
        bodies += [(n, n.name) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for body, function in bodies:
            bindings = _bindings(body)
            for node in _walk_own_body(body):
                hit = _freeze_target(node)
                if hit is None:
                    continue
                expr, line = hit
                path = _object_path(expr, bindings)
                found.append((path, SourceLocation(filename, line, function, source_line(filename, line))))
    found.sort(key=lambda t: t[1].line)
    _SCRIPT_FREEZES[filename] = (mtime, found)
    return found


def _covers(path: str, name: str) -> bool:
    """Whether a written path covers parameter ``name``: a dotted segment run of it, anchored at
    the start or after a dot (a wrapper's prefix, or a 5.x alias property skipping ``model.``)."""
    return path == "" or ("." + path + ".") in ("." + name + ".")


def script_freeze_sites(
    frozen_names: list[str], near: list[str], loaded: list[str] = ()
) -> tuple[dict[str, SourceLocation], dict[str, SourceLocation]]:
    """Where the user's scripts froze each of ``frozen_names``: ``(sure, guessed)``.

    Args:
        frozen_names: parameter names.
        near: the files of the user's frames on the stack and ``__main__`` (the training
            script and what it is running).
        loaded: the user's other loaded modules.

    ``sure``: a statement of ``near`` whose written path covers the name (the most specific
    one; the earliest file among equals). ``guessed``, for the names left: the first statement
    of ``near`` whose target is not written out (``model.get_submodule(name).requires_grad_(False)``),
    else a statement of ``loaded`` whose path starts the name (a helper module the script called;
    in a test session it may be another test's), else a whole-object freeze of ``near``
    (``model.requires_grad_(False)``).
    """
    near_statements = [s for f in near for s in script_freezes(f)]
    loaded_statements = [s for f in loaded for s in script_freezes(f)]
    unresolved = next((loc for path, loc in near_statements if path is None), None)
    blanket = next((loc for path, loc in near_statements if path == ""), None)
    sure: dict[str, SourceLocation] = {}
    guessed: dict[str, SourceLocation] = {}
    for name in frozen_names:
        site = _most_specific(near_statements, name)
        if site is not None:
            sure[name] = site
            continue
        site = unresolved or _most_specific(loaded_statements, name, anchored=True) or blanket
        if site is not None:
            guessed[name] = site
    return sure, guessed


def _most_specific(
    statements: list[tuple[Optional[str], SourceLocation]], name: str, anchored: bool = False
) -> Optional[SourceLocation]:
    """The covering statement with the longest path; ``anchored``: the path must start the name."""
    best: Optional[tuple[str, SourceLocation]] = None
    for path, location in statements:
        covers = name.startswith(path + ".") if anchored and path else _covers(path or "", name)
        if path and covers and (best is None or len(path) > len(best[0])):
            best = (path, location)
    return best[1] if best is not None else None


__all__ = ["FreezeWatch", "grad_left_off", "script_freeze_sites", "script_freezes", "static_freeze_sites"]
