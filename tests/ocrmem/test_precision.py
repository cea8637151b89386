"""bf16 and fp16 on CPU: a tiny training step with the dtype checked at every boundary (issue 13 item 2).

encoder features -> proj -> merged LLM input embeds -> loss. Each precision setup the user's
run can take is covered: CPU autocast over an fp32 model (the Trainer's ``--bf16`` without
DeepSpeed), frozen parts loaded in bf16/fp16 (``compute_dtype``) with an fp32 ``proj``, and
the whole model cast (what DeepSpeed's bf16 mode does to every parameter). A dropped cast
(e.g. of the vision embeds to the LLM's dtype, or of the features to proj's dtype) fails
here on CPU instead of first on a GPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ocrmem import MEMModel
from ocrmem.data import build_sample_batch

HALF_TYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_supports(dtype: torch.dtype) -> str | None:
    """None when conv, matmul, layer norm, SDPA and their backward run in ``dtype`` on this CPU, else why not."""
    try:
        conv = torch.nn.Conv2d(3, 4, 2).to(dtype)
        x = torch.randn(1, 3, 4, 4, dtype=dtype, requires_grad=True)
        y = torch.nn.functional.layer_norm(conv(x).flatten(1), (36,))
        q = y.view(1, 1, 4, 9)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    except (RuntimeError, NotImplementedError) as err:
        return f"{dtype} kernels are missing on this CPU build: {err}"
    return None


def run_step(model: MEMModel, batch: dict[str, torch.Tensor], autocast: torch.dtype | None = None) -> dict[str, Any]:
    """One forward/backward/AdamW step, recording the dtype at each boundary."""
    seen: dict[str, Any] = {}

    def on_sam(module, args, output):
        seen["sam"] = output.dtype

    def on_encoder(module, args, output):
        seen["features"] = output.dtype

    def on_proj(module, args, output):
        seen["proj_in"], seen["proj_out"] = args[0].dtype, output.dtype

    def on_llm(module, args, kwargs):
        seen["llm_embeds"] = kwargs["inputs_embeds"].dtype

    hooks = [
        model.ocr_embed.sam_model.register_forward_hook(on_sam),
        model.ocr_embed.register_forward_hook(on_encoder),
        model.proj.register_forward_hook(on_proj),
        model.base_llm.register_forward_pre_hook(on_llm, with_kwargs=True),
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        with context:
            out = model(**batch)
        out.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    seen["loss"] = out.loss
    seen["logits"] = out.logits.dtype
    seen["grads"] = [p.grad for p in params]
    optimizer.step()
    seen["moved"] = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    return seen


def check_trains(seen: dict[str, Any], model: MEMModel) -> None:
    assert torch.isfinite(seen["loss"]).all() and seen["loss"].item() > 0
    proj = [p for n, p in model.named_parameters() if n.startswith("proj.")]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in seen["grads"])
    assert all(g.dtype == p.dtype for g, p in zip(seen["grads"], proj))
    assert any(g.abs().sum() > 0 for g in seen["grads"])
    assert all(seen["moved"]), "AdamW left a proj tensor unchanged"


@pytest.fixture(scope="module")
def batch(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return build_sample_batch(MEMModel.from_pretrained(tiny_dir), batch_size=2, seed=0)


@pytest.fixture(scope="module")
def fp32_loss(tiny_dir: Path, batch) -> float:
    with torch.no_grad():
        return MEMModel.from_pretrained(tiny_dir).eval()(**batch).loss.item()


def check_close_to_fp32(loss: torch.Tensor, fp32_loss: float) -> None:
    """The half-precision paths compute the same thing as fp32. bf16 keeps 8 significant bits
    (relative step 3.9e-3, fp16: 4.9e-4); a loss of ~7 over ~20 targets through two layers
    lands within a few steps of fp32's, while a lost cast or a wrong merge moves it by > 10 %."""
    assert loss.item() == pytest.approx(fp32_loss, rel=2e-2)


@pytest.mark.parametrize("name", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_autocast_step_on_fp32_model(tiny_dir: Path, batch, fp32_loss: float, name: str) -> None:
    """Trainer --bf16/--fp16 without DeepSpeed: fp32 weights, CPU autocast."""
    dtype = HALF_TYPES[name]
    if reason := cpu_supports(dtype):
        pytest.skip(reason)
    model = MEMModel.from_pretrained(tiny_dir)
    seen = run_step(model, batch, autocast=dtype)
    assert seen["sam"] == dtype  # the encoder's convs and matmuls ran in the autocast dtype
    assert seen["features"] == torch.float32  # its residual stream (after fp32 layer norms) is fp32
    assert seen["proj_in"] == torch.float32  # features cast to proj's weights
    assert seen["proj_out"] == dtype  # autocast Linear
    assert seen["llm_embeds"] == model.base_llm.get_input_embeddings().weight.dtype == torch.float32
    assert seen["loss"].dtype == torch.float32
    check_trains(seen, model)
    check_close_to_fp32(seen["loss"], fp32_loss)


@pytest.mark.parametrize("name", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_half_loaded_frozen_parts_with_fp32_proj(tiny_dir: Path, batch, fp32_loss: float, name: str) -> None:
    """compute_dtype: encoder and LLM loaded in half precision, proj kept in fp32 for training."""
    dtype = HALF_TYPES[name]
    if reason := cpu_supports(dtype):
        pytest.skip(reason)
    model = MEMModel.from_pretrained(tiny_dir, compute_dtype=name)
    assert {p.dtype for p in model.ocr_embed.parameters()} == {dtype}
    assert {b.dtype for b in model.ocr_embed.buffers() if b.is_floating_point()} <= {dtype}
    assert {p.dtype for p in model.base_llm.parameters()} == {dtype}
    assert {p.dtype for p in model.proj.parameters()} == {torch.float32}
    seen = run_step(model, batch)
    assert (seen["sam"], seen["features"], seen["proj_in"], seen["proj_out"], seen["llm_embeds"]) == (
        dtype, dtype, torch.float32, torch.float32, dtype
    )
    assert seen["logits"] == dtype
    assert seen["loss"].dtype == torch.float32  # the loss upcasts the logits
    check_trains(seen, model)
    check_close_to_fp32(seen["loss"], fp32_loss)


def test_whole_model_cast_to_bf16(tiny_dir: Path, batch, fp32_loss: float) -> None:
    """What DeepSpeed's bf16 mode does: every parameter (proj included) in bf16."""
    if reason := cpu_supports(torch.bfloat16):
        pytest.skip(reason)
    model = MEMModel.from_pretrained(tiny_dir).to(torch.bfloat16)
    floating = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert floating == {torch.bfloat16}
    seen = run_step(model, batch)
    assert {seen["sam"], seen["features"], seen["proj_in"], seen["proj_out"], seen["llm_embeds"], seen["logits"]} == {torch.bfloat16}
    check_trains(seen, model)
    check_close_to_fp32(seen["loss"], fp32_loss)
