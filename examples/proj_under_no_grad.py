"""The bug DeepSeek-OCR's own embedding code invites: proj inside the encoder's no_grad block.

    python -m diagnostics.grad_flow --factory examples/proj_under_no_grad.py:build

Training such a model dies with `element 0 of tensors does not require grad and does not have
a grad_fn`; the diagnosis names the `with` line below and the fix.
"""

import tempfile

import torch

from ocrmem import MEMModel
from ocrmem.data import build_sample_batch
from ocrmem.tiny import write_tiny


class ProjUnderNoGrad(MEMModel):
    def embed_pages(self, pixel_values):
        with torch.no_grad():  # meant for the frozen encoder only...
            features = self.ocr_embed(pixel_values)
            return self.proj(features)  # ...but proj runs inside it too


def build():
    model = ProjUnderNoGrad.from_pretrained(write_tiny(tempfile.mkdtemp()))
    return {"model": model, "batch": build_sample_batch(model), "expect_trainable": ["proj"]}
