"""A toy model zoo shaped like MEMModel, each variant with one real bug (or none).

The reference shape: a frozen OCR encoder (conv + linear) turns page images into
vision features, a trainable ``proj`` (Linear-GELU-Linear) maps them to the LLM width,
the projected vision embeds are prepended to the text embeds, and a frozen tiny
``LlamaForCausalLM`` (hidden 32, 2 layers, vocab 64) computes the loss from
``inputs_embeds``.

Each variant overrides :meth:`MemLike.embed_history` (or ``__init__``) with exactly
one bug; tests find the offending line by searching this file's source, never by a
hard-coded number.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

VISION_DIM = 16  # encoder feature width
HIDDEN = 32  # LLM width
VOCAB = 64
IMAGE = 16  # page side in pixels: (16/4)^2 = 16 vision tokens per page
TEXT_LEN = 8


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama small enough for CPU tests (≈ 30k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


class TinyEncoder(nn.Module):
    """Frozen OCR-encoder stand-in: patchify conv, then a linear head."""

    def __init__(self, out_dim: int = VISION_DIM) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.head = nn.Linear(8, out_dim)
        self.dropout = nn.Dropout(0.1)  # so that eval() changes behaviour, not gradient flow

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.patch(pixel_values)  # (B, 8, 4, 4)
        feats = feats.flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.dropout(self.head(feats))  # (B, 16, VISION_DIM)


def make_proj(vision_dim: int = VISION_DIM, hidden: int = HIDDEN) -> nn.Sequential:
    """The user's projector: Linear(v, max(v, h)) -> GELU -> Linear(max(v, h), h)."""
    width = max(vision_dim, hidden)
    return nn.Sequential(nn.Linear(vision_dim, width), nn.GELU(), nn.Linear(width, hidden))


class MemLike(nn.Module):
    """Healthy reference: encoder under ``no_grad`` (nothing trainable upstream), proj outside."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.ocr_embed = TinyEncoder()
        self.proj = make_proj()
        self.base_llm = tiny_llama(seed)
        self.ocr_embed.requires_grad_(False)
        self.base_llm.requires_grad_(False)

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        return self.proj(feats)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> Any:
        vision_embeds = self.embed_history(pixel_values)  # (B, P, HIDDEN)
        text_embeds = self.base_llm.get_input_embeddings()(input_ids)  # (B, T, HIDDEN)
        inputs_embeds = torch.cat([vision_embeds, text_embeds], dim=1)
        if labels is not None:
            ignore = labels.new_full(vision_embeds.shape[:2], -100)
            labels = torch.cat([ignore, labels], dim=1)
        return self.base_llm(inputs_embeds=inputs_embeds, labels=labels)


# ----------------------------------------------------------------------- bugs


class ProjUnderNoGrad(MemLike):
    """Bug 1: proj inside the same ``no_grad`` block as the encoder (DeepSeek-OCR style)."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
            vision_embeds = self.proj(feats)
        return vision_embeds


class DetachedVisionEmbeds(MemLike):
    """Bug 2: the projected vision embeds are detached."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        return self.proj(feats).detach()


class BlanketFreeze(MemLike):
    """Bug 3: a blanket freeze loop also freezes proj."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        for param in self.parameters():
            param.requires_grad = False


class ReentrantCheckpoint(MemLike):
    """Bug 4: reentrant checkpoint around encoder+proj over inputs that don't require grad."""

    def _encode_and_project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ocr_embed(pixel_values))

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._encode_and_project, pixel_values, use_reentrant=True)


class LibraryInferenceEncoder(MemLike):
    """The user's real bug: a third-party encoder whose forward is ``@torch.inference_mode()``,
    its output fed straight into proj."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        from fake_ocr_encoder import InferenceModeEncoder  # the "installed" package

        self.ocr_embed = InferenceModeEncoder(VISION_DIM)
        self.ocr_embed.requires_grad_(False)

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.ocr_embed(pixel_values)
        return self.proj(feats)


class SetGradEnabledOff(MemLike):
    """Bug: ``torch.set_grad_enabled(False)`` left on while proj runs."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(False)
        feats = self.ocr_embed(pixel_values)
        vision_embeds = self.proj(feats)
        torch.set_grad_enabled(True)
        return vision_embeds


class DataAttribute(MemLike):
    """Bug: ``.data`` on the projected embeds."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        vision_embeds = self.proj(feats)
        return vision_embeds.data


class NumpyRoundTrip(MemLike):
    """Bug: the embeds go through numpy and back."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        array = self.proj(feats).detach().cpu().numpy()
        return torch.from_numpy(array)


class TolistRewrap(MemLike):
    """Bug: the embeds go through a Python list and ``torch.tensor``."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        return torch.tensor(self.proj(feats).tolist())


class UnregisteredProj(MemLike):
    """Bug: the trainable proj is kept in a plain list, so the model does not own it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        del self.proj
        self.projectors = [make_proj()]

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.ocr_embed(pixel_values)
        return self.projectors[0](feats)


class LlmUnderNoGrad(MemLike):
    """Bug: the frozen LLM (which must carry gradient back to proj) runs under no_grad."""

    def forward(self, input_ids, pixel_values, labels=None):  # type: ignore[override]
        vision_embeds = self.embed_history(pixel_values)
        text_embeds = self.base_llm.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([vision_embeds, text_embeds], dim=1)
        ignore = labels.new_full(vision_embeds.shape[:2], -100)
        with torch.no_grad():
            return self.base_llm(inputs_embeds=inputs_embeds, labels=torch.cat([ignore, labels], dim=1))


class SkipsProjWithoutHistory(MemLike):
    """Batch-dependent bug (the user's logged error): without history pages proj never runs."""

    def forward(self, input_ids, pixel_values=None, labels=None):  # type: ignore[override]
        if pixel_values is None:
            return self.base_llm(input_ids=input_ids, labels=labels)
        return super().forward(input_ids, pixel_values, labels)


# --------------------------------------------------------------------- healthy


class FrozenInEval(MemLike):
    """Healthy: frozen parts in eval() — mode changes dropout, never gradient flow."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.ocr_embed.eval()
        self.base_llm.eval()


class TrackedPixels(MemLike):
    """Healthy but wasteful: the seed's advice, pixel_values.requires_grad_(True), no no_grad."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.clone().requires_grad_(True)
        feats = self.ocr_embed(pixel_values)
        return self.proj(feats)


def make_batch(batch_size: int = 2, seed: int = 0, labels: bool = True, all_ignored: bool = False) -> dict[str, torch.Tensor]:
    """A batch for every MemLike variant: one page per row, TEXT_LEN text tokens."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (batch_size, TEXT_LEN), generator=generator),
        "pixel_values": torch.randn(batch_size, 3, IMAGE, IMAGE, generator=generator),
    }
    if labels:
        batch["labels"] = batch["input_ids"].clone()
        if all_ignored:
            batch["labels"].fill_(-100)
    return batch


__all__ = [
    "BlanketFreeze",
    "DataAttribute",
    "DetachedVisionEmbeds",
    "FrozenInEval",
    "LibraryInferenceEncoder",
    "LlmUnderNoGrad",
    "MemLike",
    "NumpyRoundTrip",
    "ProjUnderNoGrad",
    "ReentrantCheckpoint",
    "SetGradEnabledOff",
    "SkipsProjWithoutHistory",
    "TinyEncoder",
    "TolistRewrap",
    "TrackedPixels",
    "UnregisteredProj",
    "make_batch",
    "make_proj",
    "tiny_llama",
]
