"""MEMConfig refuses values of the wrong type, naming the field, the value and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ocrmem import MEMConfig
from ocrmem.errors import ConfigError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_threshold", True),  # bool is an int subclass: used to be accepted as 1
        ("context_threshold", 2048.0),
        ("context_threshold", "2048"),
        ("max_pages", False),
        ("vision_embedding_size", True),
        ("memory_token_id", -1),
        ("font_size", 0),
        ("font_path", 3),
        ("base_model_name", 7),
        ("ocr_model_name", ["ocr"]),
        ("assistant_marker", 5),
        ("memory_token", None),
        ("extra_trainable", [""]),
        ("extra_trainable", [3]),
        ("extra_trainable", {"proj": True}),
    ],
)
def test_wrong_type_is_refused_naming_field_and_value(field, value):
    with pytest.raises(ConfigError, match=rf"`{field}` is {re.escape(repr(value))}"):
        MEMConfig(**{field: value})


def test_extra_trainable_as_string_is_refused_with_the_list_form():
    # It used to become ['o', 'c', 'r', ...]: one prefix per letter.
    with pytest.raises(ConfigError, match=r"`extra_trainable` is 'ocr_embed.x' \(str\).*\['ocr_embed.x'\]"):
        MEMConfig(extra_trainable="ocr_embed.x")


def test_paths_are_accepted_and_stored_as_strings(tmp_path):
    config = MEMConfig(base_model_name=tmp_path / "llm", ocr_model_name=Path("ocr"), extra_trainable=("proj.0",))
    assert config.base_model_name == str(tmp_path / "llm") and config.ocr_model_name == "ocr"
    assert config.extra_trainable == ["proj.0"]
    assert '"base_model_name"' in config.to_json_string()  # still JSON-serialisable


def test_value_set_after_construction_is_caught_by_revalidation():
    config = MEMConfig()
    config.context_threshold = -5
    with pytest.raises(ConfigError, match=r"`context_threshold` is -5"):
        config._validate()
