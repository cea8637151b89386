"""Write (or extend) tests/data/golden_memmodel.safetensors: golden values of the tiny MEMModel forward.

    PYTHONPATH=. python tests/data/make_golden_memmodel.py

For the tiny preset (``ocrmem.tiny.write_tiny(dir, seed=0)``, default read-out) and a fixed
batch (``synthetic_memory_examples(2, seed=0)``), on both paths, it stores what enters and
leaves each stage of the numeric path: the pixels the encoder sees (row and column means per
page), the encoder's features, the merged LLM input embeds (first 16 of 64 dims), the
position ids and attention mask the LLM gets, a slice of the logits (every real position,
every 32nd vocabulary entry; padding positions zeroed) and the loss. Keys are ``{family}/{path}/{what}``, family = the tiny
LLM's model_type (qwen3 on transformers >= 4.51, qwen2 before), path = ``fast``
(MemoryCollator batch) or ``seed`` (``model(input_ids, attention_mask, labels)``).

Run it once per family (e.g. in the oldest tox env for qwen2): other families' keys are kept.
The metadata records the environment; tests/ocrmem/test_golden_memmodel.py skips (saying why)
when the family or the font is not the stored one. Regenerate only for an intended change of
the numeric path, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "golden_memmodel.safetensors"
BATCH_SIZE = 2
SEED = 0
EMBED_DIMS = 16  # of the tiny LLM's 64
LOGIT_STRIDE = 32  # every 32nd vocabulary entry


def environment(model: Any) -> dict[str, str]:
    """What the stored values depend on besides the code."""
    import PIL
    import transformers

    font = Path(model.renderer.font_path)
    return {
        "family": model.base_llm.config.model_type,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "font": font.name if font else "",
        "font_bytes": str(font.stat().st_size) if font else "",
    }


def capture(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``model(**batch)`` (no grad) and record the stage boundaries."""
    seen: dict[str, torch.Tensor] = {}

    def on_encoder(module: Any, args: tuple, output: torch.Tensor) -> None:
        pixels = args[0].detach().float()  # (P, 3, S, S)
        seen["pixel_row_means"] = pixels.mean(dim=(1, 3))  # (P, S)
        seen["pixel_col_means"] = pixels.mean(dim=(1, 2))  # (P, S)
        seen["vision_features"] = output.detach().float()  # (P, T, D)

    def on_llm(module: Any, args: tuple, kwargs: dict) -> None:
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().float()[..., :EMBED_DIMS]  # (B, L, 16)
        seen["position_ids"] = kwargs["position_ids"].detach()
        seen["llm_attention_mask"] = kwargs["attention_mask"].detach()

    hooks = [
        model.ocr_embed.register_forward_hook(on_encoder),
        model.base_llm.register_forward_pre_hook(on_llm, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    # Logits at left-padding positions mean nothing and differ between transformers versions
    # (how a fully masked query row is handled): zeroed, so only real positions are compared.
    real = out.attention_mask.detach().bool()[..., None]  # (B, L, 1)
    seen["logits"] = (out.logits.detach().float()[..., ::LOGIT_STRIDE] * real).contiguous()  # (B, L, ceil(V / 32))
    seen["loss"] = out.loss.detach().float().reshape(1)
    seen["labels"] = out.labels.detach()
    return seen


def compute(tiny_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Golden values of both paths for the tiny preset in ``tiny_dir``: ``(tensors, environment)``."""
    from ocrmem import MEMModel
    from ocrmem.data import MemoryCollator, seed_path_batch, synthetic_memory_examples

    model = MEMModel.from_pretrained(tiny_dir).eval()
    examples = synthetic_memory_examples(BATCH_SIZE, seed=SEED)
    fast = MemoryCollator.for_model(model)(examples)
    seed = seed_path_batch(model.tokenizer, examples)
    env = environment(model)
    family = env["family"]
    tensors: dict[str, torch.Tensor] = {}
    for path, batch in (("fast", fast), ("seed", seed)):
        tensors[f"{family}/{path}/input_ids"] = batch["input_ids"]
        for what, value in capture(model, batch).items():
            tensors[f"{family}/{path}/{what}"] = value.contiguous()
    return tensors, env


def main(argv: list[str] | None = None) -> int:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ocrmem.tiny import write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tensors, env = compute(write_tiny(Path(tmp) / "tiny", seed=SEED))
    family = env["family"]
    stored: dict[str, torch.Tensor] = {}
    environments: dict[str, dict[str, str]] = {}
    if OUT.exists():
        with safe_open(str(OUT), framework="pt") as f:
            environments = json.loads(f.metadata()["environments"])
            stored = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(family + "/")}
    stored.update(tensors)
    environments[family] = env
    save_file(stored, str(OUT), metadata={"environments": json.dumps(environments, sort_keys=True)})
    print(f"wrote {len(tensors)} {family} tensors to {OUT} ({OUT.stat().st_size} bytes); environment {env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
