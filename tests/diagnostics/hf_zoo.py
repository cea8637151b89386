"""Stock transformers models built tiny, trained adapter-only, for the second model family.

* :func:`tiny_llava` — ``LlavaForConditionalGeneration`` with a 1-layer CLIP vision tower
  (8-px images, 4 patches) and a 1-layer Llama (hidden 32, vocab 64); everything frozen but
  the ``multi_modal_projector`` (the LLaVA stage-1 recipe).
* :func:`lora_llama` — a tiny Llama under ``peft.get_peft_model`` (LoRA on q/v).
* :data:`VLM_FAMILIES` — LLaVA, Qwen2-VL, PaliGemma, Idefics3 and BLIP-2, each tiny (1 vision
  layer, 1 LLM layer, vocab 64), adapter-only (only the family's projector/connector trains),
  with a valid batch (image placeholder tokens, pixel values, grid sizes as the family needs).

Nothing is downloaded: configs only, random weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import zoo
from ocrmem import compat

IMAGE_TOKEN = 63  # last id of the 64-token vocabulary


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA with only the projector trainable (≈ 18k parameters, 1.6k trainable)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=16,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=zoo.VOCAB, max_position_embeddings=64,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=4,
        vision_feature_layer=-1, vision_feature_select_strategy="default",  # drop CLS: 4 tokens per image
    )
    model = LlavaForConditionalGeneration(config)
    model.requires_grad_(False)
    model.get_submodule(llava_projector_name(model)).requires_grad_(True)
    return model.train()


def llava_projector_name(model: torch.nn.Module) -> str:
    """Where LLaVA keeps its projector: ``model.multi_modal_projector`` on transformers 5,
    ``multi_modal_projector`` at the top on 4.x."""
    return next(name for name, _ in model.named_modules() if name.endswith("multi_modal_projector"))


def llava_batch(batch_size: int = 2, text_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """4 image placeholder tokens then ``text_len`` text tokens per row, labels = inputs."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, IMAGE_TOKEN, (batch_size, text_len), generator=generator)
    ids = torch.cat([torch.full((batch_size, 4), IMAGE_TOKEN), text], dim=1)  # (B, 4 + T)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch_size, 3, 8, 8, generator=generator),
        "labels": ids.clone(),
    }


def lora_llama(modules_to_save: Optional[list[str]] = None) -> Any:
    """A tiny Llama under LoRA (r=4 on q_proj/v_proj); ``modules_to_save`` passed through."""
    # peft reads torch.distributed.tensor without importing it on some versions.
    import torch.distributed.tensor  # noqa: F401
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=modules_to_save
    )
    return get_peft_model(zoo.tiny_llama(), config)


def lora_llama_base() -> Any:
    """The tiny Llama LoRA is applied to (peft imported the way :func:`lora_llama` does)."""
    import torch.distributed.tensor  # noqa: F401

    return zoo.tiny_llama()


def text_batch(batch_size: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """Token ids with labels for the tiny Llama."""
    ids = torch.randint(0, zoo.VOCAB, (batch_size, length))
    return {"input_ids": ids, "labels": ids.clone()}


# ====================================================================== other VLM families
# Small enough that building one and diagnosing a step takes well under a second on a CPU core.

_TEXT_LLAMA = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=zoo.VOCAB, max_position_embeddings=64,
)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _image_prompt(batch_size: int, n_image: int, text_len: int, generator: torch.Generator,
                  before: tuple[int, ...] = (), after: tuple[int, ...] = ()) -> torch.Tensor:
    """``before`` + ``n_image`` image placeholders + ``after`` + ``text_len`` text ids, per row."""
    text = torch.randint(3, 58, (batch_size, text_len), generator=generator)  # clear of special ids
    parts = [torch.tensor([before] * batch_size, dtype=torch.long).reshape(batch_size, len(before)),
             torch.full((batch_size, n_image), IMAGE_TOKEN),
             torch.tensor([after] * batch_size, dtype=torch.long).reshape(batch_size, len(after)), text]
    return torch.cat(parts, dim=1)


def _text_batch(ids: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra, "labels": ids.clone()}


_QWEN_VISION_START, _QWEN_VISION_END, _QWEN_VIDEO = 60, 61, 62


def _qwen2_vl() -> nn.Module:
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        # the flat (hub) layout: 4.x reads it at the top level, 5.x moves it into text_config
        vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        image_token_id=IMAGE_TOKEN, video_token_id=_QWEN_VIDEO, vision_start_token_id=_QWEN_VISION_START,
        vision_end_token_id=_QWEN_VISION_END, bos_token_id=0, eos_token_id=1,
    )
    return transformers.Qwen2VLForConditionalGeneration(config)


def _qwen2_vl_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # one 16x16 image per row: a 1x4x4 grid of 4-px patches, merged 2x2 -> 4 image tokens
    ids = _image_prompt(batch_size, 4, 6, generator, (_QWEN_VISION_START,), (_QWEN_VISION_END,))
    patch = 3 * 2 * 4 * 4  # channels x temporal x patch x patch
    extra = {
        "pixel_values": torch.randn(batch_size * 16, patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * batch_size),
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # 5.x: M-RoPE needs it
        extra["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return _text_batch(ids, **extra)


def _paligemma() -> nn.Module:
    config = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=8, patch_size=4, **_VISION),
        text_config=dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=zoo.VOCAB,
                         max_position_embeddings=64),
        image_token_index=IMAGE_TOKEN, vocab_size=zoo.VOCAB, projection_dim=32, hidden_size=32,
    )
    return transformers.PaliGemmaForConditionalGeneration(config)


def _paligemma_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _image_prompt(batch_size, 4, 6, generator)  # (8/4)^2 = 4 image tokens
    prefix = torch.zeros(batch_size, 7, dtype=torch.long)  # image + prompt attend both ways
    suffix = torch.ones(batch_size, ids.shape[1] - 7, dtype=torch.long)  # the answer, causal
    return _text_batch(ids, pixel_values=torch.randn(batch_size, 3, 8, 8, generator=generator),
                       token_type_ids=torch.cat([prefix, suffix], dim=1))


def _idefics3() -> nn.Module:
    config = transformers.Idefics3Config(
        vision_config=dict(image_size=16, patch_size=4, **_VISION), text_config=dict(_TEXT_LLAMA),
        image_token_id=IMAGE_TOKEN, scale_factor=2, pad_token_id=0,
    )
    return transformers.Idefics3ForConditionalGeneration(config)


def _idefics3_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _image_prompt(batch_size, 4, 6, generator)  # (16/4)^2 patches, pixel-shuffled by 2 -> 4 tokens
    return _text_batch(ids, pixel_values=torch.randn(batch_size, 1, 3, 16, 16, generator=generator))


def _blip2() -> nn.Module:
    config = transformers.Blip2Config(
        vision_config=dict(image_size=8, patch_size=4, **_VISION),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=16, vocab_size=zoo.VOCAB, max_position_embeddings=32),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=zoo.VOCAB, word_embed_proj_dim=32, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=4, image_token_index=IMAGE_TOKEN,
    )
    return transformers.Blip2ForConditionalGeneration(config)


def _blip2_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _image_prompt(batch_size, 4, 6, generator)  # one placeholder per query token
    return _text_batch(ids, pixel_values=torch.randn(batch_size, 3, 8, 8, generator=generator))


def _llava_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return llava_batch(batch_size, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))


@dataclass(frozen=True)
class VlmFamily:
    """A stock multimodal family, built tiny and trained adapter-only.

    ``adapters`` are name suffixes of the modules that train (the family's projector or
    connector, wherever this transformers keeps it); ``vision_layer`` the suffix of the
    vision tower's last (only) layer, for set-ups that also train it.
    """

    name: str
    model_class: str
    adapters: tuple[str, ...]
    vision_layer: str
    _build: Callable[[], nn.Module]
    _batch: Callable[[nn.Module, int, torch.Generator], dict[str, torch.Tensor]]

    @property
    def available(self) -> bool:
        return compat.has_model_class(self.model_class)

    @property
    def skip_reason(self) -> str:
        return f"transformers {compat.TRANSFORMERS_VERSION} has no {self.model_class}"

    def build(self, seed: int = 0) -> nn.Module:
        """Random weights, everything frozen but :meth:`adapter_names`, in train mode."""
        torch.manual_seed(seed)
        model = self._build()
        model.requires_grad_(False)
        for name in self.adapter_names(model):
            model.get_submodule(name).requires_grad_(True)
        return model.train()

    def batch(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        return self._batch(model, batch_size, torch.Generator().manual_seed(seed))

    def adapter_names(self, model: nn.Module) -> list[str]:
        """Full module names of the adapters in ``model`` (``model.visual.merger`` on 5.x, ...)."""
        return [_find(model, suffix) for suffix in self.adapters]

    def vision_layer_name(self, model: nn.Module) -> str:
        return _find(model, self.vision_layer)


def _find(model: nn.Module, suffix: str) -> str:
    names = [name for name, _ in model.named_modules() if name == suffix or name.endswith("." + suffix)]
    if len(names) != 1:
        raise LookupError(f"{type(model).__name__}: {len(names)} modules end in {suffix!r}: {names}")
    return names[0]


def _tiny_llava_untouched() -> nn.Module:
    return tiny_llava()


VLM_FAMILIES: dict[str, VlmFamily] = {
    family.name: family
    for family in [
        VlmFamily("Llava", "LlavaForConditionalGeneration", ("multi_modal_projector",),
                  "encoder.layers.0", _tiny_llava_untouched, _llava_batch),
        VlmFamily("Qwen2VL", "Qwen2VLForConditionalGeneration", ("visual.merger",), "visual.blocks.0",
                  _qwen2_vl, _qwen2_vl_batch),
        VlmFamily("PaliGemma", "PaliGemmaForConditionalGeneration", ("multi_modal_projector",),
                  "encoder.layers.0", _paligemma, _paligemma_batch),
        VlmFamily("Idefics3", "Idefics3ForConditionalGeneration", ("connector",),
                  "encoder.layers.0", _idefics3, _idefics3_batch),
        VlmFamily("Blip2", "Blip2ForConditionalGeneration", ("qformer", "language_projection"),
                  "encoder.layers.0", _blip2, _blip2_batch),
    ]
}


__all__ = ["IMAGE_TOKEN", "VLM_FAMILIES", "VlmFamily", "llava_batch", "llava_projector_name", "lora_llama", "lora_llama_base", "text_batch", "tiny_llava"]
