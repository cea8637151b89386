"""Torch-free source helpers: read a Python file honestly, and recognise grad-mode code in its ``ast``.

Both the static scan (:mod:`diagnostics.lint`, which must start without importing torch)
and the runtime locator (:mod:`diagnostics.source`) use these, so a form recognised by
one is recognised by the other.

* :func:`read_module` parses a file the way Python does (PEP 263 encoding cookies,
  a UTF-8 BOM) and raises :class:`UnparsableSourceError` — with the line — for a
  syntax error, NUL bytes or undecodable text, instead of pretending the file is empty;
* :func:`import_aliases` maps the local names a module binds by ``import`` to what they
  stand for, so ``from torch import no_grad as ng`` / ``import torch as T`` resolve;
* :func:`grad_effect` says whether an expression (a ``with`` item, a decorator, a call)
  turns grad off, back on, or neither.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from pathlib import Path
from typing import Literal, Mapping, Optional

GradEffect = Literal["off", "on"]

#: context managers / decorators that switch grad off (last dotted component).
_OFF = {"no_grad": "no_grad", "inference_mode": "inference_mode"}
_SWITCH = ("set_grad_enabled", "_set_grad_enabled")


class UnparsableSourceError(ValueError):
    """A file that is not parsable Python: a syntax error, NUL bytes, or text that does not decode.

    Attributes:
        file: the path.
        line: 1-based line of the problem (``None`` when unknown).
        reason: what is wrong, one line.
    """

    def __init__(self, file: str, line: Optional[int], reason: str) -> None:
        self.file = file
        self.line = line
        self.reason = reason
        where = f"{display_path(file)}:{line}" if line else display_path(file)
        super().__init__(f"cannot parse {where}: {reason}")


def display_path(path: str) -> str:
    """Return ``path`` relative to the current directory when it lies inside it."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us
        return path
    absolute = os.path.abspath(path)
    if absolute.startswith(cwd + os.sep):
        return os.path.relpath(absolute, cwd)
    return path


def decode_source(data: bytes, filename: str) -> str:
    """Decode Python source bytes as the interpreter would (cookie, BOM), or raise with the line.

    Raises:
        UnparsableSourceError: NUL bytes (a binary file), an unknown declared encoding,
            or bytes that do not decode in the file's encoding.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UnparsableSourceError(filename, line, f"binary content (NUL byte at offset {nul}); not Python source")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:  # unknown codec in the coding cookie, or a BOM that contradicts it
        raise UnparsableSourceError(filename, getattr(exc, "lineno", None) or 1, str(exc)) from None
    try:
        return data.decode(encoding)  # 'utf-8-sig' strips a BOM
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UnparsableSourceError(
            filename, line,
            f"not valid {encoding} (byte 0x{data[exc.start]:02x}); save it as UTF-8 or declare its encoding "
            "(`# -*- coding: ... -*-`)",
        ) from None


def read_module(filename: str | os.PathLike[str]) -> tuple[str, ast.Module]:
    """The decoded text and ``ast`` of a Python file.

    Raises:
        OSError: the file cannot be read.
        UnparsableSourceError: it is not parsable Python (with the line of the problem).
    """
    name = os.fspath(filename)
    text = decode_source(Path(name).read_bytes(), name)
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as exc:
        raise UnparsableSourceError(name, exc.lineno, exc.msg) from None
    except (ValueError, RecursionError, MemoryError) as exc:  # pathological nesting
        raise UnparsableSourceError(name, None, f"{type(exc).__name__}: {exc}") from None
    return text, tree


def dotted_name(node: ast.AST) -> Optional[str]:
    """``torch.autograd.no_grad`` for the matching Attribute/Name chain, else ``None``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    if isinstance(node, ast.Call):  # e.g. torch.no_grad().__enter__ chains: keep the tail
        inner = dotted_name(node.func)
        if inner is not None:
            parts.append(inner + "()")
            return ".".join(reversed(parts))
    return None


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it stands for, from every ``import`` in ``tree``.

    ``import torch as T`` gives ``{"T": "torch"}``; ``from torch import no_grad as ng``
    gives ``{"ng": "torch.no_grad"}``; ``import torch.autograd.grad_mode as gm`` gives
    ``{"gm": "torch.autograd.grad_mode"}``. Imports inside functions count too (the
    scan is per file, not per scope: a name rebound to something else is rare enough).
    The result is kept on ``tree`` (parsed trees are cached per file and mtime), so a training
    loop that diagnoses every N steps walks each file once, not once per diagnosis.
    """
    cached = getattr(tree, "_ocrmem_import_aliases", None)
    if cached is not None:
        return dict(cached)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    tree._ocrmem_import_aliases = dict(aliases)  # type: ignore[attr-defined]
    return aliases


def canonical_name(node: ast.AST, aliases: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """:func:`dotted_name` with its first component resolved through ``aliases``."""
    name = dotted_name(node)
    if name is None or not aliases:
        return name
    head, _, rest = name.partition(".")
    target = aliases.get(head)
    if target is None:
        return name
    return f"{target}.{rest}" if rest else target


def _mode_argument(call: ast.Call) -> Optional[ast.AST]:
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == "mode"), None)


def _is_literal(node: Optional[ast.AST], value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def grad_effect(node: ast.AST, aliases: Optional[Mapping[str, str]] = None) -> Optional[tuple[GradEffect, str]]:
    """What ``node`` does to the grad mode when entered / applied / called.

    Returns ``("off", kind)`` with kind ``no_grad`` / ``inference_mode`` /
    ``set_grad_enabled`` for ``no_grad()``, ``no_grad`` (bare decorator),
    ``inference_mode()`` / ``inference_mode(True)`` / ``inference_mode(mode=True)``,
    ``set_grad_enabled(<anything but True>)``; ``("on", kind)`` for ``enable_grad()``
    and ``set_grad_enabled(True)``; ``None`` otherwise — ``inference_mode(False)`` is
    neither (it leaves the grad mode as it was). Names resolve through ``aliases``
    and match on their last component under any prefix (``torch.``,
    ``torch.autograd.grad_mode.``, ``T.``).
    """
    call = node if isinstance(node, ast.Call) else None
    name = canonical_name(call.func if call is not None else node, aliases)
    if name is None:
        return None
    tail = name.rsplit(".", 1)[-1]
    if tail == "no_grad":
        return ("off", "no_grad")
    if tail == "inference_mode":
        mode = _mode_argument(call) if call is not None else None
        return None if _is_literal(mode, False) else ("off", "inference_mode")
    if tail == "enable_grad":
        return ("on", "enable_grad")
    if tail in _SWITCH and call is not None:
        return ("on", "set_grad_enabled") if _is_literal(_mode_argument(call), True) else ("off", "set_grad_enabled")
    return None


def grad_disable_kind(node: ast.AST, aliases: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The kind of grad-disabling expression ``node`` is (see :func:`grad_effect`), or ``None``."""
    effect = grad_effect(node, aliases)
    return effect[1] if effect is not None and effect[0] == "off" else None


__all__ = [
    "GradEffect",
    "UnparsableSourceError",
    "canonical_name",
    "decode_source",
    "display_path",
    "dotted_name",
    "grad_disable_kind",
    "grad_effect",
    "import_aliases",
    "read_module",
]
