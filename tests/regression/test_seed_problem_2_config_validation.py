"""Problem 2: `WARNING:root:base_model_name is empty` fired on every from_pretrained().

Fix: MEMConfig stays permissive and silent; MEMModel raises ValueError naming the empty field.
"""

import logging

import pytest
from transformers import PretrainedConfig

from ocrmem import MEMConfig, MEMModel

from .checks import run_silently


class WarningConfig(PretrainedConfig):
    """The bug: the config warns from __init__, which from_pretrained calls with no arguments."""

    model_type = "ocrmem_buggy"

    def __init__(self, base_model_name="", **kwargs):
        if not base_model_name:
            logging.warning("base_model_name is empty, model may not initialize correctly")
        self.base_model_name = base_model_name
        super().__init__(**kwargs)


def test_harness_catches_the_warning_config():
    with pytest.raises(AssertionError, match="base_model_name is empty"):
        run_silently(WarningConfig)


def test_config_and_model_load_silently(tiny_dir, tmp_path):
    run_silently(MEMConfig)
    run_silently(lambda: MEMConfig().save_pretrained(tmp_path))
    run_silently(lambda: MEMConfig.from_pretrained(tmp_path))
    run_silently(lambda: MEMModel.from_pretrained(tiny_dir))


@pytest.mark.parametrize("field", ["base_model_name", "ocr_model_name"])
def test_model_raises_value_error_naming_the_empty_field(tiny_dir, field):
    config = MEMConfig(base_model_name=str(tiny_dir / "llm"), ocr_model_name=str(tiny_dir / "ocr"))
    setattr(config, field, "")
    with pytest.raises(ValueError, match=f"`{field}` is empty"):
        MEMModel(config)
