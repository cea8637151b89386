"""GPU checks (``pytest -m gpu``). Without CUDA every test here skips with its reason.

* a bf16 autocast training step leaves proj with finite, non-zero gradients;
* peak memory of a step: encoder untracked (ours) < tracked (the user's forced requires_grad);
* the SDPA attention path gives the same loss as eager attention;
* a seed-scale smoke step (Qwen3-8B shape + full DeepEncoder, random bf16 weights, batch 1)
  when at least 40 GB are free.
"""

from __future__ import annotations

import pytest
import torch

from conftest import gpu_test
from ocrmem import MEMModel
from ocrmem.compat import has_qwen3
from ocrmem.data import build_sample_batch

DEVICE = "cuda"


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_step_bytes(model: MEMModel, batch: dict) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


@gpu_test()
def test_bf16_autocast_step_gives_finite_proj_grads(tiny_dir):
    model = MEMModel.from_pretrained(tiny_dir).to(DEVICE).train()
    batch = _to(build_sample_batch(model, batch_size=2), DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, param in model.proj.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@gpu_test()
def test_untracked_encoder_peaks_lower_than_tracked(tiny_dir):
    model = MEMModel.from_pretrained(tiny_dir).to(DEVICE).train()
    batch = _to(build_sample_batch(model, batch_size=2), DEVICE)
    _peak_step_bytes(model, batch)  # warm-up: kernels, allocator
    untracked = _peak_step_bytes(model, batch)
    tracked = _peak_step_bytes(model, dict(batch, pixel_values=batch["pixel_values"].clone().requires_grad_(True)))
    print(f"peak step bytes: untracked {untracked:,} tracked {tracked:,}")
    assert untracked < tracked


@gpu_test()
def test_sdpa_and_eager_attention_agree(tiny_dir):
    losses = {}
    for impl in ("sdpa", "eager"):
        model = MEMModel.from_pretrained(tiny_dir).to(DEVICE).eval()
        model.base_llm.config._attn_implementation = impl
        batch = _to(build_sample_batch(model, batch_size=2), DEVICE)
        with torch.no_grad():
            losses[impl] = model(**batch).loss.float()
    torch.testing.assert_close(losses["sdpa"], losses["eager"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not has_qwen3(), reason="seed scale needs Qwen3 (transformers >= 4.51)")
@gpu_test(min_free_gb=40)
def test_seed_scale_smoke_step():
    from ocrmem.presets import QWEN_IMAGE_PAD_ID, build_seed_scale_model, materialize_random

    model = materialize_random(build_seed_scale_model(vision_embedding_size=1024), torch.bfloat16, DEVICE)
    model.train()
    pages, recent = 1, 256
    tokens = pages * model.tokens_per_page
    ids = torch.randint(0, 150_000, (1, tokens + recent), device=DEVICE)
    ids[:, :tokens] = QWEN_IMAGE_PAD_ID
    labels = ids.clone()
    labels[:, :tokens] = -100
    pixel_values = torch.randn(pages, 3, 1024, 1024, device=DEVICE, dtype=torch.bfloat16)
    out = model(input_ids=ids, labels=labels, pixel_values=pixel_values)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.proj.parameters())
    assert all(p.grad is None for p in model.base_llm.parameters())
