"""AdapterOnlyTrainer and GradFlowCallback on the tiny preset (a few optimizer steps each, CPU)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from ocrmem import MEMModel
from ocrmem.callbacks import GradFlowCallback, LossPlateauWarning, TrainingStopped
from ocrmem.data import MemoryCollator, synthetic_memory_examples
from ocrmem.training import AdapterOnlyTrainer, check_optimizer_params

STEPS = 4  # the runs that only need a few steps
RUN_STEPS = 6  # the shared run: checkpoints at 2, 4, 6
SAVE_STEPS = 2
CHECKPOINT_FILES = {
    "config.json",
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
}


def make_args(out: Path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(model: MEMModel, out: Path, examples=None, callbacks=None, eval_dataset=None, **overrides) -> AdapterOnlyTrainer:
    return AdapterOnlyTrainer(
        model=model,
        args=make_args(out, **overrides),
        train_dataset=examples if examples is not None else synthetic_memory_examples(16, seed=0),
        eval_dataset=eval_dataset,
        data_collator=MemoryCollator.for_model(model),
        callbacks=callbacks,
    )


def proj_state(model: MEMModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


class CollectWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One 6-step run shared by the read-only checks: checkpoints every 2 steps, the newest 2 kept."""
    out = tmp_path_factory.mktemp("trained")
    model = MEMModel.from_pretrained(tiny_dir)
    callback = GradFlowCallback()
    trainer = make_trainer(model, out, callbacks=[callback], max_steps=RUN_STEPS, save_total_limit=2)
    trainer.train()
    return {"model": model, "trainer": trainer, "out": out, "callback": callback}


class TestAdapterOnlyTrainer:
    @pytest.mark.parametrize("kwarg", ["tokenizer", "processing_class"])
    def test_tokenizer_kwarg_is_accepted_without_future_warning(self, tiny_model, tmp_path, kwarg):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = AdapterOnlyTrainer(model=tiny_model, args=make_args(tmp_path), **{kwarg: tiny_model.tokenizer})
        assert trainer.processing_class is tiny_model.tokenizer
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]

    def test_both_tokenizer_and_processing_class_is_an_error(self, tiny_model, tmp_path):
        with pytest.raises(ValueError, match="either `tokenizer` or `processing_class`"):
            AdapterOnlyTrainer(
                model=tiny_model, args=make_args(tmp_path),
                tokenizer=tiny_model.tokenizer, processing_class=tiny_model.tokenizer,
            )

    def test_optimizer_holds_exactly_the_trainable_params(self, trained):
        optimizer, model = trained["trainer"].optimizer, trained["model"]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.proj.parameters()}
        assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])

    def test_optimizer_check_names_a_frozen_param(self, tiny_model):
        frozen = tiny_model.base_llm.get_input_embeddings().weight
        optimizer = torch.optim.AdamW([*tiny_model.proj.parameters(), frozen])
        with pytest.raises(RuntimeError, match="embed_tokens"):
            check_optimizer_params(tiny_model, optimizer)

    def test_checkpoints_hold_only_proj_and_are_adapter_sized(self, trained):
        out, model = trained["out"], trained["model"]
        # save_total_limit=2 rotated checkpoint-2 away; no staging dir is left behind.
        assert sorted(os.listdir(out)) == [f"checkpoint-{RUN_STEPS - SAVE_STEPS}", f"checkpoint-{RUN_STEPS}"]
        checkpoint = out / f"checkpoint-{RUN_STEPS}"
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES  # no tokenizer, no frozen weights
        assert set(load_file(str(checkpoint / "model.safetensors"))) == {n for n, _ in model.proj.named_parameters(prefix="proj")}
        proj_bytes = sum(p.numel() * p.element_size() for p in model.proj.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        weights_bytes = (checkpoint / "model.safetensors").stat().st_size
        checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.iterdir())
        assert weights_bytes < proj_bytes + 4096  # proj + the safetensors header
        # Everything (Adam state = 2x proj, RNG, scheduler, state) stays far below one model copy.
        assert checkpoint_bytes < model_bytes / 5, (checkpoint_bytes, model_bytes)

    def test_resume_reproduces_the_uninterrupted_run(self, tiny_dir, tmp_path, trained):
        resumed = GradFlowCallback()
        model = MEMModel.from_pretrained(tiny_dir)
        handler = CollectWarnings()
        loggers = [logging.getLogger("transformers"), logging.getLogger()]
        for logger in loggers:
            logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = make_trainer(model, tmp_path, callbacks=[resumed], max_steps=RUN_STEPS, save_strategy="no")
                trainer.train(resume_from_checkpoint=str(trained["out"] / f"checkpoint-{RUN_STEPS - SAVE_STEPS}"))
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
        load_messages = [m for m in handler.messages + [str(w.message) for w in caught] if "key" in m.lower()]
        assert not load_messages  # no "missing keys" / "unexpected keys" from HF's full-model load path

        expected = dict(trained["callback"].stats["step_losses"])
        got = dict(resumed.stats["step_losses"])
        assert sorted(got) == list(range(RUN_STEPS - SAVE_STEPS + 1, RUN_STEPS + 1))
        for step, loss in got.items():
            assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
        final = load_file(str(trained["out"] / f"checkpoint-{RUN_STEPS}" / "model.safetensors"))
        for name, value in model.trainable_state_dict().items():
            torch.testing.assert_close(value, final[name], rtol=0, atol=1e-6)

    def test_best_model_checkpoint_points_at_the_published_dir(self, tiny_model, tmp_path):
        trainer = make_trainer(
            tiny_model, tmp_path, eval_dataset=synthetic_memory_examples(2, seed=1), eval_strategy="steps",
            eval_steps=SAVE_STEPS, metric_for_best_model="loss", load_best_model_at_end=True,
            prediction_loss_only=True,
        )
        trainer.train()
        best = Path(trainer.state.best_model_checkpoint)
        assert best.parent == tmp_path and best.name.startswith("checkpoint-") and best.is_dir()
        saved = json.loads((best / "trainer_state.json").read_text())
        assert Path(saved["best_model_checkpoint"]) == best
        weights = load_file(str(best / "model.safetensors"))  # load_best_model_at_end loaded these
        for name, value in tiny_model.trainable_state_dict().items():
            assert torch.equal(value, weights[name])

    def test_load_best_model_loads_the_adapter_file(self, tiny_model, trained):
        checkpoint = trained["out"] / f"checkpoint-{RUN_STEPS}"
        trainer = make_trainer(tiny_model, trained["out"] / "unused")
        trainer.state.best_model_checkpoint = str(checkpoint)
        trainer._load_best_model()
        saved = load_file(str(checkpoint / "model.safetensors"))
        for name, value in tiny_model.trainable_state_dict().items():
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def _break_after(model: MEMModel, step_holder: dict, how: str, from_step: int):
    """Patch ``embed_pages`` so that from optimizer step ``from_step`` on, gradient flow is broken."""
    original = model.embed_pages

    def embed_pages(pixel_values):
        out = original(pixel_values)
        if step_holder["step"] + 1 < from_step:
            return out
        if how == "detach":
            return out.detach()
        if how == "zero":
            return out * 0.0
        if how == "nan":
            return out * float("nan")
        raise AssertionError(how)

    model.embed_pages = embed_pages


class TrackStep(TrainerCallback):
    def __init__(self, holder: dict) -> None:
        self.holder = holder

    def on_step_begin(self, args, state, control, **kwargs):
        self.holder["step"] = state.global_step


class TestGradFlowCallback:
    def test_logs_proj_grad_norm_at_every_logging_step(self, trained):
        logged = [h for h in trained["trainer"].state.log_history if "loss" in h]
        assert [h["step"] for h in logged] == list(range(1, RUN_STEPS + 1))
        assert all(math.isfinite(h["proj_grad_norm"]) and h["proj_grad_norm"] > 0 for h in logged)
        saved = json.loads((trained["out"] / f"checkpoint-{RUN_STEPS}" / "trainer_state.json").read_text())
        assert all("proj_grad_norm" in h for h in saved["log_history"] if "loss" in h)

    def test_stops_before_the_first_update_when_proj_runs_under_no_grad(self, tiny_model, tmp_path):
        original = tiny_model.embed_pages

        def embed_pages(pixel_values):
            with torch.no_grad():
                return original(pixel_values)

        tiny_model.embed_pages = embed_pages
        before = proj_state(tiny_model)
        callback = GradFlowCallback()
        trainer = make_trainer(tiny_model, tmp_path, callbacks=[callback], save_strategy="no")
        with pytest.raises(TrainingStopped, match="broken gradient flow") as stopped:
            trainer.train()
        assert stopped.value.cause == "broken_grad_flow" and stopped.value.step == 1
        assert stopped.value.report.status == "error"
        assert trainer.control.should_training_stop
        for name, value in tiny_model.trainable_state_dict().items():
            assert torch.equal(value, before[name])

    @pytest.mark.parametrize(
        ("how", "cause"), [("detach", "no_grad_fn"), ("zero", "no_gradient"), ("nan", "nan_loss")]
    )
    def test_per_step_checks_stop_when_the_failure_depends_on_the_step(self, tiny_model, tmp_path, how, cause):
        holder = {"step": 0}
        _break_after(tiny_model, holder, how, from_step=3)
        trainer = make_trainer(tiny_model, tmp_path, callbacks=[TrackStep(holder), GradFlowCallback()], save_strategy="no")
        with pytest.raises(TrainingStopped) as stopped:
            trainer.train()
        assert stopped.value.cause == cause
        assert stopped.value.step == 3
        assert trainer.state.global_step == 2  # the broken step was never applied
        assert all(torch.isfinite(p).all() for p in tiny_model.proj.parameters())

    def test_batches_without_memory_are_counted_not_fatal(self, tiny_model, tmp_path):
        examples = synthetic_memory_examples(4, seed=0)
        for example in examples[::2]:
            example["history"] = ""
        callback = GradFlowCallback()
        trainer = make_trainer(
            tiny_model, tmp_path, examples=examples, callbacks=[callback],
            per_device_train_batch_size=1, save_strategy="no",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        assert callback.stats["empty_memory_batches"] == 2
        assert trainer.state.global_step == STEPS
        norms = [h["proj_grad_norm"] for h in trainer.state.log_history if "loss" in h]
        assert norms.count(0.0) == 2  # the skip loss: exactly zero gradient, step still taken

    def test_warns_when_the_loss_does_not_move(self, tiny_model, tmp_path):
        same_row = synthetic_memory_examples(1, seed=0) * 8
        callback = GradFlowCallback(patience=2, min_delta=1e-3)
        trainer = make_trainer(
            tiny_model, tmp_path, examples=same_row, callbacks=[callback],
            learning_rate=1e-12, save_strategy="no",
        )
        with pytest.warns(LossPlateauWarning, match="has not moved for 2 steps"):
            trainer.train()

    def test_works_with_a_plain_trainer_too(self, tiny_model, tmp_path):
        trainer = Trainer(
            model=tiny_model, args=make_args(tmp_path, max_steps=2, save_strategy="no"),
            train_dataset=synthetic_memory_examples(4, seed=0), data_collator=MemoryCollator.for_model(tiny_model),
            callbacks=[GradFlowCallback()],
        )
        trainer.train()
        assert all(h["proj_grad_norm"] > 0 for h in trainer.state.log_history if "loss" in h)

    def test_bad_arguments_raise(self):
        with pytest.raises(ValueError, match="watch"):
            GradFlowCallback(watch=())
        with pytest.raises(ValueError, match="patience"):
            GradFlowCallback(patience=-1)

    def test_stops_at_train_begin_when_nothing_watched_is_trainable(self, tiny_model, tmp_path):
        tiny_model.proj.requires_grad_(False)
        tiny_model.ocr_embed.vision_model.pre_layrnorm.requires_grad_(True)  # something must train for HF
        trainer = make_trainer(tiny_model, tmp_path, callbacks=[GradFlowCallback()], save_strategy="no")
        with pytest.raises(TrainingStopped, match="no trainable parameter matches"):
            trainer.train()


@pytest.mark.parametrize(
    "second_window, warns",
    [
        # 0.05 lower than the first window's mean (50x min_delta) but within twice its standard
        # error (0.5 per step of noise over 4 steps: 2 x 0.25 = 0.5): a lucky window, not progress.
        ([1.55, 0.55, 1.55, 0.55], True),
        # the same noise 1.0 lower: beyond 2 standard errors, real progress.
        ([0.6, -0.4, 0.6, -0.4], False),
    ],
)
def test_plateau_counts_only_improvements_beyond_the_noise(second_window, warns):
    callback = GradFlowCallback(patience=4, min_delta=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loss in [1.6, 0.6, 1.6, 0.6, *second_window]:
            callback._check_plateau(loss)
    plateau = [w for w in caught if issubclass(w.category, LossPlateauWarning)]
    assert bool(plateau) == warns, [str(w.message) for w in plateau]
    if warns:
        assert "has not moved for 4 steps" in str(plateau[0].message)
