"""Public API for users' tests: assert_grad_flow, the grad_flow fixture, multi-batch merge."""

from __future__ import annotations

import json

import pytest

import zoo
from diagnostics import assert_grad_flow, diagnose, merge_reports
from diagnostics.report import SCHEMA_VERSION


class TestAssertGradFlow:
    def test_passes_on_healthy(self) -> None:
        report = assert_grad_flow(zoo.MemLike(), zoo.make_batch(), expect_trainable=["proj"])
        assert report.status == "ok"

    def test_message_is_the_findings(self) -> None:
        with pytest.raises(AssertionError) as info:
            assert_grad_flow(zoo.ProjUnderNoGrad(), zoo.make_batch(), expect_trainable=["proj"])
        text = str(info.value)
        assert "[grad_disabled]" in text and "move proj out of the block" in text

    def test_warnings_fail_when_not_allowed(self) -> None:
        with pytest.raises(AssertionError, match="wasted_tracking"):
            assert_grad_flow(zoo.TrackedPixels(), zoo.make_batch(), ["proj"], allow_warnings=False)

    def test_fixture(self, grad_flow) -> None:
        grad_flow(zoo.MemLike(), zoo.make_batch(), expect_trainable=["proj"])
        with pytest.raises(AssertionError):
            grad_flow(zoo.DetachedVisionEmbeds(), zoo.make_batch(), expect_trainable=["proj"])


class TestJson:
    def test_schema(self) -> None:
        data = json.loads(json.dumps(diagnose(zoo.ProjUnderNoGrad(), zoo.make_batch(), ["proj"]).to_json()))
        assert data["version"] == SCHEMA_VERSION == 2  # 2: --data causes, 1-based batches
        assert data["status"] == "error"
        assert set(data["loss"]) >= {"requires_grad", "grad_fn", "value"}
        assert set(data["params"]) >= {"total", "trainable", "modules"}
        assert set(data["params"]["modules"]["proj"]) == {"total", "trainable"}
        finding = data["findings"][0]
        assert set(finding) >= {"severity", "cause", "message", "module", "params", "file", "line"}
        assert finding["file"] == "tests/diagnostics/zoo.py" or finding["file"].endswith("zoo.py")

    def test_nan_loss_value_is_json_safe(self) -> None:
        data = diagnose(zoo.MemLike(), zoo.make_batch(all_ignored=True), ["proj"]).to_json()
        json.dumps(data, allow_nan=False)


class TestMerge:
    def test_batch_dependent_failure(self) -> None:
        model = zoo.SkipsProjWithoutHistory()
        without = zoo.make_batch()
        without.pop("pixel_values")
        reports = [diagnose(model, zoo.make_batch(), ["proj"]), diagnose(model, without, ["proj"])]
        merged = merge_reports(reports)
        assert merged.status == "error"
        (finding,) = [f for f in merged.errors if f.cause == "unused_param"]
        assert finding.extra["batches"] == [2]  # 1-based: the second batch
        assert [b["status"] for b in merged.to_json()["batches"]] == ["ok", "error"]
