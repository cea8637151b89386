"""Stock multimodal families nobody here wrote, trained adapter-only, healthy and with the bugs
users write: the diagnosis must say ``ok`` on the healthy set-up and, on each bug, name the
cause at the user's own line (this file), whatever family it is.

Families (:data:`hf_zoo.VLM_FAMILIES`): LLaVA, Qwen2-VL, PaliGemma, Idefics3, BLIP-2; only
their projector/connector trains. Cases, each a function below building the user's set-up:

* ``healthy`` — nothing wrong;
* ``adapter_under_no_grad`` — the adapter wrapped in a user module that runs it under
  ``torch.no_grad()``;
* ``adapter_frozen_after_setup`` — ``requires_grad_(False)`` on the adapter after it was made
  trainable;
* ``grad_left_off`` — the step entered with ``torch.set_grad_enabled(False)`` still on;
* ``features_detached`` — a forward hook detaching the image features the adapter returns;
* ``reentrant_checkpointing`` — the vision tower's last layer trained too, under
  ``gradient_checkpointing_enable(use_reentrant=True)`` with the input-embedding hook off;
* ``reentrant_adapter_only`` — the same checkpointing with only the adapter training, which is
  healthy: the adapter sits outside every checkpointed block and its output makes the LLM's
  inputs require grad.

Every expected line is found by searching this file's source, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from torch import nn

import hf_zoo
from diag_helpers import line_of, same_file
from diagnostics import diagnose

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@dataclass
class Case:
    """One user set-up: what to diagnose and what the diagnosis must say."""

    model: nn.Module
    batch: dict[str, torch.Tensor]
    expect: list[str]
    cause: Optional[str] = None  # None: healthy, status "ok"
    line: Optional[int] = None  # the user's line the finding must name
    params: set[str] = field(default_factory=set)  # parameters the finding must list (subset)


# ------------------------------------------------------------------ the user's code


class NoGradAdapter(nn.Module):
    """The user's wrapper: runs the adapter without autograd ("the tower is frozen anyway")."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.inner(*args, **kwargs)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def detach_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.detach()  # "the LLM only needs the values"


def _trainable(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and (n == prefix or n.startswith(prefix + "."))}


def _adapter_params(model: nn.Module, names: list[str]) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n.startswith(a + ".") for a in names)}


# ------------------------------------------------------------------ the cases


def healthy(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    return Case(model, family.batch(model), family.adapter_names(model))


def adapter_under_no_grad(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    names = family.adapter_names(model)
    wrapped = names[-1]  # the one whose output reaches the LLM
    replace_module(model, wrapped, NoGradAdapter(model.get_submodule(wrapped)))
    return Case(model, family.batch(model), names, "grad_disabled", line_of(NoGradAdapter.forward, "with torch.no_grad()"),
                _trainable(model, wrapped))


def adapter_frozen_after_setup(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    names = family.adapter_names(model)
    for name in names:
        model.get_submodule(name).requires_grad_(False)  # a warm-up phase, never undone
    return Case(model, family.batch(model), names, "not_trainable",
                line_of(adapter_frozen_after_setup, ".requires_grad_(False)"), _adapter_params(model, names))


def grad_left_off(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    batch = family.batch(model)
    torch.set_grad_enabled(False)  # an evaluation pass before the step, never switched back
    return Case(model, batch, family.adapter_names(model), "grad_disabled",
                line_of(grad_left_off, "torch.set_grad_enabled(False)"), _adapter_params(model, family.adapter_names(model)))


def features_detached(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    names = family.adapter_names(model)
    model.get_submodule(names[-1]).register_forward_hook(detach_output)
    return Case(model, family.batch(model), names, "detached", line_of(detach_output, "output.detach()"),
                _adapter_params(model, names))


def reentrant_checkpointing(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    layer = family.vision_layer_name(model)
    model.get_submodule(layer).requires_grad_(True)  # also tune the tower's last layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()  # frozen embeddings: nothing into the layer requires grad
    names = family.adapter_names(model) + [layer]
    return Case(model, family.batch(model), names, "reentrant_checkpoint",
                line_of(reentrant_checkpointing, "model.gradient_checkpointing_enable("), _trainable(model, layer))


def reentrant_adapter_only(family: hf_zoo.VlmFamily) -> Case:
    model = family.build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    return Case(model, family.batch(model), family.adapter_names(model))


CASES: dict[str, Callable[[hf_zoo.VlmFamily], Case]] = {
    fn.__name__: fn
    for fn in [healthy, adapter_under_no_grad, adapter_frozen_after_setup, grad_left_off, features_detached,
               reentrant_checkpointing, reentrant_adapter_only]
}


def _families() -> list[Any]:
    return [
        pytest.param(family, id=name, marks=pytest.mark.skipif(not family.available, reason=family.skip_reason))
        for name, family in hf_zoo.VLM_FAMILIES.items()
    ]


@pytest.fixture(autouse=True)
def _restore_grad_mode() -> Iterator[None]:
    yield
    torch.set_grad_enabled(True)  # grad_left_off leaves it off, as the user's code did


def _gradients(case: Case) -> set[str]:
    """Independent of the engine: which trainable parameters a plain step gives a gradient."""
    try:
        case.model(**case.batch).loss.backward()
    except RuntimeError:
        return set()
    got = {n for n, p in case.model.named_parameters() if p.requires_grad and p.grad is not None}
    case.model.zero_grad(set_to_none=True)
    return got


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("family", _families())
def test_diagnosis(family: hf_zoo.VlmFamily, case_name: str) -> None:
    case = CASES[case_name](family)
    grad_on = torch.is_grad_enabled()
    trains = _gradients(case)
    report = diagnose(case.model, case.batch, case.expect)
    torch.set_grad_enabled(grad_on)  # _gradients ran in the caller's mode; so did diagnose
    if case.cause is None:
        assert trains and trains == {n for n, p in case.model.named_parameters() if p.requires_grad}, "not healthy"
        assert report.status == "ok", report.to_text()
        assert not report.errors, report.to_text()
        return
    assert not case.params <= trains, "the bug is not real"
    assert report.status == "error", report.to_text()
    findings = [f for f in report.errors if f.cause == case.cause and f.line is not None]
    assert findings, report.to_text()
    at_line = [f for f in findings if same_file(f.file, test_diagnosis) and f.line == case.line]
    assert at_line, f"expected {case.cause} at line {case.line} of this file:\n{report.to_text()}"
    named = set().union(*(f.params for f in at_line))
    assert case.params <= named, f"missing {case.params - named}:\n{report.to_text()}"
    for finding in report.errors:  # every error names a line of the user's code
        assert finding.line is not None and same_file(finding.file, test_diagnosis), report.to_text()


def test_script_freezes_are_matched_by_the_path_they_write(tmp_path) -> None:
    """The static scan behind ``adapter_frozen_after_setup``: written paths (through aliases,
    loops and ``get_submodule("...")``) are sure; a target computed at run time is a guess."""
    import textwrap

    from diagnostics.freeze import script_freeze_sites, script_freezes

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        def setup(model, name):
            model.requires_grad_(False)
            tower = model.model.vision_tower
            for p in tower.parameters():
                p.requires_grad = False
            model.get_submodule("model.visual.merger").requires_grad_(False)
            model.get_submodule(name).requires_grad_(False)
    '''))
    lines = script.read_text().splitlines()
    at = {text.strip(): number for number, text in enumerate(lines, 1)}
    assert [(path, loc.line) for path, loc in script_freezes(str(script))] == [
        ("", at["model.requires_grad_(False)"]),
        ("model.vision_tower", at["p.requires_grad = False"]),
        ("model.visual.merger", at['model.get_submodule("model.visual.merger").requires_grad_(False)']),
        (None, at["model.get_submodule(name).requires_grad_(False)"]),
    ]
    names = ["base_model.model.model.vision_tower.layers.0.weight", "model.visual.merger.mlp.0.bias",
             "model.multi_modal_projector.linear_1.weight"]
    sure, guessed = script_freeze_sites(names, [str(script)])
    assert {n: s.line for n, s in sure.items()} == {
        names[0]: at["p.requires_grad = False"],  # a wrapper's prefix in front of the written path
        names[1]: at['model.get_submodule("model.visual.merger").requires_grad_(False)'],
    }
    assert {n: s.line for n, s in guessed.items()} == {names[2]: at["model.get_submodule(name).requires_grad_(False)"]}
    sure, guessed = script_freeze_sites(names[2:], [], [str(script)])  # not a file of the stack: no guess
    assert not sure and not guessed
