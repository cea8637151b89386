"""Seed-scale training steps on one GPU: tokens/s, samples/s, peak memory, MFU (marker ``gpu``).

Run through the prepared script, which also runs ``pytest -m gpu tests`` and writes the tables::

    python benchmarks/gpu_suite.py            # on a GPU machine; results under $OUT (default ./out)
    python benchmarks/gpu_suite.py --smoke    # the same code on CPU at tiny scale (OCRMEM_BENCH_SMOKE=1)

Without CUDA (and without smoke mode) every test here skips with the reason. What is measured and
how FLOPs are counted: see ``throughput.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench_helpers import SideBySide
from throughput import CONFIGS, SMOKE, OURS, USER, configured, device_and_scale, first_fitting, measure

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() or SMOKE),
    reason="needs a CUDA device (none visible); OCRMEM_BENCH_SMOKE=1 runs the same code on CPU at tiny scale",
)

BATCHES = [8, 4, 2, 1]  # tried from the largest down: the first that fits in 80 GB is timed
# (config, pages per row): recent text is 2,048 tokens, each page adds 256 memory tokens.
GRID = [("ours", 1), ("ours", 4), ("ours+ckpt", 4), ("user", 1)]
PAIR_PAGES = [1, 4]  # user vs ours at batch 1, interleaved step by step


@pytest.fixture(scope="module")
def bench_model():
    from throughput import build_model

    model = build_model()
    yield model
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_oom(benchmark, info: dict) -> None:
    """Keep an all-OOM case in the JSON: a no-op timing carries the extra_info."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(info, oom=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("config_name", "pages"), GRID, ids=[f"{c}-{p}pages" for c, p in GRID])
def test_gpu_step(benchmark, bench_model, config_name: str, pages: int) -> None:
    _, scale = device_and_scale()
    config = CONFIGS[config_name]
    benchmark.group = f"GPU training step, {scale.name}"
    with configured(bench_model, config):
        runner, oom = first_fitting(bench_model, config, pages, BATCHES, scale)
        if runner is None:
            _record_oom(benchmark, {"config": config_name, "pages_per_row": pages, "oom_batches": oom})
            return
        try:
            benchmark.pedantic(
                runner.step, rounds=scale.timed_steps, warmup_rounds=scale.warmup_steps - 1, iterations=1
            )
            result = measure(runner, list(benchmark.stats.stats.data))
        finally:
            runner.close()
    benchmark.extra_info.update(result, oom_batches=oom, largest_fitting_batch=runner.batch_size)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pages", PAIR_PAGES)
def test_gpu_user_vs_ours(benchmark, bench_model, pages: int) -> None:
    """The user's configuration against ours at batch 1, alternating step by step."""
    _, scale = device_and_scale()
    benchmark.group = f"GPU user config vs ours, batch 1, {scale.name}"
    runners, peaks = {}, {}
    try:
        for config in (OURS, USER):
            with configured(bench_model, config):
                runner, _ = first_fitting(bench_model, config, pages, [1], scale)
            if runner is not None:
                runners[config.name] = runner
        if "ours" not in runners:
            _record_oom(benchmark, {"pages_per_row": pages, "ours": None, "user": None})
            return

        def step_of(config):
            def step() -> float:
                """One step of ``config``; switching configuration is left out of the time."""
                device = runners[config.name].device
                with configured(bench_model, config):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    start = time.perf_counter()
                    runners[config.name].step()  # synchronises the device
                    elapsed = time.perf_counter() - start
                if device.type == "cuda":
                    peaks[config.name] = max(peaks.get(config.name, 0), torch.cuda.max_memory_allocated(device))
                return elapsed

            return step

        steps = SideBySide({name: step_of(CONFIGS[name]) for name in runners}, baseline="ours")
        for _ in range(scale.warmup_steps):
            steps.round()
        steps.reset()
        benchmark.pedantic(steps.round, rounds=scale.timed_steps, iterations=1)
        info = {"pages_per_row": pages, "batch_size": 1, **steps.summary()}
        for name, runner in runners.items():
            with configured(bench_model, CONFIGS[name]):
                result = measure(runner, steps.times[name])
            if name in peaks:
                result["peak_memory_gib"] = peaks[name] / 2**30
            info[name] = result
        info["user"] = info.get("user") or {"oom": True, "config": "user"}
        if "user" in runners and peaks:
            info["ratio_peak_memory_user_vs_ours"] = peaks["user"] / peaks["ours"]
        benchmark.extra_info.update(info)
    finally:
        for runner in runners.values():
            runner.close()


@pytest.mark.slow
def test_gpu_suite_smoke_runs_on_cpu(tmp_path: Path) -> None:
    """The prepared GPU script, in smoke mode: same code path, tiny model, CPU, 2 steps."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_suite.py"), "--smoke"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((tmp_path / "bench-gpu.json").read_text())
    names = [b["name"] for b in data["benchmarks"]]
    assert len(names) == len(GRID) + len(PAIR_PAGES), names
    user_pair = next(b for b in data["benchmarks"] if b["name"] == "test_gpu_user_vs_ours[1]")
    assert user_pair["extra_info"]["ratio_user_vs_ours"] > 0
    assert (tmp_path / "RESULTS-gpu.md").is_file()
