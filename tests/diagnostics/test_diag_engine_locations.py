"""Every error names a line of the user's code, even when the mechanism sits in a library.

* reentrant checkpointing set up by ``gradient_checkpointing_enable(...)`` → that call,
  with the library's ``checkpoint(...)`` frame kept as context;
* parameters frozen by ``peft.get_peft_model(...)`` → that call, and the fix
  (``modules_to_save=[...]`` or unfreeze after it);
* a trainable module kept in a plain list → the ``self.x = [...]`` assignment.

Each on two families (the tiny MEMModel preset and stock tiny transformers models), with
the bug and without it. Lines are found by searching this file's source, never hard-coded.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import nn

import hf_zoo
from diag_helpers import line_of, same_file
from diagnostics import FreezeWatch, diagnose

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LANGUAGE_QV = r".*language_model.*\.(q_proj|v_proj)"
MEM_LLM_QV = r".*base_llm.*\.(q_proj|v_proj)"


def _errors(report, cause):
    return [f for f in report.errors if f.cause == cause]


def _mem_model(tiny_dir):
    from ocrmem import MEMModel
    from ocrmem.data import build_sample_batch

    model = MEMModel.from_pretrained(tiny_dir)
    return model, build_sample_batch(model, batch_size=2, seed=0)


# ------------------------------------------------------------------ reentrant checkpointing


def lora_with_checkpointing(base: nn.Module, target: Any, reentrant: bool) -> nn.Module:
    """The user's set-up: LoRA, then gradient checkpointing through the HF API."""
    model = adapt(base, target, keep=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inner = model.base_model.model
    if getattr(inner, "_require_grads_hook", None) is not None:
        inner.disable_input_require_grads()  # nothing upstream of the layers requires grad
    return model.train()


CHECKPOINTED = {
    "Llama": lambda: (hf_zoo.lora_llama_base(), ["q_proj", "v_proj"], hf_zoo.text_batch()),
    "Llava": lambda: (hf_zoo.tiny_llava(), LANGUAGE_QV, hf_zoo.llava_batch()),
}


@pytest.mark.parametrize("family", sorted(CHECKPOINTED))
class TestCheckpointConfiguredByLibrary:
    def test_reentrant_points_at_gradient_checkpointing_enable(self, family) -> None:
        base, target, batch = CHECKPOINTED[family]()
        model = lora_with_checkpointing(base, target, reentrant=True)
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(**batch).loss.backward()  # really broken: the loss has no grad_fn
        report = diagnose(model, batch, ["*lora_*"])
        finding = _errors(report, "reentrant_checkpoint")[0]
        assert same_file(finding.file, lora_with_checkpointing)
        assert finding.line == line_of(lora_with_checkpointing, "model.gradient_checkpointing_enable(")
        library = finding.extra["checkpoint_call_site"]
        assert "site-packages" in library["file"] and "transformers" in library["file"]
        assert f"{library['file']}:{library['line']}" in finding.message  # library frame as context

    def test_non_reentrant_is_ok(self, family) -> None:
        base, target, batch = CHECKPOINTED[family]()
        report = diagnose(lora_with_checkpointing(base, target, reentrant=False), batch, ["*lora_*"])
        assert report.status == "ok", report.to_text()


# ------------------------------------------------------------------ frozen by get_peft_model


def adapt(base: nn.Module, target: Any, keep: Optional[list[str]]) -> nn.Module:
    """The user's set-up: LoRA on the LLM, maybe keeping the projector trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=target, lora_dropout=0.0, modules_to_save=keep)
    model = get_peft_model(base, config)
    return model.train()


@pytest.fixture(params=["MEMModel", "Llava"])
def projector_family(request, tiny_dir):
    if request.param == "MEMModel":
        model, batch = _mem_model(tiny_dir)
        # PEFT matches modules_to_save as name suffixes: `proj` would also match `q_proj`
        return model, batch, MEM_LLM_QV, None, "base_model.model.proj"
    llava = hf_zoo.tiny_llava()
    prefix = f"base_model.model.{hf_zoo.llava_projector_name(llava)}"
    return llava, hf_zoo.llava_batch(), LANGUAGE_QV, "multi_modal_projector", prefix


class TestFrozenByPeft:
    def test_get_peft_model_call_and_fix_are_named(self, projector_family) -> None:
        base, batch, target, short, prefix = projector_family
        model = adapt(base, target, keep=None)
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))  # really frozen
        report = diagnose(model, batch, ["*lora_*", prefix])
        finding = next(f for f in _errors(report, "not_trainable") if f.params)
        assert same_file(finding.file, adapt)
        assert finding.line == line_of(adapt, "get_peft_model(base, config)")
        assert finding.extra["modules_to_save"] == short
        if short is not None:
            assert f"modules_to_save=[{short!r}]" in finding.message
        else:  # no modules_to_save entry can name it alone: the fix is to unfreeze after the call
            assert "cannot name `proj` alone" in finding.message and "end in it too" in finding.message
        assert f"model.{prefix}.requires_grad_(True)" in finding.message

    def test_watched_construction_gives_the_same_line(self, projector_family) -> None:
        base, batch, target, _, prefix = projector_family
        with FreezeWatch() as watch:
            model = adapt(base, target, keep=None)
        report = diagnose(model, batch, ["*lora_*", prefix], freeze_sites=watch.sites_for(model))
        finding = next(f for f in _errors(report, "not_trainable") if f.params)
        assert finding.line == line_of(adapt, "get_peft_model(base, config)")

    def test_the_suggested_fix_is_ok(self, projector_family) -> None:
        base, batch, target, short, prefix = projector_family
        model = adapt(base, target, keep=[short] if short else None)
        if short is None:
            model.get_submodule(prefix).requires_grad_(True)  # unfreeze after get_peft_model
        expect = ["*lora_*", "*modules_to_save*" if short else prefix]
        report = diagnose(model, batch, expect)
        assert report.status == "ok", report.to_text()


# ------------------------------------------------------------------ plain containers


class WithAuxHead(nn.Module):
    """The user's wrapper: a trainable scale head on any model's loss, kept in a list or registered."""

    def __init__(self, inner: nn.Module, registered: bool) -> None:
        super().__init__()
        self.inner = inner
        heads = [nn.Linear(1, 1)]
        self.heads = nn.ModuleList(heads) if registered else heads

    def forward(self, **batch: Any) -> Any:
        out = self.inner(**batch)
        scale = self.heads[0](torch.ones(1, 1)).squeeze().sigmoid()  # (): trainable loss weight
        out.loss = out.loss * (0.5 + scale)
        return out


@pytest.fixture(params=["MEMModel", "Llava"])
def any_family(request, tiny_dir):
    if request.param == "MEMModel":
        return _mem_model(tiny_dir)
    return hf_zoo.tiny_llava(), hf_zoo.llava_batch()


class TestPlainContainer:
    def test_points_at_the_assignment_of_the_container(self, any_family) -> None:
        inner, batch = any_family
        model = WithAuxHead(inner, registered=False)
        assert not any(n.startswith("heads") for n, _ in model.named_parameters())  # really unregistered
        report = diagnose(model, batch)
        finding = next(f for f in _errors(report, "not_trainable") if f.extra.get("unregistered") and f.line)
        assert same_file(finding.file, WithAuxHead)
        assert finding.line == line_of(WithAuxHead.__init__, "self.heads = ")
        assert finding.extra["call_site"]["line"] == line_of(WithAuxHead.forward, "self.heads[0](")
        assert "nn.ModuleList" in finding.message and finding.module.startswith("heads[0]")

    def test_registered_container_is_ok(self, any_family) -> None:
        inner, batch = any_family
        report = diagnose(WithAuxHead(inner, registered=True), batch)
        assert not _errors(report, "not_trainable"), report.to_text()
