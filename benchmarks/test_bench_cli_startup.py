"""How long each CLI takes to say something: ``--help``, and the first line of a real run.

Fresh interpreters (``subprocess``), interleaved round by round (``bench_helpers.SideBySide``)
with two yardsticks measured the same way: a bare ``python -c pass`` and ``python -c "import
torch, transformers"`` — what a CLI paid before argparse ran when its package imported them
eagerly. ``ratio_<cli>_help_vs_import_torch`` well below 1 means ``--help`` skips that import;
``grad_flow_first_line`` is the time until ``python -m diagnostics.grad_flow TINY_DIR`` prints
its first progress line (the process is then killed).

    python -m pytest benchmarks/test_bench_cli_startup.py -o addopts="" -p no:cacheprovider
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench_helpers import SideBySide

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
CLIS = {"grad_flow": "diagnostics.grad_flow", "lint": "diagnostics.lint", "tiny": "ocrmem.tiny",
        "presets": "ocrmem.presets", "train": "ocrmem.train"}
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, check=True, timeout=300)


def _first_line(*args: str) -> float:
    """Seconds until the command writes its first line on stderr; then kill it."""
    import time

    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = process.stderr.readline()
        elapsed = time.perf_counter() - start
        assert line, "the command wrote nothing on stderr"
        return elapsed
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_cli_time_to_first_output(benchmark, tiny_dir) -> None:
    candidates = {
        "python_bare": lambda: _run("-c", "pass"),
        "import_torch": lambda: _run("-c", "import torch, transformers"),
        **{f"{name}_help": (lambda module=module: _run("-m", module, "--help")) for name, module in CLIS.items()},
        "grad_flow_first_line": lambda: _first_line("-m", "diagnostics.grad_flow", str(tiny_dir)),
    }
    side = SideBySide(candidates, baseline="import_torch")
    side.round()  # warm-up: file cache
    side.reset()
    benchmark.pedantic(side.round, rounds=ROUNDS, iterations=1)
    summary = side.summary(extra_pairs=tuple((f"{name}_help", "python_bare") for name in CLIS))
    benchmark.extra_info.update(summary)
    for name in CLIS:
        assert summary[f"ratio_{name}_help_vs_import_torch"] < 0.5, f"{name} --help seems to import torch: {summary}"
