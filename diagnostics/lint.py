"""Static scan of ``forward`` code for constructs that stop gradient.

``python -m diagnostics.lint PATH...`` parses each file (``ast``, nothing is
imported or run — not even torch), starts from every class's ``forward`` and follows
the functions it calls in the same file (``self.method(...)`` and module-level
functions), and reports:

* grad-disabled code — ``with torch.no_grad()``, ``with torch.inference_mode()``
  (``mode=True`` / positional ``True`` too; ``inference_mode(False)`` is not disabling),
  ``torch.set_grad_enabled(False)`` as a block or a statement, and the decorators with
  or without a call (``@torch.no_grad``, ``@torch.no_grad()``), under any import
  spelling (``import torch as T``, ``from torch import no_grad as ng``,
  ``torch.autograd.grad_mode.no_grad``). The *innermost* grad context decides: a call
  inside ``with torch.enable_grad():`` nested in ``no_grad`` runs with grad. A block is
  *info* when the submodules it runs with grad off are all named like an encoder /
  vision tower (the LLaVA pattern, fine when nothing trainable is upstream), *warning*
  otherwise;
* cuts — ``.detach()``, ``.data``, ``.numpy()``, ``.tolist()``, ``.item()``,
  ``torch.tensor(x)`` / ``torch.as_tensor(x)`` / ``torch.from_numpy(x)`` re-wraps:
  *warning* when the value flows to what the function returns, *info* otherwise.

A file that cannot be parsed (a syntax error, binary content, text that does not
decode) is never reported clean: it is an error naming ``file:line``, the other files
are still scanned, and the exit status is 2. A UTF-8 BOM and PEP 263 encoding cookies
are read as Python reads them. Non-Python files are skipped with a note.

The rules live in :mod:`diagnostics.lint_rules`; this module reads paths and runs the CLI.

Output lines read ``path:line: severity: message`` (stdout; errors and notes go to
stderr); ``--json`` prints ``{"version": 2, "findings": [...], "errors": [...],
"skipped": [...]}`` (version 2 added ``errors`` and ``skipped``). Exit status: 0 no
warning, 1 at least one warning, 2 a path could not be read or parsed (or held no
Python file) — 2 wins over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

# Only torch-free modules here: `python -m diagnostics.lint` must start without torch.
from .lint_rules import ENCODER_NAME, LintFinding, lint_tree
from .syntax import UnparsableSourceError, display_path, read_module

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_CANNOT_RUN = 2
JSON_VERSION = 2

#: directories never descended into when a directory is scanned.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
_PY_SUFFIXES = {".py", ".pyw"}

_LINT_CACHE: dict[str, tuple[float, list[LintFinding]]] = {}


def lint_file(path: str | os.PathLike[str]) -> list[LintFinding]:
    """Lint one Python file.

    Raises:
        OSError: the file cannot be read.
        UnparsableSourceError: it is not parsable Python (syntax error, binary, undecodable);
            the exception carries ``file``, ``line`` and ``reason``. A file that cannot be
            parsed is never "no findings".
    """
    filename = os.fspath(path)
    mtime = Path(filename).stat().st_mtime  # raises OSError for a missing file
    cached = _LINT_CACHE.get(filename)
    if cached is not None and cached[0] == mtime:
        return list(cached[1])
    _, tree = read_module(filename)
    findings = lint_tree(tree, filename)
    _LINT_CACHE[filename] = (mtime, findings)
    return list(findings)


@dataclass
class LintRun:
    """What one scan of several paths found.

    Attributes:
        findings: the lint findings of every file that parsed.
        errors: ``(file, line or None, message)`` for each path that could not be read or
            parsed — nothing in those was checked.
        skipped: ``(path, why)`` for non-Python files left out.
        scanned: how many Python files were linted.
    """

    findings: list[LintFinding] = field(default_factory=list)
    errors: list[tuple[str, Optional[int], str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scanned: int = 0

    @property
    def exit_code(self) -> int:
        """2 when anything could not be checked, else 1 on a warning, else 0."""
        if self.errors or not self.scanned:
            return EXIT_CANNOT_RUN
        return EXIT_FINDINGS if any(f.severity in ("warning", "error") for f in self.findings) else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "findings": [f.to_json() for f in self.findings],
            "errors": [{"file": display_path(f), "line": line, "message": msg} for f, line, msg in self.errors],
            "skipped": [{"file": display_path(f), "reason": why} for f, why in self.skipped],
        }


def _looks_like_python(path: Path) -> bool:
    """A ``.py`` file, or an extension-less script whose ``#!`` line names python."""
    if path.suffix in _PY_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            first = handle.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def _scan_file(path: Path, run: LintRun) -> None:
    try:
        run.findings.extend(lint_file(path))
        run.scanned += 1
    except UnparsableSourceError as exc:
        run.errors.append((exc.file, exc.line, f"{exc.reason} — nothing in this file was checked; fix it "
                           f"(`python -m py_compile {display_path(exc.file)}` shows what Python sees)"))
    except OSError as exc:
        run.errors.append((os.fspath(path), None, f"cannot read it: {exc.strerror or exc} — check that it exists and is readable"))
    except Exception as exc:  # noqa: BLE001 - a scanner bug must not hide the file or print a traceback
        run.errors.append((os.fspath(path), None, f"could not be scanned ({type(exc).__name__}: {exc}); "
                           "please report this with the file"))


def scan_paths(paths: Sequence[str | os.PathLike[str]]) -> LintRun:
    """Lint files and directories (``*.py`` below them, skipping hidden / venv / cache dirs).

    Never raises for a bad path: missing, unreadable and unparsable files become
    :attr:`LintRun.errors`; non-Python files become :attr:`LintRun.skipped`.
    """
    run = LintRun()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            others: list[Path] = []
            for file in sorted(path.rglob("*")):
                rel = file.parts[len(path.parts):]
                if any(part.startswith(".") or part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
                    continue
                if rel and rel[-1].startswith(".") or not file.is_file():
                    continue
                if file.suffix in _PY_SUFFIXES:
                    _scan_file(file, run)
                else:
                    others.append(file)
            if others:
                examples = ", ".join(f.name for f in others[:3]) + (", ..." if len(others) > 3 else "")
                run.skipped.append((os.fspath(path), f"{len(others)} non-Python file(s) not scanned ({examples})"))
        elif path.is_file():
            if _looks_like_python(path):
                _scan_file(path, run)
            else:
                run.skipped.append((os.fspath(path), "not a Python file (no .py suffix, no python #! line)"))
        elif path.exists():
            run.errors.append((os.fspath(path), None, "is neither a file nor a directory"))
        else:
            run.errors.append((os.fspath(path), None, "no such file or directory — check the path"))
    run.findings.sort(key=lambda f: (f.file, f.line))
    return run


def lint_paths(paths: Sequence[str | os.PathLike[str]]) -> list[LintFinding]:
    """The findings of :func:`scan_paths`.

    Raises:
        UnparsableSourceError: the first path that could not be read or parsed (after
            scanning all of them): a caller never mistakes an unchecked file for a clean one.
    """
    run = scan_paths(paths)
    if run.errors:
        file, line, message = run.errors[0]
        raise UnparsableSourceError(file, line, message)
    return run.findings


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
        except (OSError, UnparsableSourceError):
            continue  # the runtime report stands on its own; `python -m diagnostics.lint` names the file
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diagnostics.lint`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m diagnostics.lint",
        description=(
            "Statically scan forward() methods (and the same-file functions they call) for code that "
            "stops gradient: no_grad / inference_mode / set_grad_enabled(False) blocks, statements and "
            "decorators (any import spelling; the innermost grad context decides), .detach(), .data, "
            ".numpy(), .tolist(), .item() and tensor(x) / as_tensor(x) / from_numpy(x) re-wraps. Nothing is "
            "imported or executed. "
            "For the runtime truth use `python -m diagnostics.grad_flow`."
        ),
        epilog=(
            "examples:\n"
            "  python -m diagnostics.lint my_model.py\n"
            "  python -m diagnostics.lint src/ --json > lint.json\n\n"
            "severities: info = usually fine (e.g. no_grad around a frozen vision encoder only);\n"
            "warning = gradient probably stops here.\n"
            "Files that cannot be parsed (syntax error, binary, not UTF-8) are errors on stderr naming\n"
            "file:line; the other files are still scanned. Non-Python files are skipped with a note.\n\n"
            "exit status:\n"
            f"  {EXIT_OK}  no warning\n"
            f"  {EXIT_FINDINGS}  at least one warning\n"
            f"  {EXIT_CANNOT_RUN}  a path was missing, unreadable or unparsable, no Python file was given,\n"
            "     or the command line was wrong (wins over 1)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Python files or directories to scan")
    parser.add_argument(
        "--json", action="store_true",
        help=f"print JSON ({{'version': {JSON_VERSION}, 'findings': [...], 'errors': [...], 'skipped': [...]}})",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    run = scan_paths(args.paths)
    if args.json:
        print(json.dumps(run.to_json(), indent=2))
    else:
        for finding in run.findings:
            print(finding.to_text())
    for path, why in run.skipped:
        print(f"diagnostics.lint: note: skipped {display_path(path)}: {why}", file=sys.stderr)
    for path, line, message in run.errors:
        where = f"{display_path(path)}:{line}" if line else display_path(path)
        print(f"diagnostics.lint: error: {where}: {message}", file=sys.stderr)
    if not run.scanned and not run.errors:
        print(
            "diagnostics.lint: error: no Python file among the paths given — pass .py files or directories "
            "holding them",
            file=sys.stderr,
        )
    return run.exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (never raises, never prints a traceback)."""
    args = build_parser().parse_args(argv)  # exits 2 with usage on a bad command line
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("diagnostics.lint: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: a one-line cause, exit 2, no traceback
        print(f"diagnostics.lint: error: {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        return EXIT_CANNOT_RUN


__all__ = [
    "ENCODER_NAME",
    "EXIT_CANNOT_RUN",
    "EXIT_FINDINGS",
    "EXIT_OK",
    "JSON_VERSION",
    "LintFinding",
    "LintRun",
    "UnparsableSourceError",
    "build_parser",
    "lint_file",
    "lint_for_report",
    "lint_paths",
    "lint_tree",
    "main",
    "scan_paths",
]

if __name__ == "__main__":
    sys.exit(main())
