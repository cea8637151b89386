"""Static location of grad-disabling constructs (diagnostics.source)."""

from __future__ import annotations

import os
import sys

import torch

from diagnostics.source import CodeClassifier, grad_disable_kind, scan_callable, scan_function
from diag_helpers import line_of


def with_block(x):
    y = x * 2
    with torch.no_grad():
        z = y + 1
    return z


@torch.inference_mode()
def decorated(x):
    return x + 1


def switched(x):
    torch.set_grad_enabled(False)
    y = x + 1
    torch.set_grad_enabled(True)
    return y


def inference_off(x):
    with torch.inference_mode(False):
        return x + 1


class TestScanFunction:
    def test_with_block_found_when_line_inside(self) -> None:
        code = with_block.__code__
        inside = line_of(with_block, "z = y + 1")
        site = scan_function(code.co_filename, code.co_name, code.co_firstlineno, inside)
        assert site is not None and site.form == "with" and site.kind == "no_grad"
        assert site.location.line == line_of(with_block, "with torch.no_grad()")

    def test_with_block_ignored_when_line_outside(self) -> None:
        code = with_block.__code__
        outside = line_of(with_block, "y = x * 2")
        assert scan_function(code.co_filename, code.co_name, code.co_firstlineno, outside) is None

    def test_decorator_found_through_wrapper(self) -> None:
        site = scan_callable(decorated)
        assert site is not None and site.form == "decorator" and site.kind == "inference_mode"
        assert site.location.line == line_of(decorated, "@torch.inference_mode()")

    def test_set_grad_enabled_call_before_line(self) -> None:
        code = switched.__code__
        site = scan_function(code.co_filename, code.co_name, code.co_firstlineno, line_of(switched, "y = x + 1"))
        assert site is not None and site.form == "call"
        assert site.location.line == line_of(switched, "set_grad_enabled(False)")

    def test_set_grad_enabled_reenabled_is_not_reported(self) -> None:
        code = switched.__code__
        site = scan_function(code.co_filename, code.co_name, code.co_firstlineno, line_of(switched, "return y"))
        assert site is None

    def test_inference_mode_false_is_not_disabling(self) -> None:
        code = inference_off.__code__
        site = scan_function(code.co_filename, code.co_name, code.co_firstlineno, line_of(inference_off, "return x + 1"))
        assert site is None


class TestGradDisableKind:
    def test_recognises_aliases(self) -> None:
        import ast

        assert grad_disable_kind(ast.parse("torch.autograd.no_grad()").body[0].value) == "no_grad"
        assert grad_disable_kind(ast.parse("no_grad").body[0].value) == "no_grad"
        assert grad_disable_kind(ast.parse("torch.set_grad_enabled(flag)").body[0].value) == "set_grad_enabled"
        assert grad_disable_kind(ast.parse("torch.set_grad_enabled(True)").body[0].value) is None
        assert grad_disable_kind(ast.parse("torch.enable_grad()").body[0].value) is None


class TestCodeClassifier:
    def test_kinds(self, tmp_path) -> None:
        classifier = CodeClassifier([str(tmp_path)])
        assert classifier.kind(str(tmp_path / "model.py")) == "user"
        assert classifier.kind(str(tmp_path / ".venv/lib/site-packages/pkg/x.py")) == "library"
        assert classifier.kind(torch.__file__) == "torch"
        assert classifier.kind(os.__file__) == "torch"  # stdlib counts as plumbing
        assert classifier.kind(sys.modules["diagnostics.source"].__file__) == "internal"
        assert classifier.kind("/elsewhere/thing.py") == "library"
