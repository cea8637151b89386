"""Healthy models pass (exit 0) — and the diagnosis leaves them as they were."""

from __future__ import annotations

import pytest
import torch

import zoo
from diagnostics import diagnose
from diag_helpers import line_of

HEALTHY = [zoo.MemLike, zoo.FrozenInEval, zoo.TrackedPixels]


class TestHealthyModels:
    @pytest.mark.parametrize("cls", HEALTHY, ids=[c.__name__ for c in HEALTHY])
    def test_ok_when_proj_gets_gradient(self, cls) -> None:
        model = cls()
        out = model(**zoo.make_batch())  # really healthy: the user's own check
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("proj"))
        report = diagnose(cls(), zoo.make_batch(), expect_trainable=["proj"])
        assert report.status == "ok", report.to_text()
        assert not report.errors
        assert report.loss.grad_fn is not None
        assert "loss ← base_llm (frozen, carries grad) ← proj (trainable)" in report.paths

    def test_untracked_encoder_is_fine(self) -> None:
        report = diagnose(zoo.MemLike(), zoo.make_batch(), expect_trainable=["proj"])
        assert "ocr_embed: frozen, untracked — fine" in report.paths
        assert not any(f.cause == "wasted_tracking" for f in report.findings)

    def test_tracked_pixels_warns_with_bytes(self) -> None:
        report = diagnose(zoo.TrackedPixels(), zoo.make_batch(), expect_trainable=["proj"])
        waste = [f for f in report.findings if f.cause == "wasted_tracking"]
        assert len(waste) == 1 and waste[0].severity == "warning"
        assert waste[0].module == "ocr_embed"
        assert waste[0].extra["bytes"] > 0 and f"{waste[0].extra['bytes']:,} bytes" in waste[0].message
        assert waste[0].line == line_of(zoo.TrackedPixels.embed_history, "requires_grad_(True)")
        assert report.to_json()["findings"][0]["bytes"] == waste[0].extra["bytes"]

    def test_model_state_is_restored(self) -> None:
        model = zoo.MemLike()
        marker = torch.full_like(model.proj[0].weight, 7.0)
        model.proj[0].weight.grad = marker
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        modes = {n: m.training for n, m in model.named_modules()}
        diagnose(model, zoo.make_batch(), expect_trainable=["proj"])
        assert model.proj[0].weight.grad is marker
        assert all(p.grad is None for n, p in model.named_parameters() if n != "proj.0.weight")
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert modes == {n: m.training for n, m in model.named_modules()}
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert not torch.nn.modules.module._global_forward_hooks
        assert torch.is_grad_enabled()


def _lora_model(reentrant: bool, inputs_require_grad: bool):
    # peft 0.21 reads torch.distributed.tensor without importing it; transformers 5 happens to
    # import it first, 4.x does not.
    import torch.distributed.tensor  # noqa: F401
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        zoo.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    # Whether gradient checkpointing registers the input-require-grads hook differs between
    # transformers versions (5.x always, 4.x only under PEFT): set the state explicitly.
    llm = model.base_model.model
    if inputs_require_grad:
        llm.enable_input_require_grads()
    elif getattr(llm, "_require_grads_hook", None) is not None:
        llm.disable_input_require_grads()
    model.train()
    ids = torch.randint(0, zoo.VOCAB, (2, 8))
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.filterwarnings("ignore::FutureWarning")
class TestPeftLora:
    def test_reentrant_checkpoint_without_input_grads_is_found(self) -> None:
        model, batch = _lora_model(reentrant=True, inputs_require_grad=False)
        report = diagnose(model, batch, expect_trainable=["*lora_*"])
        assert report.status == "error"
        finding = next(f for f in report.errors if f.cause == "reentrant_checkpoint")
        assert any("lora_A" in p for p in finding.params)
        assert finding.file and finding.line

    def test_non_reentrant_checkpoint_is_ok(self) -> None:
        model, batch = _lora_model(reentrant=False, inputs_require_grad=False)
        report = diagnose(model, batch, expect_trainable=["*lora_*"])
        assert report.status == "ok", report.to_text()
        zero = [f for f in report.findings if f.cause == "unused_param"]
        assert all(f.severity == "info" for f in zero)  # lora_B starts at zero: expected

    def test_reentrant_with_input_grads_is_ok_and_not_wasted(self) -> None:
        model, batch = _lora_model(reentrant=True, inputs_require_grad=True)
        report = diagnose(model, batch, expect_trainable=["*lora_*"])
        assert report.status == "ok", report.to_text()
        assert not any(f.cause == "wasted_tracking" for f in report.findings)
