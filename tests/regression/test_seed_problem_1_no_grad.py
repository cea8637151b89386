"""Problem 1: `element 0 of tensors does not require grad and does not have a grad_fn`.

The user blamed `with torch.no_grad()` around the frozen encoder. Verified instead: the error
comes from batches in which no row is compressed (proj never runs), or from proj itself running
with grad disabled (DeepSeek-OCR's own code wraps SAM, CLIP *and* the projector in one block).
"""

import pytest
import torch

from ocrmem import MEMConfig, MEMModel

from .checks import assert_proj_learns


class ProjInsideNoGrad(MEMModel):
    """The bug: proj runs inside the encoder's no_grad block."""

    def embed_pages(self, pixel_values):
        with torch.no_grad():
            return self.proj(self.ocr_embed(pixel_values))


class NoSkipOnEmptyMemory(MEMModel):
    """The bug that crashed their training: an uncompressed batch returns a loss with no grad_fn."""

    def _empty_memory_loss(self, loss, zero_term=None):
        return loss


def test_encoder_under_no_grad_is_fine_and_proj_learns(tiny_model, tiny_batch):
    assert_proj_learns(tiny_model, tiny_batch)


def test_harness_catches_proj_inside_no_grad(tiny_dir, tiny_batch):
    with pytest.raises(AssertionError, match="no grad_fn"):
        assert_proj_learns(ProjInsideNoGrad.from_pretrained(tiny_dir), tiny_batch)


def test_uncompressed_batch_reproduces_the_users_runtime_error_in_the_buggy_variant(tiny_dir):
    config = MEMConfig(base_model_name=str(tiny_dir / "llm"), ocr_model_name=str(tiny_dir / "ocr"))
    ids = torch.randint(0, 1000, (2, 50))  # 50 tokens << context_threshold 2048: nothing compressed
    buggy = NoSkipOnEmptyMemory(config)
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
        buggy(input_ids=ids, labels=ids.clone()).loss.backward()
    ours = MEMModel(config)
    with pytest.warns(UserWarning, match="proj took no part"):
        loss = ours(input_ids=ids, labels=ids.clone()).loss
    loss.backward()  # explicit skip: works, and proj's gradient is exactly zero
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours.proj.parameters())
