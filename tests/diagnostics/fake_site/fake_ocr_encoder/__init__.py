"""A stand-in for a third-party OCR encoder package (installed under site-packages).

Like the user's real encoder package, its forward is decorated with
``@torch.inference_mode()``: everything it returns is an inference tensor. The tests
copy this package into a temporary ``site-packages`` directory so that the
diagnostics classify it as library code, not the user's.
"""

from __future__ import annotations

import torch
from torch import nn


class InferenceModeEncoder(nn.Module):
    """Conv patchifier + linear, frozen, run under inference mode.

    Args:
        out_dim: feature width.
    """

    def __init__(self, out_dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.head = nn.Linear(8, out_dim)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.patch(pixel_values)  # (B, 8, H/4, W/4)
        feats = feats.flatten(2).transpose(1, 2)  # (B, T, 8)
        return self.head(feats)  # (B, T, out_dim)
