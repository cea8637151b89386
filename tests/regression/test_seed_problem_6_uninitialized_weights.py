"""Problem 6: `Some weights of DeepseekOCRForCausalLM were not initialized from the model
checkpoint: ['model.vision_model.embeddings.position_ids']` — a buffer, not a parameter.
ocrmem never requires `position_ids`; loading is silent and every parameter is loaded.
"""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ocrmem import MEMModel
from ocrmem.encoder import load_deepencoder

from .checks import run_silently


class PersistentPositionIds(nn.Module):
    """The bug: a CLIP embedding whose position_ids buffer is persistent, so checkpoints must carry it."""

    def __init__(self):
        super().__init__()
        self.position_embedding = nn.Embedding(17, 8)
        self.register_buffer("position_ids", torch.arange(17).unsqueeze(0), persistent=True)


def buggy_load(module, state):
    missing = module.load_state_dict(state, strict=False).missing_keys
    if missing:
        logging.getLogger("transformers").warning(
            "Some weights of %s were not initialized from the model checkpoint: %s", type(module).__name__, missing
        )


def test_harness_catches_the_position_ids_warning():
    state = {"position_embedding.weight": torch.zeros(17, 8)}
    with pytest.raises(AssertionError, match="position_ids"):
        run_silently(lambda: buggy_load(PersistentPositionIds(), state))


def test_encoder_checkpoint_without_position_ids_loads_silently(tiny_dir, tmp_path):
    weights = load_file(str(tiny_dir / "ocr" / "model.safetensors"))
    assert not [k for k in weights if k.endswith("position_ids")]
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "ocr" / "config.json").read_text())
    encoder = run_silently(lambda: load_deepencoder(tmp_path))
    assert all(not p.is_meta for p in encoder.parameters())


def test_mem_model_loads_silently(tiny_dir):
    run_silently(lambda: MEMModel.from_pretrained(tiny_dir))
