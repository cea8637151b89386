"""ocrmem.reader_pretraining: the tiny LLM learns to read memory slots; write_tiny's option."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from ocrmem.errors import ConfigError
from ocrmem.reader_pretraining import pretrain_reader, slot_reading_loss
from ocrmem.tiny import write_tiny

FEW_STEPS = 20  # measured (1 CPU thread, 0.9 s): held-out loss 7.36 -> 4.24, slot gain -0.08 -> +1.20


@pytest.fixture
def random_llm(tiny_model):
    """A fresh copy of the default preset's random LLM (the session fixture stays untouched)."""
    return copy.deepcopy(tiny_model.base_llm)


def slot_gain(llm, tokenizer) -> float:
    """Held-out loss with another row's slots minus with the row's own (cf. eval_memory_gain)."""
    return slot_reading_loss(llm, tokenizer, shuffled=True) - slot_reading_loss(llm, tokenizer)


class TestPretrainReader:
    def test_the_answer_comes_to_depend_on_the_slots(self, random_llm, tiny_model):
        tokenizer = tiny_model.tokenizer
        before_loss, before_gain = slot_reading_loss(random_llm, tokenizer), slot_gain(random_llm, tokenizer)
        result = pretrain_reader(random_llm, tokenizer, steps=FEW_STEPS)
        after_loss, after_gain = slot_reading_loss(random_llm, tokenizer), slot_gain(random_llm, tokenizer)
        assert abs(before_gain) < 0.3  # a random LLM does not read the slots
        assert after_loss < before_loss - 1.5  # measured 7.36 -> 4.24
        assert after_gain > 0.5  # measured +1.20: the answer is read from the slots
        assert len(result.losses) == FEW_STEPS and result.last_loss < result.first_loss
        assert not any(p.requires_grad for p in random_llm.parameters()) and not random_llm.training

    def test_is_deterministic_and_zero_steps_change_nothing(self, random_llm, tiny_model):
        untouched = copy.deepcopy(random_llm)
        assert pretrain_reader(random_llm, tiny_model.tokenizer, steps=0).losses == ()
        for a, b in zip(random_llm.state_dict().values(), untouched.state_dict().values()):
            assert torch.equal(a, b)
        first, second = copy.deepcopy(untouched), copy.deepcopy(untouched)
        losses = [pretrain_reader(llm, tiny_model.tokenizer, steps=3, seed=7).losses for llm in (first, second)]
        assert losses[0] == losses[1]
        for a, b in zip(first.state_dict().values(), second.state_dict().values()):
            assert torch.equal(a, b)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [({"steps": -1}, "`steps`"), ({"steps": 1, "batch_size": 0}, "`batch_size`"),
         ({"steps": 1, "learning_rate": 0.0}, "`learning_rate`"),
         ({"steps": 1, "memory_token": "<|no_such_token|>"}, "`memory_token`")],
    )
    def test_bad_arguments_raise_naming_the_field(self, random_llm, tiny_model, kwargs, field):
        with pytest.raises(ConfigError, match=field):
            pretrain_reader(random_llm, tiny_model.tokenizer, **kwargs)


class TestWriteTinyOption:
    def test_changes_only_the_llm_and_records_the_run(self, tiny_dir, tmp_path):
        root = write_tiny(tmp_path / "tiny", reader_pretrain_steps=FEW_STEPS)
        record = json.loads((root / "llm" / "reader_pretraining.json").read_text())
        assert record["steps"] == FEW_STEPS and record["seed"] == 0 and record["last_loss"] < record["first_loss"]
        assert not (tiny_dir / "llm" / "reader_pretraining.json").exists()  # the default preset: no pre-training
        # Encoder and proj are those of the default preset, bit for bit; the LLM has moved.
        for name in ("ocr/model.safetensors", "model.safetensors"):
            default, pretrained = load_file(str(tiny_dir / name)), load_file(str(root / name))
            assert default.keys() == pretrained.keys()
            assert all(torch.equal(default[k], pretrained[k]) for k in default)
        default, pretrained = load_file(str(tiny_dir / "llm" / "model.safetensors")), load_file(str(root / "llm" / "model.safetensors"))
        assert default.keys() == pretrained.keys() and not all(torch.equal(default[k], pretrained[k]) for k in default)

    def test_refuses_a_negative_step_count(self, tmp_path):
        with pytest.raises(ConfigError, match="`reader_pretrain_steps` is -1"):
            write_tiny(tmp_path / "tiny", reader_pretrain_steps=-1)
        assert not (tmp_path / "tiny").exists()  # refused before anything was written
