"""The caller's grad mode: a step entered with grad already off is an error, named at its line.

Two families (the tiny MEMModel preset and a stock tiny LLaVA, projector trainable), each
with the bug (an evaluation helper left ``set_grad_enabled(False)`` on) and without it (the
same helper scoped by ``with torch.no_grad()``). The diagnosis must run in the caller's mode
(never fix it) and leave it as it found it.
"""

from __future__ import annotations

import importlib.util
import textwrap
from typing import Iterator

import pytest
import torch

import eval_helpers
import hf_zoo
import zoo
from diag_helpers import line_of, same_file
from diagnostics import FreezeWatch, diagnose
from diagnostics.source import unrestored_grad_switches


@pytest.fixture(autouse=True)
def _restore_grad_mode() -> Iterator[None]:
    yield
    torch.set_grad_enabled(True)  # a failing test must not leave the next one without autograd


def _grad_disabled(report):
    errors = [f for f in report.errors if f.cause == "grad_disabled"]
    assert errors, report.to_text()
    return errors[0]


def _mem(tiny_model, tiny_batch):
    return tiny_model.train(), tiny_batch, ["proj"]


def _llava(*_):
    llava = hf_zoo.tiny_llava()
    return llava, hf_zoo.llava_batch(), [hf_zoo.llava_projector_name(llava)]


FAMILIES = [_mem, _llava]


@pytest.fixture(params=FAMILIES, ids=["MEMModel", "Llava"])
def family(request, tiny_dir):
    if request.param is _mem:
        from ocrmem import MEMModel
        from ocrmem.data import build_sample_batch

        model = MEMModel.from_pretrained(tiny_dir)
        return _mem(model, build_sample_batch(model, batch_size=2, seed=0))
    return _llava()


class TestGradLeftOff:
    def test_unrestored_switch_is_an_error_at_its_line(self, family) -> None:
        model, batch, expect = family
        eval_helpers.evaluate_and_forget(model, batch)
        assert model(**batch).loss.grad_fn is None  # really broken: the user's step has no graph
        report = diagnose(model, batch, expect)
        finding = _grad_disabled(report)
        assert report.status == "error"
        assert same_file(finding.file, eval_helpers)
        assert finding.line == line_of(eval_helpers.evaluate_and_forget, "torch.set_grad_enabled(False)")
        assert finding.extra["found_by"] == "static"
        assert "already disabled when the forward was called" in finding.message
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(finding.params) == trainable
        assert not torch.is_grad_enabled()  # not fixed for the caller
        assert report.loss.grad_fn is None

    def test_scoped_evaluation_is_ok(self, family) -> None:
        model, batch, expect = family
        eval_helpers.evaluate_properly(model, batch)
        assert model(**batch).loss.grad_fn is not None  # really healthy
        report = diagnose(model, batch, expect)
        assert report.status == "ok", report.to_text()
        assert torch.is_grad_enabled()

    def test_enclosing_no_grad_block_is_named(self, family) -> None:
        model, batch, expect = family
        with torch.no_grad():
            report = diagnose(model, batch, expect)
            assert not torch.is_grad_enabled()
        finding = _grad_disabled(report)
        assert finding.extra["found_by"] == "enclosing"
        assert finding.line == line_of(TestGradLeftOff.test_enclosing_no_grad_block_is_named, "with torch.no_grad()")
        assert torch.is_grad_enabled()

    def test_inference_mode_caller_is_named(self) -> None:
        model, batch, expect = _llava()
        with torch.inference_mode():
            report = diagnose(model, batch, expect)
        finding = _grad_disabled(report)
        assert "inference mode was already on" in finding.message
        assert finding.line == line_of(TestGradLeftOff.test_inference_mode_caller_is_named, "torch.inference_mode()")


class TestSwitchFoundOnlyAtRuntime:
    def test_watched_factory_names_the_switch(self) -> None:
        with FreezeWatch():
            model, batch, expect = _llava()
            eval_helpers.set_training_mode(model, False)  # torch.set_grad_enabled(training): no literal
        model.train()
        report = diagnose(model, batch, expect)
        finding = _grad_disabled(report)
        assert finding.extra["found_by"] == "watched"
        assert finding.line == line_of(eval_helpers.set_training_mode, "torch.set_grad_enabled(training)")

    def test_unlocated_switch_says_so_and_points_at_the_call(self, tmp_path) -> None:
        script = tmp_path / "train_script.py"
        script.write_text(textwrap.dedent('''
            import torch
            from diagnostics import diagnose

            def set_mode(training):
                torch.set_grad_enabled(training)

            def step(model, batch, root):
                set_mode(False)
                return diagnose(model, batch, ["proj"], user_roots=[root])
        '''))
        spec = importlib.util.spec_from_file_location("train_script", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        report = module.step(zoo.MemLike(), zoo.make_batch(), str(tmp_path))
        finding = _grad_disabled(report)
        assert finding.extra["found_by"] is None
        assert "no switch that did it was found" in finding.message
        call_line = script.read_text().splitlines().index("    return diagnose(model, batch, [\"proj\"], user_roots=[root])") + 1
        assert finding.file == str(script) and finding.line == call_line  # the user's diagnose(...) call


class LeavesGradOff(zoo.MemLike):
    """The model's own forward switches grad off for proj and never restores it."""

    def embed_history(self, pixel_values: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(False)
        feats = self.ocr_embed(pixel_values)
        return self.proj(feats)


def test_mode_switched_inside_the_forward_is_restored_after() -> None:
    report = diagnose(LeavesGradOff(), zoo.make_batch(), ["proj"])
    finding = _grad_disabled(report)
    assert finding.line == line_of(LeavesGradOff.embed_history, "torch.set_grad_enabled(False)")
    assert "already disabled" not in finding.message  # the model's code, not the caller's mode
    assert torch.is_grad_enabled()


def test_unrestored_switches_static_scan(tmp_path) -> None:
    source = tmp_path / "helpers.py"
    source.write_text(textwrap.dedent('''
        import torch

        def leaves_off():
            torch.set_grad_enabled(False)

        def restores():
            torch.set_grad_enabled(False)
            x = 1
            torch.set_grad_enabled(True)

        def restores_saved(prev):
            torch.set_grad_enabled(False)
            torch.set_grad_enabled(prev)

        def enters():
            torch.no_grad().__enter__()

        def enters_and_exits():
            ctx = torch.inference_mode()
            torch.inference_mode().__enter__()
            ctx.__exit__(None, None, None)

        def scoped():
            with torch.no_grad():
                pass
    '''))
    found = {(s.location.function, s.kind) for s in unrestored_grad_switches(str(source))}
    assert found == {("leaves_off", "set_grad_enabled"), ("enters", "no_grad")}
