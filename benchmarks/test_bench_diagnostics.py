"""Cost of a full gradient-flow diagnosis against one plain forward+backward.

Same model, same batch, same process. The ratio (target ≤ 3×) is recorded in
``benchmark.extra_info["ratio_vs_plain_step"]``; run with
``pytest benchmarks/test_bench_diagnostics.py``.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "diagnostics"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import zoo  # noqa: E402
from diagnostics import diagnose  # noqa: E402

TARGET_RATIO = 3.0


def _plain_step(model: torch.nn.Module, batch: dict) -> None:
    out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def test_diagnosis_vs_plain_step(benchmark) -> None:
    torch.manual_seed(0)
    model = zoo.MemLike()
    batch = zoo.make_batch(batch_size=4)
    for _ in range(3):  # warm up both paths (allocator, source parsing caches)
        _plain_step(model, batch)
        diagnose(model, batch, ["proj"])
    plain = min(timeit.repeat(lambda: _plain_step(model, batch), number=10, repeat=5)) / 10

    report = benchmark(diagnose, model, batch, ["proj"])

    assert report.status == "ok"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        diagnosis = stats.stats.min
        benchmark.extra_info["plain_step_s"] = plain
        benchmark.extra_info["diagnosis_s"] = diagnosis
        benchmark.extra_info["ratio_vs_plain_step"] = diagnosis / plain
        benchmark.extra_info["target_ratio"] = TARGET_RATIO
