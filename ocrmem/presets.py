"""Seed-scale preset: the user's real shapes (Qwen3-8B + full DeepEncoder + proj), built on ``meta``.

``meta`` tensors have shapes but no storage, so the 8.6 B-parameter table costs no memory and
takes a second. :func:`materialize_random` then gives the same model random bf16 weights on a GPU
for the throughput and memory benchmarks (``benchmarks/gpu_suite.py``).

    python -m ocrmem.presets                              # the table with the user's settings
    python -m ocrmem.presets --vision-embedding-size 1024 # the configuration that builds
    python -m ocrmem.presets --check                      # exit 1 when the configuration does not build

torch, transformers and the model modules are imported inside the functions: ``--help`` and
a bad argument answer before seconds of imports.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .encoder import DeepEncoder

EXIT_OK = 0  # the table is printed (with --check: and the configuration builds)
EXIT_DOES_NOT_BUILD = 1  # only with --check: building this configuration fails (the reason is printed)
EXIT_USAGE = 2  # bad arguments, or this transformers cannot build the preset (no Qwen3)

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
QWEN_IMAGE_PAD_ID = 151_655  # `<|image_pad|>` in Qwen's tokenizer: the memory placeholder
USER_VISION_EMBEDDING_SIZE = 512  # what the user's training script sets (a bug: the encoder emits 1024)


def build_seed_scale_llm(device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """Qwen3-8B's architecture with uninitialised (``meta``) or random weights.

    Raises:
        ConfigError: transformers < 4.51 has no Qwen3 (Qwen2's biased attention would miscount).
    """
    import torch

    from . import compat

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
    import torch

    from .encoder import DeepEncoder, DeepEncoderSpec

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
    from .projector import projector_parameter_count

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
    import torch

    from .configuration import MEMConfig
    from .modeling import MEMModel

    config = MEMConfig(
        base_model_name="<seed-scale Qwen3-8B>",
        ocr_model_name="<seed-scale DeepEncoder>",
        vision_embedding_size=vision_embedding_size,
        encoder_readout=readout,
        **{"memory_token_id": QWEN_IMAGE_PAD_ID, **config_kwargs},
    )
    llm = build_seed_scale_llm(device)
    encoder = build_seed_scale_encoder(readout, device)
    with torch.device(device):
        return MEMModel(config, base_llm=llm, ocr_embed=encoder)


def _rebuild_config_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Real values of the buffers that parameter-free, config-built submodules compute in ``__init__``.

    A rotary embedding's ``inv_freq`` is a function of its config, not a weight: random values
    would make a benchmark run a different computation. Rebuilding such a module on the CPU
    costs microseconds (it has no parameters).
    """
    import torch

    values: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own or not any(b.is_meta for b in own.values()) or getattr(module, "config", None) is None:
            continue
        if next(module.parameters(recurse=False), None) is not None:
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for buffer_name, value in fresh.named_buffers(recurse=False):
            values[f"{name}.{buffer_name}" if name else buffer_name] = value
    return values


def materialize_random(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cuda",
    std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """Give a ``meta``-device model random weights on ``device``, in place, for benchmarks.

    The 8.6 B-parameter seed-scale model never exists in float32 anywhere: it is cast to
    ``dtype`` while still on ``meta`` (free), then allocated once on ``device`` (17 GB in bf16).

    Initialisation (HF's defaults, so activations stay in the range a real checkpoint gives):
    weights ~ N(0, ``std``), biases 0, the weight of every ``*Norm*`` module 1. Buffers that a
    parameter-free, config-built module derives from its config (rotary ``inv_freq``) are
    recomputed exactly and keep their own dtype; other floating buffers (the CLIP position
    table of the ``tokens_plus_clip`` read-out) get N(0, ``std``). ``requires_grad`` flags are
    kept, so ``proj`` stays the only trainable part.

    Args:
        model: A module whose parameters and buffers are all on the ``meta`` device, e.g.
            :func:`build_seed_scale_model` ``(vision_embedding_size=1024)``.
        dtype: Dtype of every parameter and floating buffer (except recomputed ones);
            ``None`` means ``torch.bfloat16``.
        device: Where the weights are allocated.
        std: Standard deviation of the random weights.
        seed: Seeds the generator, so two calls give the same weights on the same device.

    Returns:
        ``model`` itself, now on ``device``.

    Raises:
        ConfigError: A parameter or buffer is not on ``meta`` (its values would be lost), or a
            non-floating buffer cannot be recomputed.
    """
    import torch

    with torch.no_grad():
        return _materialize(model, torch.bfloat16 if dtype is None else dtype, device, std, seed)


def _materialize(model: nn.Module, dtype: torch.dtype, device: str | torch.device, std: float, seed: int) -> nn.Module:
    """:func:`materialize_random`'s body (runs under ``no_grad``)."""
    import torch

    not_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if not_meta:
        raise ConfigError(
            f"materialize_random expects a model built on the meta device, but {not_meta[:5]} hold real "
            "values that would be overwritten; build it with device='meta' (e.g. build_seed_scale_model())."
        )
    exact = _rebuild_config_buffers(model)
    model.to(dtype)  # on meta: changes dtypes, allocates nothing
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif is_norm and name == "weight":
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buffer in list(module.named_buffers(recurse=False)):
            full_name = f"{module_name}.{name}" if module_name else name
            if full_name in exact:
                module._buffers[name] = exact[full_name].to(device)
            elif buffer.is_floating_point():
                buffer.normal_(0.0, std, generator=generator)
            else:
                raise ConfigError(
                    f"materialize_random cannot invent the integer buffer `{full_name}` "
                    f"{tuple(buffer.shape)}; build that module with real values or extend this function."
                )
    return model


_EPILOG = """\
exit status:
  0  the table is printed; with --check, the configuration also builds
  1  only with --check: building this configuration fails (the reason is printed: the
     user's 512 is rejected by the 1024-d encoder); without --check that is reported, exit 0
  2  bad arguments, or this transformers has no Qwen3 (needs transformers>=4.51)
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m ocrmem.presets``; returns the exit status (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m ocrmem.presets",
        description="Parameter table of the seed-scale model (Qwen3-8B + full DeepEncoder + proj), built on "
        "the meta device: no memory, no download.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--vision-embedding-size", type=int, default=USER_VISION_EMBEDDING_SIZE,
        help="proj input width (default 512, the user's setting — which the 1024-d encoder rejects)",
    )
    parser.add_argument("--readout", choices=("tokens_plus_clip", "deepseek_ocr"), default="tokens_plus_clip")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the configuration does not build (for CI); default: report it, exit 0")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    if args.vision_embedding_size < 1:
        print(f"{parser.prog}: error: --vision-embedding-size must be >= 1, got {args.vision_embedding_size} "
              "(the encoder emits 1024)", file=sys.stderr)
        return EXIT_USAGE
    print("building the seed-scale model on the meta device ...", file=sys.stderr, flush=True)
    from .modeling import format_parameter_report

    try:
        counts = seed_scale_counts(args.vision_embedding_size, args.readout)
    except ConfigError as err:  # no Qwen3 in this transformers
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(format_parameter_report(counts))
    try:
        build_seed_scale_model(args.vision_embedding_size, args.readout)
    except ConfigError as err:
        print(f"\nbuilding this model fails: {err}")
        return EXIT_DOES_NOT_BUILD if args.check else EXIT_OK
    print("\nthis configuration builds.")
    return EXIT_OK


__all__ = [
    "EXIT_DOES_NOT_BUILD",
    "EXIT_OK",
    "EXIT_USAGE",
    "QWEN3_8B",
    "QWEN_IMAGE_PAD_ID",
    "USER_VISION_EMBEDDING_SIZE",
    "build_seed_scale_encoder",
    "build_seed_scale_llm",
    "build_seed_scale_model",
    "main",
    "materialize_random",
    "seed_scale_counts",
]

if __name__ == "__main__":
    sys.exit(main())
