"""Parameter counts in the user's format, and expect_trainable checks."""

from __future__ import annotations

import torch
from torch import nn

import zoo
from diagnostics.params import ModuleParams, ParameterTable, check_expectations, matches, parameter_table


class TestSummaryLine:
    def test_users_numbers_in_users_format(self) -> None:
        table = ParameterTable(8_607_498_496, 18_882_560, [], ModuleParams("", 0, 0))
        assert table.summary_line() == (
            "trainable params: 18,882,560 || all params: 8,607,498,496 || trainable%: 0.2194%"
        )

    def test_counts_and_breakdown_of_zoo_model(self) -> None:
        model = zoo.MemLike()
        table = parameter_table(model, ["proj"])
        proj = sum(p.numel() for p in model.proj.parameters())
        assert table.trainable == proj
        assert table.total == sum(p.numel() for p in model.parameters())
        assert [m.name for m in table.modules] == ["ocr_embed", "proj", "base_llm"]
        lines = table.breakdown_lines()
        assert f"  proj trainable params: {proj:,}" in lines
        assert "  base_llm trainable params: 0 (should be 0)" in lines
        assert table.to_json()["modules"]["proj"] == {"total": proj, "trainable": proj}

    def test_shared_parameters_counted_once(self) -> None:
        a = nn.Linear(4, 4)
        model = nn.Sequential(a, a)
        assert parameter_table(model).total == 20


class TestExpectations:
    def test_prefix_is_dotted(self) -> None:
        assert matches("proj.0.weight", "proj")
        assert not matches("projector.weight", "proj")
        assert matches("base.layers.0.q.lora_A.default.weight", "*lora_*")

    def test_prefix_matching_nothing_is_an_error(self) -> None:
        findings = check_expectations(zoo.MemLike(), ["adapter"])
        assert [f.cause for f in findings] == ["not_trainable"]
        assert "matches no parameter" in findings[0].message

    def test_no_trainable_params(self) -> None:
        model = nn.Linear(2, 2).requires_grad_(False)
        assert [f.cause for f in check_expectations(model)] == ["no_trainable_params"]

    def test_frozen_expected_params_are_listed(self) -> None:
        model = zoo.MemLike()
        model.proj[2].requires_grad_(False)
        (finding,) = check_expectations(model, ["proj"])
        assert finding.cause == "not_trainable" and finding.params == ["proj.2.weight", "proj.2.bias"]

    def test_healthy_expectation_gives_nothing(self) -> None:
        assert check_expectations(zoo.MemLike(), ["proj"]) == []


def test_peft_like_wrappers_are_looked_through() -> None:
    inner = nn.Module()
    inner.model = nn.Linear(2, 2)
    inner.lm_head = nn.Linear(2, 2)
    outer = nn.Module()
    outer.base_model = nn.Module()
    outer.base_model.model = inner
    names = [m.name for m in parameter_table(outer).modules]
    assert names == ["base_model.model.model", "base_model.model.lm_head"]
    assert torch.is_grad_enabled()
