"""Stock transformers models built tiny, trained adapter-only, for the second model family.

* :func:`tiny_llava` — ``LlavaForConditionalGeneration`` with a 1-layer CLIP vision tower
  (8-px images, 4 patches) and a 1-layer Llama (hidden 32, vocab 64); everything frozen but
  the ``multi_modal_projector`` (the LLaVA stage-1 recipe).
* :func:`lora_llama` — a tiny Llama under ``peft.get_peft_model`` (LoRA on q/v).

Nothing is downloaded: configs only, random weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import zoo

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


__all__ = ["IMAGE_TOKEN", "llava_batch", "llava_projector_name", "lora_llama", "lora_llama_base", "text_batch", "tiny_llava"]
