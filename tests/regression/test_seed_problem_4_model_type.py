"""Problem 4: `You are using a model of type deepseek_vl_v2 to instantiate a model of type
DeepseekOCR` — reading DeepSeek-OCR's config.json through a config class of another model type.
ocrmem reads only the checkpoint's vision tensors, never that config through transformers.
"""

import json

import pytest

from ocrmem import MEMConfig, MEMModel

from .checks import run_silently


def test_ocr_dir_really_declares_deepseek_model_type(tiny_dir):
    assert json.loads((tiny_dir / "ocr" / "config.json").read_text())["model_type"] == "deepseek_vl_v2"


def test_harness_catches_the_model_type_mismatch():
    # The bug, for real: transformers' own message when a config of another type is read.
    def buggy(path):
        return lambda: MEMConfig.from_pretrained(path)

    import tempfile

    from ocrmem.encoder import DeepEncoder, DeepEncoderSpec, save_deepencoder

    with tempfile.TemporaryDirectory() as tmp:
        save_deepencoder(DeepEncoder(DeepEncoderSpec.tiny(), readout="deepseek_ocr"), tmp)
        with pytest.raises(AssertionError, match="model of type .?deepseek_vl_v2"):
            run_silently(buggy(tmp))


def test_loading_a_mem_model_with_a_deepseek_ocr_dir_is_silent(tiny_dir):
    run_silently(lambda: MEMModel.from_pretrained(tiny_dir))
