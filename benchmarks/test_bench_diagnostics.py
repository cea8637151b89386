"""Cost of a full gradient-flow diagnosis of the tiny preset against one plain forward+backward.

Same MEMModel, same fast-path batch, same process, interleaved round by round
(``bench_helpers.SideBySide``) so a slow-down of the shared CPUs hits both sides. The ratio
(target ≤ 2×, issue 10) is ``benchmark.extra_info["ratio_diagnosis_vs_plain_step"]``.
"""

from __future__ import annotations

import warnings

from bench_helpers import SideBySide

from diagnostics import diagnose
from ocrmem.data import build_sample_batch

TARGET_RATIO = 2.0
ROUNDS = 15


def test_diagnosis_vs_plain_step(benchmark, tiny_model) -> None:
    model = tiny_model.train()
    batch = build_sample_batch(model, batch_size=2)

    def plain_step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def diagnosis() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = diagnose(model, batch, ["proj"])
        assert report.status == "ok", report.to_text()

    side = SideBySide({"plain_step": plain_step, "diagnosis": diagnosis}, baseline="plain_step")
    for _ in range(3):  # warm-up: allocator, source parsing caches
        side.round()
    side.reset()
    benchmark.pedantic(side.round, rounds=ROUNDS, iterations=1)
    summary = side.summary()
    benchmark.extra_info.update(summary)
    benchmark.extra_info["target_ratio"] = TARGET_RATIO
