"""Run the CPU benchmark suite and render the report — without dirtying the checkout unless asked:

    python benchmarks/run.py                 # measure -> benchmarks/out/ (ignored by git)
    python benchmarks/run.py --update        # measure -> benchmarks/RESULTS.md + benchmarks/results/ (committed)
    python benchmarks/run.py --report-only   # re-render from the saved JSON (add --update for the committed copy)
    python benchmarks/run.py -- -k memory    # extra pytest arguments after --

Measuring is ``pytest benchmarks -m "not gpu and not slow"`` (overriding pyproject's default
``addopts``; benchmarks are not part of the default ``pytest`` run, whose testpaths is ``tests``)
saving ``cpu.json`` and ``cpu-run.json`` (wall time, rc), then ``python benchmarks/report.py``.
Without ``--update`` everything goes to ``benchmarks/out/``: ``cpu.json``, ``RESULTS.md`` and its
PNGs, so a local run never changes a tracked file. ``--update`` writes the committed set: the JSON
and PNGs in ``benchmarks/results/`` and ``benchmarks/RESULTS.md``, whose header says when, where and
with what it was measured.

GPU numbers come from ``benchmarks/gpu_suite.py`` on a GPU machine; copy its ``bench-gpu.json``
to ``benchmarks/results/gpu.json`` and RESULTS.md includes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # committed: the data and plots RESULTS.md shows
SCRATCH = HERE / "out"  # ignored (.gitignore): every run without --update
EXIT_OK = 0
EXIT_CANNOT_RUN = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="CPU benchmarks -> a report (benchmarks/out/ by default; the committed RESULTS.md with --update)",
        epilog="exit status: 0 suite and report fine; the pytest exit status if the suite failed; "
        "2 no JSON to report from",
    )
    parser.add_argument("--update", action="store_true",
                        help="write the committed benchmarks/RESULTS.md and benchmarks/results/ instead of benchmarks/out/")
    parser.add_argument("--report-only", action="store_true", help="skip pytest, re-render from saved JSON")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    target = RESULTS if args.update else SCRATCH
    target.mkdir(parents=True, exist_ok=True)
    cpu_json = target / "cpu.json"
    rc = EXIT_OK
    if not args.report_only:
        command = [
            sys.executable, "-m", "pytest", "benchmarks",
            "-m", "not gpu and not slow",
            "-o", "addopts=--strict-markers",
            "-p", "no:cacheprovider",
            f"--benchmark-json={cpu_json}",
            *args.pytest_args,
        ]
        print("$", " ".join(command), flush=True)
        start = time.monotonic()
        rc = subprocess.call(command, cwd=ROOT)
        elapsed = time.monotonic() - start
        shown = "python benchmarks/run.py" + (" --update" if args.update else "")
        (target / "cpu-run.json").write_text(
            json.dumps({"seconds": round(elapsed, 1), "pytest_rc": rc, "command": shown}, indent=2),
            encoding="utf-8",
        )
        print(f"[run] pytest rc={rc} in {elapsed:.0f} s", flush=True)
    if not cpu_json.is_file():
        print(f"run.py: no {cpu_json.relative_to(ROOT)} to report from — run without --report-only first",
              file=sys.stderr)
        return rc or EXIT_CANNOT_RUN

    sys.path.insert(0, str(HERE))
    from report import main as report_main

    gpu_json = target / "gpu.json" if (target / "gpu.json").is_file() else RESULTS / "gpu.json"
    out_md = HERE / "RESULTS.md" if args.update else SCRATCH / "RESULTS.md"
    report_rc = report_main([
        "--cpu-json", str(cpu_json), "--gpu-json", str(gpu_json), "--out-md", str(out_md), "--plots-dir", str(target),
    ])
    if not args.update:
        print(f"[run] report in {out_md.relative_to(ROOT)} (not committed; `--update` writes benchmarks/RESULTS.md)")
    return rc or report_rc


if __name__ == "__main__":
    sys.exit(main())
