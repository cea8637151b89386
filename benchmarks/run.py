"""Run the CPU benchmark suite and write ``benchmarks/RESULTS.md`` plus PNG plots — one command:

    python benchmarks/run.py

which is ``pytest benchmarks -m "not gpu and not slow"`` (overriding pyproject's default
``addopts``; benchmarks are not part of the default ``pytest`` run, whose testpaths is ``tests``)
saving ``benchmarks/results/cpu.json``, then ``python benchmarks/report.py``.

    python benchmarks/run.py --report-only     # re-render RESULTS.md from the saved JSON
    python benchmarks/run.py -- -k memory       # extra pytest arguments after --

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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
EXIT_OK = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description="CPU benchmarks -> RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="skip pytest, re-render from saved JSON")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    RESULTS.mkdir(exist_ok=True)
    cpu_json = RESULTS / "cpu.json"
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
        (RESULTS / "cpu-run.json").write_text(
            json.dumps({"seconds": round(elapsed, 1), "pytest_rc": rc, "command": "python benchmarks/run.py"}, indent=2),
            encoding="utf-8",
        )
        print(f"[run] pytest rc={rc} in {elapsed:.0f} s", flush=True)

    sys.path.insert(0, str(HERE))
    from report import main as report_main

    report_rc = report_main([])
    return rc or report_rc


if __name__ == "__main__":
    sys.exit(main())
