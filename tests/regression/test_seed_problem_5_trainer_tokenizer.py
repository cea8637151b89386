"""Problem 5: `FutureWarning: tokenizer is deprecated and will be removed in version 5.0.0 for
AdapterOnlyTrainer.__init__. Use processing_class instead.` (and in 5.x: a TypeError).
AdapterOnlyTrainer takes either name on every supported version, silently.
"""

import pytest
from transformers import Trainer, TrainingArguments

from ocrmem.training import AdapterOnlyTrainer

from .checks import run_silently


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)


def test_harness_catches_plain_trainer_with_tokenizer(tiny_model, tmp_path):
    args = _args(tmp_path)
    with pytest.raises((AssertionError, TypeError)):
        run_silently(lambda: Trainer(model=tiny_model, args=args, tokenizer=tiny_model.tokenizer))


@pytest.mark.parametrize("name", ["tokenizer", "processing_class"])
def test_adapter_only_trainer_accepts_either_name_silently(tiny_model, tmp_path, name):
    args = _args(tmp_path)
    trainer = run_silently(lambda: AdapterOnlyTrainer(model=tiny_model, args=args, **{name: tiny_model.tokenizer}))
    assert trainer.processing_class is tiny_model.tokenizer


def test_passing_both_names_is_an_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        AdapterOnlyTrainer(model=tiny_model, args=_args(tmp_path), tokenizer=tiny_model.tokenizer,
                           processing_class=tiny_model.tokenizer)
