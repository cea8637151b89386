"""Benchmark-only pytest setup: record the machine facts RESULTS.md prints in the saved JSON.

Fixtures (``tiny_dir``, ``tiny_model``, ...) and the thread count come from the root
``conftest.py``; nothing here changes how the benchmarks run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_helpers, throughput: plain modules here

from bench_helpers import machine_facts  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    machine_info["ocrmem"] = machine_facts()
