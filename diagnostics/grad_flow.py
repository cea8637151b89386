"""``python -m diagnostics.grad_flow``: where does gradient stop, and why?

Runs a forward and a backward of a model on real batches and reports, for every
trainable parameter, whether gradient reaches it — and when it does not, the cause
(grad disabled by a ``no_grad``/``inference_mode`` block, a detach, a frozen or
unregistered module, a reentrant checkpoint, a NaN loss, a module that never ran)
with the file and line responsible and the fix. See ``--help``.

Start-up is cheap on purpose: this module imports only the standard library and the
torch-free causes catalogue, so ``--help`` and argument errors answer at once; torch, the
engine and the model are imported after a first progress line says what is loading.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .causes import CAUSES
from .errors import CannotRunError, FactoryError
from .paths import check_model_dir, check_output_path

if TYPE_CHECKING:
    from .freeze import FreezeWatch
    from .report import Report
    from .source import CodeClassifier

EXIT_OK = 0  # every trainable parameter gets a finite, non-zero gradient
EXIT_FINDINGS = 1  # at least one error finding (the report says which and why)
EXIT_CANNOT_RUN = 2  # bad arguments/path, import error, or the model failed for a non-gradient reason

#: --dtype spelling -> torch attribute (resolved after torch is imported).
_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

_EPILOG = """\
what it checks, in order:
  1. parameters: trainable / total per module, in the format
     `trainable params: N || all params: M || trainable%: P%`; --expect-trainable
     prefixes must exist and have requires_grad=True
  2. the forward, traced: grad mode on entry of every module, ops that detach or run
     under no_grad, bytes autograd saves per module
  3. the autograd graph of the loss: which trainable parameters it reaches
  4. the backward: every trainable gradient finite and non-zero

causes reported (JSON field "cause"):
{causes}

examples:
  python -m diagnostics.grad_flow                      # the embedded tiny MEMModel
  python -m diagnostics.grad_flow runs/mem-ckpt --batches 8 --json report.json
  python -m diagnostics.grad_flow runs/mem-ckpt --data train.jsonl --batches 50 --seed-path
  python -m diagnostics.grad_flow --factory my_check.py:build --expect-trainable proj \\
      --graph out/grad_flow.svg
  where my_check.py holds
      def build():
          model = MyModel(); batch = next(iter(my_loader))
          return {{"model": model, "batch": batch, "expect_trainable": ["proj"]}}
  (model(**batch) must return a loss tensor, an object with .loss, or a dict with "loss")

exit status:
  0  healthy: every trainable parameter gets a finite, non-zero gradient
     (warnings such as wasted_tracking or missing_glyphs may still be printed)
  1  at least one error finding; the report names the cause, file:line and fix
  2  could not run: bad arguments (--device, --dtype, FILE.py:FUNC), a missing MODEL_DIR,
     a --data file in another format, an unwritable --json/--graph path, an import error,
     or the model raised an error that is not a gradient-flow problem (a shape mismatch);
     one line on stderr says what and how to fix it

batches are numbered from 1 everywhere (progress lines, text, JSON "batches"), and --data
findings name the JSONL line numbers (1-based, as an editor shows them).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--help`` explains causes, examples and exit codes)."""
    causes = "\n".join(f"  {name:<20} {meaning}" for name, (meaning, _) in CAUSES.items())
    parser = argparse.ArgumentParser(
        prog="python -m diagnostics.grad_flow",
        description=(
            "Find where gradient stops and why, for a MEMModel directory (default: the embedded tiny "
            "model) or any nn.Module + batch given by --factory."
        ),
        epilog=_EPILOG.format(causes=causes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                        help="a MEMModel directory (loaded through diagnostics.mem_adapter); omit for the tiny model")
    parser.add_argument("--factory", metavar="FILE.py:FUNC",
                        help="FUNC() returns {'model', 'batch' (or 'batches'), optional 'expect_trainable'}")
    parser.add_argument("--expect-trainable", action="append", default=[], metavar="PREFIX",
                        help="parameter-name prefix (or fnmatch pattern like '*lora_*') that must train; repeatable")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report to PATH ('-' = stdout, which then holds the JSON alone: the text report "
                        "and anything libraries print go to stderr)")
    parser.add_argument("--graph", metavar="PATH",
                        help="write the module-level graph: PATH.dot, rendered to .svg/.png when graphviz is installed")
    parser.add_argument("--full-graph", action="store_true",
                        help="with --graph: also write torchviz's full autograd graph (PATH.autograd.*)")
    parser.add_argument("--device", default=None, help="device for model and batches (default: keep / cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="floating dtype for the model")
    parser.add_argument("--batches", type=int, default=1, metavar="N",
                        help="diagnose N batches (the failure may depend on the batch); MODEL_DIR mode")
    parser.add_argument("--data", metavar="FILE.jsonl",
                        help="MODEL_DIR mode: build the batches from your own data instead of the synthetic task: "
                        "the JSONL chats ocrmem.train --train-data reads ({'messages': [...]} or ShareGPT "
                        "{'conversations': [...]}; one sample per assistant turn, batched as training batches them), "
                        "or {'history', 'prompt', 'response'} rows")
    parser.add_argument("--batch-size", type=int, default=2, metavar="B", help="rows per batch in MODEL_DIR mode (default 2)")
    parser.add_argument("--seed-path", action="store_true",
                        help="MODEL_DIR mode: feed whole chats as input_ids only, as the original training code did; "
                        "the model splits and renders history itself (batches whose history is short get no memory)")
    parser.add_argument("--user-root", action="append", default=[], metavar="DIR",
                        help="directory of your code (default: the working directory); findings point there")
    parser.add_argument("--no-lint", action="store_true", help="skip the static cross-check (diagnostics.lint)")
    parser.add_argument("--no-backward", action="store_true", help="do not run loss.backward()")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[grad_flow {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def check_factory_spec(spec: str) -> tuple[Path, str]:
    """``FILE.py:FUNC`` split and checked without importing anything.

    Raises:
        FactoryError: no colon, missing file, or a function name that is not an identifier.
    """
    example = "e.g. --factory my_check.py:build"
    if ":" not in spec:
        raise FactoryError(f"--factory expects FILE.py:FUNC, got `{spec}` ({example})")
    file, _, func_name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise FactoryError(f"--factory file `{file}` does not exist ({example}, a path relative to the working directory)")
    if not func_name.isidentifier():
        raise FactoryError(f"--factory function name `{func_name}` is not a Python identifier ({example})")
    return path, func_name


def load_factory(spec: str, classifier: CodeClassifier) -> tuple[dict[str, Any], FreezeWatch]:
    """Import ``FILE.py:FUNC`` and call ``FUNC()`` while watching what it freezes.

    Raises:
        FactoryError: malformed spec, missing file/function, bad return value.
        CannotRunError: the file failed to import or FUNC raised.
    """
    from torch import nn

    from .freeze import FreezeWatch

    path, func_name = check_factory_spec(spec)
    file = str(path)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # let the factory import its neighbours
    module_name = f"_grad_flow_factory_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise FactoryError(f"--factory file `{file}` cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise CannotRunError(f"importing `{file}` failed: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise FactoryError(f"`{file}` has no function `{func_name}`")
    watch = FreezeWatch(classifier)
    try:
        with watch:
            result = func()
    except Exception as exc:
        raise CannotRunError(f"{func_name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, dict) or not isinstance(result.get("model"), nn.Module):
        raise FactoryError(f"{func_name}() must return a dict with an nn.Module under 'model'")
    if "batch" not in result and "batches" not in result:
        raise FactoryError(f"{func_name}() must return a 'batch' (kwargs for model(**batch)) or 'batches'")
    return result, watch


def check_device(name: str) -> Any:
    """``torch.device(name)`` after a probe allocation, or :class:`CannotRunError` with the fix."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CannotRunError(
            f"--device `{name}` is not a device name ({str(exc).splitlines()[0]}); use cpu, cuda, cuda:N or mps"
        ) from exc
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        available = "cpu" + (f", cuda:0..cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "")
        raise CannotRunError(
            f"--device `{name}` is not usable here ({str(exc).splitlines()[0]}); available: {available}"
        ) from exc
    return device


def _write_json(report: Report, target: str, stdout: Any) -> None:
    text = json.dumps(report.to_json(), indent=2, default=str)
    if target == "-":
        print(text, file=stdout)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n", encoding="utf-8")


def _print_text(text: str, stream: Any) -> None:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = text.replace("←", "<-").replace("✗", "x").replace("—", "-")
    print(text, file=stream)


def _fail(message: str) -> int:
    print(f"grad_flow: {message}", file=sys.stderr)
    return EXIT_CANNOT_RUN


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (see ``--help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    progress = _Progress(args.quiet)
    if args.model_dir and args.factory:
        return _fail("give MODEL_DIR or --factory, not both")
    if args.factory and (args.data or args.seed_path):
        return _fail("--data and --seed-path need MODEL_DIR (or no argument), not --factory")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batches < 1:
        return _fail(f"--batches must be >= 1, got {args.batches}")
    try:  # everything checkable without torch, before the seconds its import costs
        if args.factory:
            check_factory_spec(args.factory)
        elif args.model_dir:
            check_model_dir(args.model_dir)
        if args.data and not Path(args.data).is_file():
            problem = "is a directory" if Path(args.data).is_dir() else "does not exist"
            raise CannotRunError(f"--data `{args.data}` {problem}; give a JSONL file, one JSON object per line")
        if args.json and args.json != "-":
            check_output_path("--json", args.json)
        if args.graph:
            check_output_path("--graph", args.graph, example="grad_flow.svg")
    except CannotRunError as exc:
        return _fail(str(exc))
    if args.factory:
        progress(f"importing torch, then building the model with {args.factory}")
    else:
        progress(f"importing torch, then loading {args.model_dir or 'the embedded tiny MEMModel'}")
    # With --json -, stdout carries the JSON and nothing else: whatever prints there while torch,
    # transformers, DeepSpeed (it logs to stdout at import) and the model run goes to stderr.
    stdout = sys.stdout
    guard = contextlib.redirect_stdout(sys.stderr) if args.json == "-" else contextlib.nullcontext()
    try:
        with guard:
            return _run(args, progress, stdout)
    except CannotRunError as exc:
        return _fail(str(exc))
    except OSError as exc:  # writing --json/--graph after all (disk full, permissions changed)
        return _fail(f"{exc}; give a path in a writable folder")


def _run(args: argparse.Namespace, progress: _Progress, stdout: Any) -> int:
    """The diagnosis proper: heavy imports, load, diagnose every batch, write the outputs
    (``stdout``: the process's real standard output, for ``--json -``)."""
    import torch

    from .engine import diagnose, move_batch
    from .report import merge_reports
    from .source import CodeClassifier

    device = check_device(args.device) if args.device else None
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    roots = [os.getcwd(), *args.user_root]
    if args.factory:
        roots.append(str(Path(args.factory.rpartition(":")[0]).resolve().parent))
    classifier = CodeClassifier(roots)
    load_findings: list[Any] = []
    freeze_sites: dict[str, Any] = {}
    data_findings: list[Any] = []
    if args.factory:
        result, watch = load_factory(args.factory, classifier)
        model = result["model"]
        batches = list(result["batches"]) if "batches" in result else [result["batch"]]
        expect = list(result.get("expect_trainable") or [])
        freeze_sites = watch.sites_for(model)
        if device is not None or dtype is not None:
            model.to(device=device or "cpu")
            if dtype is not None:
                model.to(dtype=dtype)
            batches = [move_batch(b, device or "cpu", dtype) for b in batches]
    else:
        from . import mem_adapter
        from .data_findings import data_findings as scan_findings

        model, batches, expect, load_findings = mem_adapter.load_model_dir(
            args.model_dir, device=device or "cpu", dtype=dtype, n_batches=args.batches,
            batch_size=args.batch_size, data=args.data, seed_path=args.seed_path,
        )
        freeze_sites = dict(mem_adapter.LAST_FREEZE_SITES)
        if mem_adapter.LAST_DATA_SCAN is not None:
            data_findings = scan_findings(mem_adapter.LAST_DATA_SCAN)
    expect = list(dict.fromkeys([*expect, *args.expect_trainable]))
    reports = []
    for index, batch in enumerate(batches):
        progress(f"diagnosing batch {index + 1}/{len(batches)}")
        reports.append(
            diagnose(
                model, batch, expect or None,
                backward=not args.no_backward, user_roots=roots, freeze_sites=freeze_sites,
                lint=not args.no_lint, full_graph=args.full_graph and bool(args.graph),
            )
        )
    report = merge_reports(reports)
    report.load = list(load_findings)
    report.findings.extend(data_findings)
    progress("done")

    text_stream = sys.stderr if args.json == "-" else sys.stdout
    _print_text(report.to_text(), text_stream)
    if args.json:
        _write_json(report, args.json, stdout)
    if args.graph:
        from .picture import write_graphs

        for message in write_graphs(report, args.graph, args.full_graph):
            print(f"grad_flow: {message}", file=sys.stderr)
    if report.cannot_run:
        assert report.error is not None
        print(f"grad_flow: could not run: {report.error.one_line()}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    return EXIT_FINDINGS if report.status == "error" else EXIT_OK


__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_FINDINGS",
    "EXIT_OK",
    "build_parser",
    "check_device",
    "check_factory_spec",
    "check_output_path",
    "load_factory",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
