"""Problem 3: `Incompatible transformers version detected! Current version: 4.57.3 Required
version: >=4.30.0,<4.48.0` — DeepSeek-OCR's remote code pins 4.46.3. ocrmem carries its own
DeepEncoder and never runs remote code, so loading is silent on every supported version.
"""

import warnings

import pytest
import transformers
from packaging.version import Version

from ocrmem import MEMModel

from .checks import run_silently


def remote_code_version_check(version: str) -> None:
    """The bug: what DeepSeek-OCR's remote code does at import time."""
    if not Version("4.30.0") <= Version(version) < Version("4.48.0"):
        warnings.warn(
            f"Incompatible transformers version detected! Current version: {version} "
            "Required version: >=4.30.0,<4.48.0"
        )


def test_harness_catches_the_version_warning_for_the_users_version():
    with pytest.raises(AssertionError, match="Incompatible transformers version"):
        run_silently(lambda: remote_code_version_check("4.57.3"))


def test_loading_is_silent_on_this_transformers(tiny_dir):
    model = run_silently(lambda: MEMModel.from_pretrained(tiny_dir))
    assert model.ocr_embed is not None, transformers.__version__
