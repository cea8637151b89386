"""Each buggy zoo model really has its bug; the engine names the cause and the line.

Lines are found by searching zoo.py's source (``helpers.line_of``), never hard-coded.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import zoo
from diagnostics import diagnose
from diagnostics.causes import ERROR
from diag_helpers import line_of, same_file


def _error(report, cause):
    matches = [f for f in report.findings if f.severity == ERROR and f.cause == cause]
    assert matches, f"no {cause} error in:\n{report.to_text()}"
    return matches[0]


def _really_broken(model: torch.nn.Module, batch: dict) -> None:
    """Independent of the engine: the user's own check fails on this model."""
    try:
        out = model(**batch)
        out.loss.backward()
    except RuntimeError:
        return
    proj_grads = [p.grad for n, p in model.named_parameters() if n.startswith("proj")]
    assert not proj_grads or any(g is None for g in proj_grads), "the bug model trains proj"


CASES = [
    # (class, cause, object holding the responsible line, snippet of that line)
    (zoo.ProjUnderNoGrad, "grad_disabled", zoo.ProjUnderNoGrad.embed_history, "with torch.no_grad()"),
    (zoo.DetachedVisionEmbeds, "detached", zoo.DetachedVisionEmbeds.embed_history, ".detach()"),
    (zoo.ReentrantCheckpoint, "reentrant_checkpoint", zoo.ReentrantCheckpoint.embed_history, "checkpoint("),
    (zoo.SetGradEnabledOff, "grad_disabled", zoo.SetGradEnabledOff.embed_history, "set_grad_enabled(False)"),
    (zoo.DataAttribute, "detached", zoo.DataAttribute.embed_history, ".data"),
    (zoo.NumpyRoundTrip, "detached", zoo.NumpyRoundTrip.embed_history, ".numpy()"),
    (zoo.TolistRewrap, "detached", zoo.TolistRewrap.embed_history, ".tolist()"),
    (zoo.LlmUnderNoGrad, "grad_disabled", zoo.LlmUnderNoGrad.forward, "with torch.no_grad()"),
]


class TestBugModels:
    @pytest.mark.parametrize("cls, cause, holder, snippet", CASES, ids=[c[0].__name__ for c in CASES])
    def test_cause_and_line_when_proj_gets_no_gradient(self, cls, cause, holder, snippet) -> None:
        _really_broken(cls(), zoo.make_batch())
        report = diagnose(cls(), zoo.make_batch(), expect_trainable=["proj"])
        assert report.status == "error"
        finding = _error(report, cause)
        assert same_file(finding.file, zoo)
        assert finding.line == line_of(holder, snippet)
        assert finding.module == "proj"
        assert set(finding.params) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
        assert report.loss.grad_fn is None and report.loss.requires_grad is False

    def test_fix_sentence_names_the_block(self) -> None:
        report = diagnose(zoo.ProjUnderNoGrad(), zoo.make_batch(), expect_trainable=["proj"])
        message = _error(report, "grad_disabled").message
        assert "`with torch.no_grad()`" in message and "move proj out of the block" in message
        assert "element 0 of tensors does not require grad" in report.to_text()

    def test_carrier_under_no_grad_is_named(self) -> None:
        report = diagnose(zoo.LlmUnderNoGrad(), zoo.make_batch(), expect_trainable=["proj"])
        finding = _error(report, "grad_disabled")
        assert finding.extra["culprit_module"] == "base_llm"
        assert "carry gradient back to proj" in finding.message

    def test_blanket_freeze_points_at_the_loop(self) -> None:
        model = zoo.BlanketFreeze()
        _really_broken(model, zoo.make_batch())
        report = diagnose(model, zoo.make_batch(), expect_trainable=["proj"])
        finding = next(f for f in report.findings if f.cause == "not_trainable" and f.params)
        assert set(finding.params) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
        assert same_file(finding.file, zoo)
        assert finding.line == line_of(zoo.BlanketFreeze.__init__, "requires_grad = False")
        assert any(f.cause == "no_trainable_params" for f in report.findings)

    def test_library_inference_mode_gives_library_line_and_user_call_site(self, fake_site) -> None:
        import fake_ocr_encoder

        model = zoo.LibraryInferenceEncoder()
        with pytest.raises(RuntimeError, match="Inference tensors"):
            model(**zoo.make_batch())  # really broken
        report = diagnose(model, zoo.make_batch(), expect_trainable=["proj"])
        finding = _error(report, "grad_disabled")
        assert same_file(finding.file, fake_ocr_encoder)
        assert finding.line == line_of(fake_ocr_encoder.InferenceModeEncoder.forward, "@torch.inference_mode()")
        call_line = line_of(zoo.LibraryInferenceEncoder.embed_history, "self.ocr_embed(pixel_values)")
        assert finding.extra["call_site"]["line"] == call_line
        assert f"zoo.py:{call_line}" in finding.message
        assert report.error is not None and report.error.explained
        assert not report.cannot_run

    def test_all_labels_ignored_gives_nan_loss(self) -> None:
        report = diagnose(zoo.MemLike(), zoo.make_batch(all_ignored=True), expect_trainable=["proj"])
        finding = _error(report, "nan_loss")
        assert "-100" in finding.message and "`labels`" in finding.message

    def test_unregistered_trainable_module_is_reported(self) -> None:
        report = diagnose(zoo.UnregisteredProj(), zoo.make_batch(), expect_trainable=["proj"])
        causes = {f.cause for f in report.errors}
        assert {"not_trainable", "no_trainable_params"} <= causes
        finding = next(f for f in report.errors if f.extra.get("unregistered") and f.line)
        assert finding.module.startswith("projectors[0]")
        assert finding.line == line_of(zoo.UnregisteredProj.__init__, "self.projectors = [make_proj()]")
        assert finding.extra["call_site"]["line"] == line_of(zoo.UnregisteredProj.embed_history, "self.projectors[0](feats)")

    def test_module_that_never_ran_is_unused_param(self) -> None:
        batch = zoo.make_batch()
        batch.pop("pixel_values")  # a batch without history: proj is skipped
        report = diagnose(zoo.SkipsProjWithoutHistory(), batch, expect_trainable=["proj"])
        finding = _error(report, "unused_param")
        assert "never ran" in finding.message and finding.module == "proj"


class TestUnrelatedErrors:
    def test_shape_error_is_not_explained(self) -> None:
        model = zoo.MemLike()
        model.proj = zoo.make_proj(vision_dim=zoo.VISION_DIM * 2)
        report = diagnose(model, zoo.make_batch())
        assert report.cannot_run
        assert report.error.stage == "forward"
        assert "mat1" in report.error.message or "shape" in report.error.message
        assert report.error.file is not None and report.error.file.endswith("zoo.py")


def test_zoo_lines_are_unique_enough() -> None:
    # Guard for the line lookups above: the snippets must exist in the right methods.
    assert "with torch.no_grad()" in inspect.getsource(zoo.ProjUnderNoGrad.embed_history)
