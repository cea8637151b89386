"""Shared fixtures for the diagnostics tests.

The repository root is put on ``sys.path`` when the package is not installed, the
``grad_flow`` fixture of :mod:`diagnostics.pytest_plugin` is made available even
without the installed entry point, and ``fake_site`` installs the fake third-party
encoder package into a temporary ``site-packages`` directory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from diagnostics.pytest_plugin import grad_flow  # noqa: E402,F401  (fixture re-export)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fake_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fake encoder package copied to ``<tmp>/site-packages`` and importable."""
    site = tmp_path_factory.mktemp("venv") / "site-packages"
    shutil.copytree(HERE / "fake_site", site)
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("fake_ocr_encoder", None)
