"""The GPU checks, prepared as one script: ``pytest -m gpu`` over tests/ and benchmarks/, then tables.

    python benchmarks/gpu_suite.py            # one H100/H200; writes under $OUT (default ./out)
    python benchmarks/gpu_suite.py --smoke    # same code on CPU at tiny scale, 2 steps (no GPU needed)

Writes to ``$OUT``: ``environment.json`` (+ ``nvidia-smi.txt``), ``tests-gpu.xml``/``.log`` (the
regression tests marked ``gpu``), ``bench-gpu.json``/``.log`` (pytest-benchmark, seed-scale
throughput/memory/MFU), ``RESULTS-gpu.md`` and PNG plots. To fold the results into
``benchmarks/RESULTS.md``: copy ``$OUT/bench-gpu.json`` to ``benchmarks/results/gpu.json`` and run
``python benchmarks/report.py``.

Budget: 8 minutes on one H100 — the stages have their own time limits (150 s + 300 s) so a
hung stage cannot eat the rest. Expected: ~1 min to build and materialise the 8.6 B-parameter
model, ~2-3 min of steps, a few seconds of reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED = 0, 1
NO_TESTS_COLLECTED = 5  # pytest's exit status when -m gpu selects nothing: not a failure here
TESTS_TIMEOUT_S = 150
BENCH_TIMEOUT_S = 300


def _pytest(args: list[str], log: Path, timeout: int, env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers", *args]
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        output += f"\n[gpu_suite] stopped after {timeout} s\n"
        rc = 124
    log.write_text(output, encoding="utf-8")
    print(output[-3000:], flush=True)
    print(f"[gpu_suite] rc={rc} in {time.monotonic() - start:.0f} s -> {log}", flush=True)
    return EXIT_OK if rc in (0, NO_TESTS_COLLECTED) else rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny scale on CPU (also: OCRMEM_BENCH_SMOKE=1)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.smoke:
        env["OCRMEM_BENCH_SMOKE"] = "1"
    # Fewer fragmentation OOMs while stepping the batch size down; documented in RESULTS.md.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    start = time.monotonic()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_helpers import machine_facts

    facts = {**machine_facts(), "smoke": env.get("OCRMEM_BENCH_SMOKE") == "1"}
    (out / "environment.json").write_text(json.dumps(facts, indent=2), encoding="utf-8")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr, encoding="utf-8")

    failures = []
    rc = _pytest(["tests", "-m", "gpu", "-q", "-rs", f"--junitxml={out / 'tests-gpu.xml'}"],
                 out / "tests-gpu.log", TESTS_TIMEOUT_S, env)
    if rc:
        failures.append(f"pytest -m gpu tests (rc {rc})")
    bench_json = out / "bench-gpu.json"
    rc = _pytest(["benchmarks", "-m", "gpu", "-q", "-rs", f"--benchmark-json={bench_json}"],
                 out / "bench-gpu.log", BENCH_TIMEOUT_S, env)
    if rc:
        failures.append(f"pytest -m gpu benchmarks (rc {rc})")

    if bench_json.is_file():
        from report import main as report_main

        report_main(["--gpu-json", str(bench_json), "--gpu-only", "--out-md", str(out / "RESULTS-gpu.md"),
                     "--plots-dir", str(out)])
    else:
        failures.append("no benchmark JSON was written")
    print(f"[gpu_suite] done in {time.monotonic() - start:.0f} s; results in {out}")
    for failure in failures:
        print(f"[gpu_suite] FAILED: {failure}")
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
