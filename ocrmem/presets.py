"""Seed-scale preset: the user's real shapes (Qwen3-8B + full DeepEncoder + proj), built on ``meta``.

``meta`` tensors have shapes but no storage, so the 8.6 B-parameter table costs no memory and
takes a second. The same builder materialises random bf16 weights on a GPU for benchmarks.

    python -m ocrmem.presets                              # the table with the user's settings
    python -m ocrmem.presets --vision-embedding-size 1024 # the configuration that builds
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn

from . import compat
from .configuration import MEMConfig
from .encoder import DeepEncoder, DeepEncoderSpec
from .errors import ConfigError
from .modeling import format_parameter_report
from .projector import projector_parameter_count

# Qwen3-8B, from its public config.json: 8,190,735,360 parameters.
QWEN3_8B = dict(
    vocab_size=151_936,
    hidden_size=4096,
    intermediate_size=12_288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40_960,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)
USER_VISION_EMBEDDING_SIZE = 512  # what the user's training script sets (a bug: the encoder emits 1024)


def build_seed_scale_llm(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """Qwen3-8B's architecture with uninitialised (``meta``) or random weights.

    Raises:
        ConfigError: transformers < 4.51 has no Qwen3 (Qwen2's biased attention would miscount).
    """
    if not compat.has_qwen3():
        raise ConfigError(
            f"the seed-scale preset needs Qwen3, which transformers {compat.TRANSFORMERS_VERSION} lacks; "
            "install transformers>=4.51 for seed-scale tables."
        )
    config_cls, model_cls = compat.tiny_llm_classes()
    config = config_cls(**QWEN3_8B)
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype) if dtype is not None else model


def build_seed_scale_encoder(readout: str = "tokens_plus_clip", device: str | torch.device = "meta") -> DeepEncoder:
    """The full-size DeepEncoder (SAM ViT-B + compressor + CLIP-L)."""
    with torch.device(device):
        return DeepEncoder(DeepEncoderSpec.full(), readout=readout)


def seed_scale_counts(
    vision_embedding_size: int = USER_VISION_EMBEDDING_SIZE,
    readout: str = "tokens_plus_clip",
    projector_type: str = "mlp2x_gelu",
) -> dict[str, tuple[int, int]]:
    """``{module: (trainable, total)}`` at seed scale, computed without building ``MEMModel``.

    Building would (rightly) fail for the user's 512 — the table is how they never noticed.
    """
    llm = build_seed_scale_llm()
    encoder = build_seed_scale_encoder(readout)
    proj = projector_parameter_count(projector_type, vision_embedding_size, QWEN3_8B["hidden_size"])
    return {
        "base_llm": (0, sum(p.numel() for p in llm.parameters())),
        "ocr_embed": (0, sum(p.numel() for p in encoder.parameters())),
        "proj": (proj, proj),
    }


def build_seed_scale_model(
    vision_embedding_size: int | None = None,
    readout: str = "tokens_plus_clip",
    device: str | torch.device = "meta",
    **config_kwargs: Any,
):
    """A seed-scale :class:`~ocrmem.modeling.MEMModel` on ``device`` (no tokenizer: fast path only).

    Raises:
        ConfigError: ``vision_embedding_size`` differs from the encoder width (the user's 512).
    """
    from .modeling import MEMModel

    config = MEMConfig(
        base_model_name="<seed-scale Qwen3-8B>",
        ocr_model_name="<seed-scale DeepEncoder>",
        vision_embedding_size=vision_embedding_size,
        encoder_readout=readout,
        **config_kwargs,
    )
    llm = build_seed_scale_llm(device)
    encoder = build_seed_scale_encoder(readout, device)
    with torch.device(device):
        return MEMModel(config, base_llm=llm, ocr_embed=encoder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ocrmem.presets",
        description="Parameter table of the seed-scale model (Qwen3-8B + full DeepEncoder + proj), built on "
        "the meta device: no memory, no download.",
    )
    parser.add_argument(
        "--vision-embedding-size", type=int, default=USER_VISION_EMBEDDING_SIZE,
        help="proj input width (default 512, the user's setting — which the 1024-d encoder rejects)",
    )
    parser.add_argument("--readout", choices=("tokens_plus_clip", "deepseek_ocr"), default="tokens_plus_clip")
    args = parser.parse_args(argv)
    print(format_parameter_report(seed_scale_counts(args.vision_embedding_size, args.readout)))
    try:
        build_seed_scale_model(args.vision_embedding_size, args.readout)
    except ConfigError as err:
        print(f"\nbuilding this model fails: {err}")
        return 1
    print("\nthis configuration builds.")
    return 0


__all__ = [
    "QWEN3_8B",
    "USER_VISION_EMBEDDING_SIZE",
    "build_seed_scale_encoder",
    "build_seed_scale_llm",
    "build_seed_scale_model",
    "main",
    "seed_scale_counts",
]

if __name__ == "__main__":
    sys.exit(main())
