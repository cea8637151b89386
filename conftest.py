"""Shared pytest setup: markers, the hypothesis profiles, seeding, and the tiny-preset fixtures.

Markers are registered here (pyproject.toml turns on ``--strict-markers``): ``gpu`` needs CUDA
and skips without it; ``slow`` is left out of the default run (``pytest -m slow`` runs them).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings

    # A tiny-model step takes 6-250 ms: no deadline; 40 examples by default (~10 s), 300 under
    # HYPOTHESIS_PROFILE=slow.
    settings.register_profile(
        "default",
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "slow",
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a dev extra
    pass

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with `pytest -m gpu`); skips with a reason without one")
    config.addinivalue_line("markers", "slow: slower than a few seconds; left out of the default run (`pytest -m slow`)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    random.seed(0)
    torch.manual_seed(0)


def gpu_test(min_free_gb: float = 0.0):
    """Mark a test ``gpu`` and skip it, with the reason, when CUDA (or enough free memory) is missing."""
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA device (none visible)"
    elif min_free_gb:
        free, _ = torch.cuda.mem_get_info()
        if free / 2**30 < min_free_gb:
            reason = f"needs {min_free_gb:.0f} GB free GPU memory, {free / 2**30:.1f} GB free"

    def wrap(fn):
        fn = pytest.mark.gpu(fn)
        return pytest.mark.skipif(reason is not None, reason=reason or "")(fn)

    return wrap


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset written once per session (read-only for tests: copy it to modify)."""
    from ocrmem.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_model(tiny_dir: Path):
    """A freshly loaded tiny MEMModel (only ``proj`` trainable)."""
    from ocrmem import MEMModel

    return MEMModel.from_pretrained(tiny_dir)


@pytest.fixture
def tiny_batch(tiny_model):
    """A fast-path batch of two rows with rendered history."""
    from ocrmem.data import build_sample_batch

    return build_sample_batch(tiny_model, batch_size=2, seed=0)
