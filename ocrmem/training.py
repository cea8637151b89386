"""AdapterOnlyTrainer: the HF Trainer for a model in which only the adapter (``proj``) learns.

What it changes in :class:`transformers.Trainer`, and why:

* ``tokenizer=`` or ``processing_class=`` both work on every supported transformers version with
  no FutureWarning (the user's problem 5; the rename lives in :mod:`ocrmem.compat`).
* The optimizer is checked to hold exactly the trainable parameters: a frozen 8B LLM in the
  optimizer would cost 16 bytes per parameter of Adam state for nothing.
* Checkpoints are adapter-sized: the model weights are ``model.safetensors`` with the trainable
  keys only (plus ``config.json``, optimizer, scheduler, RNG state, ``trainer_state.json``,
  ``training_args.bin``); no tokenizer copy, no frozen weights.
* Resuming loads that adapter file with :meth:`~ocrmem.modeling.MEMModel.load_adapter_weights`
  instead of HF's full-model ``load_state_dict`` (which would warn about every frozen key).
* Checkpoint saves are crash-safe: a checkpoint is written into ``.checkpoint-N.partial/`` and
  renamed to ``checkpoint-N`` only when complete, so a SIGKILL mid-save leaves the previous
  checkpoint as the last one :func:`transformers.trainer_utils.get_last_checkpoint` sees; an
  existing ``checkpoint-N`` is renamed aside, never deleted first, and ``save_total_limit``
  rotation renames before it deletes (:mod:`ocrmem.checkpointing`). A disk full / file-size limit /
  permission error — an ``OSError``, or the ``RuntimeError`` / ``SafetensorError`` torch and
  safetensors raise for it — becomes an :class:`OSError` naming the checkpoint, the free space and
  the fix; the staging dir is removed and earlier checkpoints stay intact.
* ``train()`` locks the output dir (``.ocrmem-train.lock``: a second training into it is refused
  with the holder's pid and host) and, when resuming, reads every file of the checkpoint before
  anything trains: a corrupt or missing file is a :class:`~ocrmem.errors.CheckpointError` naming
  it and the newest intact checkpoint (``allow_partial_resume=True`` lets a missing optimizer /
  scheduler / RNG state through with a warning saying what restarts). A checkpoint already at or
  past ``max_steps`` trains and writes nothing (a warning says so).

Under DeepSpeed: the adapter file is written from the trainable parameters only, gathered from
their ZeRO-3 shards when partitioned (:meth:`AdapterOnlyTrainer.save_model`); HF also writes
DeepSpeed's own ``global_stepN/`` state, which holds the frozen weights too (HF passes
``exclude_frozen_parameters`` only for PEFT models), and resuming goes through DeepSpeed's
loader, not :meth:`_load_from_checkpoint`. ``grad_norm`` is reported to callbacks before
clipping (``on_gradients_ready``), so GradFlowCallback's ``proj_grad_norm`` agrees with it.

Test hook: ``OCRMEM_TEST_PAUSE_IN_SAVE=SECONDS[:STEP]`` makes a checkpoint save (only the one of
global step ``STEP`` when given) sleep ``SECONDS`` after the weights are written and before the
optimizer state is, printing a line starting with :data:`PAUSE_MARKER` to stderr first — so a
test can SIGKILL the process in the middle of a save deterministically. Never set it otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from . import compat
from .checkpointing import (
    PARTIAL_SUFFIX,
    as_write_error,
    check_resume_checkpoint,
    checkpoint_global_step,
    hold_output_dir,
    publish_checkpoint,
    recover_checkpoints,
    remove_partial_checkpoints,
    remove_stale_temp_files,
    reraise_as,
    rng_file_name,
    rotate_checkpoints,
    write_error_message,
)
from .errors import CheckpointError
from .modeling import ADAPTER_WEIGHTS_NAME

logger = logging.getLogger(__name__)

PAUSE_ENV = "OCRMEM_TEST_PAUSE_IN_SAVE"
PAUSE_MARKER = "OCRMEM_TEST_PAUSE_IN_SAVE: pausing"
TRAINING_ARGS_NAME = "training_args.bin"


def _pause_for_test(step: int, staged_dir: str) -> None:
    """The :data:`PAUSE_ENV` test hook (see the module docstring)."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    seconds, _, only_step = spec.partition(":")
    if only_step and int(only_step) != step:
        return
    print(f"{PAUSE_MARKER} {float(seconds):g} s inside the save of checkpoint-{step} ({staged_dir})", file=sys.stderr, flush=True)
    time.sleep(float(seconds))


def _is_adapter_model(model: Any) -> bool:
    """A model whose checkpoints hold only its trainable weights (:class:`~ocrmem.modeling.MEMModel`)."""
    return hasattr(model, "load_adapter_weights") and hasattr(model, "trainable_state_dict")


class AdapterOnlyTrainer(Trainer):
    """A :class:`transformers.Trainer` for adapter-only training (see the module docstring).

    Takes the arguments of :class:`transformers.Trainer`; ``tokenizer=`` is accepted as the old
    name of ``processing_class=`` on every version. ``allow_partial_resume=True`` lets a resume go
    on from a checkpoint without ``optimizer.pt`` / ``scheduler.pt`` / the RNG state (or from a
    final output dir), warning what restarts; by default such a resume is refused.

    Raises:
        ValueError: both ``tokenizer`` and ``processing_class`` are given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.allow_partial_resume = bool(kwargs.pop("allow_partial_resume", False))
        super().__init__(*args, **compat.trainer_processing_kwargs(kwargs))
        self._staging_root: str | None = None
        self._saving_step: int | None = None

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """HF's optimizer, checked to hold every trainable parameter and nothing frozen.

        Raises:
            RuntimeError: the optimizer holds a frozen parameter or misses a trainable one
                (e.g. a parameter unfrozen after the optimizer was built).
        """
        optimizer = super().create_optimizer(*args, **kwargs)
        check_optimizer_params(self.model, optimizer)
        return optimizer

    # ------------------------------------------------------------------ gradients

    def create_accelerator_and_postprocess(self, *args: Any, **kwargs: Any) -> Any:
        """HF's accelerator, with ``clip_grad_norm_`` telling callbacks first that gradients are final.

        Every supported transformers version computes ``grad_norm`` through
        ``accelerator.clip_grad_norm_`` once per optimizer step, after DDP's all-reduce and
        before clipping; callbacks with ``on_gradients_ready(state)`` (GradFlowCallback) read
        their gradient norm there, so ``proj_grad_norm`` and ``grad_norm`` describe the same tensors.
        """
        result = super().create_accelerator_and_postprocess(*args, **kwargs)
        clip = self.accelerator.clip_grad_norm_

        def clip_grad_norm_(*c_args: Any, **c_kwargs: Any) -> Any:
            for callback in self.callback_handler.callbacks if hasattr(self, "callback_handler") else ():
                ready = getattr(callback, "on_gradients_ready", None)
                if callable(ready):
                    ready(self.state)
            return clip(*c_args, **c_kwargs)

        self.accelerator.clip_grad_norm_ = clip_grad_norm_
        return result

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add callbacks' per-step metrics (``proj_grad_norm``) before the reporters see the logs.

        HF runs reporting callbacks (wandb) before user callbacks, so a value added in a user
        callback's ``on_log`` would miss them; callbacks with ``extra_logs(state)`` are asked here.
        """
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                extra = getattr(callback, "extra_logs", None)
                if callable(extra):
                    logs.update(extra(self.state))
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """With ``compute_metrics=memory_gain_metrics``: the own- vs shuffled-memory evaluation
        (:func:`ocrmem.evaluation.memory_prediction_step`); HF's step otherwise."""
        from .evaluation import memory_gain_metrics, memory_prediction_step

        if prediction_loss_only or self.compute_metrics is not memory_gain_metrics:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return memory_prediction_step(self, model, inputs)

    # ------------------------------------------------------------------ train: lock + resume checks

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """HF's ``train()`` with the output dir locked and the resume checkpoint checked up front.

        Raises:
            OutputDirLockedError: another live process trains into ``args.output_dir``.
            CheckpointError: the resume checkpoint is missing, incomplete or corrupt (the message
                names the file and the newest intact checkpoint).
        """
        with hold_output_dir(self.args.output_dir, enabled=self.args.process_index == 0):
            resume = self._checked_resume(resume_from_checkpoint)
            if resume is not None and self.args.max_steps > 0:
                step = checkpoint_global_step(resume)
                if step >= self.args.max_steps:
                    logger.warning(
                        "Nothing to train: %s is at step %d and max_steps is %d; nothing was trained or written. "
                        "Raise max_steps above %d to train further.", resume, step, self.args.max_steps, step,
                    )
                    return TrainOutput(global_step=step, training_loss=float("nan"), metrics={})
            return super().train(resume, *args, **kwargs)

    def _checked_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint to resume from (``True``: the newest in the output dir), checked file by file."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        run_dir = self.args.output_dir
        if self.args.should_save and os.path.isdir(run_dir):
            recover_checkpoints(run_dir)  # a checkpoint an interrupted save set aside
        if resume_from_checkpoint is True:
            last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            if last is None:
                raise CheckpointError(f"resume_from_checkpoint=True: no checkpoint in {run_dir}; start without resuming.")
            resume_from_checkpoint = last
        path = os.fspath(resume_from_checkpoint)
        self.resume_restarts = check_resume_checkpoint(
            path, allow_partial=self.allow_partial_resume,
            rng_file=rng_file_name(self.args.world_size, self.args.process_index),
            model_state_only=self.is_deepspeed_enabled,  # DeepSpeed resumes from its own global_stepN/ files
        )
        return path

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (trainable weights + config) and the training arguments.

        Unlike HF's ``_save``, a checkpoint gets no tokenizer copy (HF 5.x would even save the
        data collator's tokenizer); the final ``save_model`` still writes ``processing_class``
        when one was given.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not _is_adapter_model(model):
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self._saving_step is not None:  # inside a checkpoint's staging dir: published whole later
            self._write_adapter(model, output_dir, state_dict)
            return
        # A final save_model(): straight into a live dir, so file by file through temporary files.
        remove_stale_temp_files(output_dir)
        try:
            self._write_adapter(model, output_dir, state_dict)
        except Exception as err:
            write_error = as_write_error(err)
            if write_error is None:
                raise
            raise reraise_as(write_error, write_error_message(write_error, f"the adapter to {output_dir}", output_dir)) from err

    def _write_adapter(self, model: Any, output_dir: str, state_dict: dict | None) -> None:
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)  # atomic per file
        if self._saving_step is not None:
            _pause_for_test(self._saving_step, output_dir)
        elif self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        target = os.path.join(output_dir, TRAINING_ARGS_NAME)
        tmp = os.path.join(output_dir, f".{TRAINING_ARGS_NAME}.{os.getpid()}.tmp")
        try:
            torch.save(self.args, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed, gather only the trainable weights for the adapter file.

        HF's DeepSpeed path builds the full state dict (the frozen 8B LLM too) on every save, and
        under ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` it writes no weights
        at all. Here every rank takes part in gathering the trainable parameters
        (``deepspeed.zero.GatheredParameters``, a collective under ZeRO-3; ZeRO-1/2 keep full
        copies), and the main process writes them.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not (self.is_deepspeed_enabled and _is_adapter_model(model)):
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        self._save(output_dir, state_dict=gather_trainable_state_dict(model))

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, HF writes `<run_dir>/checkpoint-N`: point it into the
        # staging dir, so the half-written checkpoint lives at `.checkpoint-N.partial/checkpoint-N`.
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        """HF's checkpoint save, written into a staging dir and renamed into place when complete.

        Raises:
            OSError: writing failed — disk full, file-size limit, no permission (the same class
                and errno for an ``OSError``; torch's and safetensors' errors for it are recognised,
                :func:`~ocrmem.checkpointing.as_write_error`); the message names the checkpoint and
                the directory. Nothing partial stays visible; earlier checkpoints are untouched.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, f".{name}{PARTIAL_SUFFIX}")
        staged_dir = os.path.join(staging_root, name)
        try:
            if self.args.should_save:
                remove_partial_checkpoints(run_dir)
            self.accelerator.wait_for_everyone()
            self._staging_root, self._saving_step = staging_root, self.state.global_step
            try:
                super()._save_checkpoint(model, trial, *args, **kwargs)
            finally:
                self._staging_root = self._saving_step = None
            self._fix_best_checkpoint_path(staging_root, run_dir, staged_dir)
            # Every rank has written its part (RNG state per rank) before the checkpoint is published.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                publish_checkpoint(staged_dir, final_dir)
        except Exception as err:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            write_error = as_write_error(err)
            if write_error is None:
                raise
            raise reraise_as(write_error, write_error_message(write_error, f"checkpoint {final_dir}", run_dir)) from err
        if self.args.should_save:  # the new checkpoint is published: a failed delete is only a warning
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _fix_best_checkpoint_path(self, staging_root: str, run_dir: str, staged_dir: str) -> None:
        """HF recorded the best checkpoint under the staging dir: point it at the published one."""
        best = self.state.best_model_checkpoint
        if best is None or not os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
            return
        self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging_root))
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staged_dir, "trainer_state.json"))

    # ------------------------------------------------------------------ loading

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume: load the adapter file of the checkpoint (HF's path would ``load_state_dict`` it
        non-strictly and warn about every frozen key it lacks)."""
        target = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_NAME)
        if _is_adapter_model(target) and os.path.isfile(weights) and not self.is_deepspeed_enabled:
            logger.info("Loading adapter weights from %s.", weights)
            target.load_adapter_weights(weights)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with compat.numpy_safe_globals():  # transformers 4.46 + torch >= 2.6 cannot read the numpy state otherwise
            super()._load_rng_state(checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the adapter file of the best checkpoint."""
        best = self.state.best_model_checkpoint
        weights = os.path.join(best, ADAPTER_WEIGHTS_NAME) if best else ""
        if _is_adapter_model(self.model) and os.path.isfile(weights) and not self.is_deepspeed_enabled:
            logger.info("Loading best adapter weights from %s (score: %s).", weights, self.state.best_metric)
            self.model.load_adapter_weights(weights)
            return
        super()._load_best_model()


def gather_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors, on every rank.

    Parameters partitioned by ZeRO-3 (``ds_id``) are gathered for the copy (every rank must call
    this: it is a collective); others are copied as they are. Under DeepSpeed bf16/fp16 the
    optimizer's fp32 masters are returned instead of the model's rounded copies.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = _fp32_masters(trainable)
    if masters is not None:
        return masters
    sharded = [p for _, p in trainable if hasattr(p, "ds_id")]
    if not sharded:
        return {n: p.detach().cpu().clone() for n, p in trainable}
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in trainable}


def _fp32_masters(trainable: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed bf16/fp16 the model holds rounded copies; the optimizer updates fp32 masters.

    The adapter is saved from the masters (``deepspeed.utils.safe_get_full_fp32_param``, a
    collective on every ZeRO stage), so the file keeps what training learned, not its bf16
    rounding. ``None`` when no trainable parameter is a low-precision DeepSpeed parameter.
    """
    low = [p for _, p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if not low or not all(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in low):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in trainable:
        master = safe_get_full_fp32_param(param)
        if master is None:
            return None
        out[name] = master.detach().float().cpu().clone()
    return out


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Build models inside this block as plain modules, even when ZeRO-3 is configured.

    With a ZeRO-3 config, ``TrainingArguments`` makes every ``from_pretrained`` construct its
    model under ``deepspeed.zero.Init`` (parameters partitioned at creation). MEMModel assembles
    its LLM, its own encoder loader and ``proj`` itself, and only some of them would be
    partitioned; the tiny preset is even written from inside. So the model is built whole here,
    and ``deepspeed.initialize`` partitions every parameter when the Trainer starts — the same
    end state, at the cost of one full copy per process while loading. transformers keeps the
    active config in a module-level weak reference; it is cleared for the block and restored.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory comm op.

    On the CPU accelerator DeepSpeed builds ``deepspeed_shm_comm`` (minutes of C++ compilation on
    first use) when its comm backend starts; the op only speeds up ``inference_all_reduce``
    (AutoTP inference), never training. DeepSpeed has no switch for it, but it skips the build —
    and uses gloo for everything — for an op that ``deepspeed.ops.__compatible_ops__`` marks
    incompatible, which is what this does. No effect on CUDA (that accelerator has no such op).
    """
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def check_optimizer_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Check that ``optimizer`` holds exactly the trainable parameters of ``model``.

    Raises:
        RuntimeError: it holds a frozen parameter, or misses a trainable one; the message names them.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    groups = getattr(inner, "param_groups", None)
    if groups is None:
        # accelerate's DummyOptim (a DeepSpeed config with an `optimizer` block: DeepSpeed builds
        # the real one later) holds `params`: tensors or param-group dicts.
        raw = list(getattr(inner, "params", None) or [])
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in raw]
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    params = {id(p): (n, p) for n, p in model.named_parameters()}
    frozen = [params[pid][0] if pid in params else "<not a parameter of the model>"
              for pid in in_optimizer if pid not in params or not params[pid][1].requires_grad]
    missing = [n for pid, (n, p) in params.items() if p.requires_grad and pid not in in_optimizer]
    if frozen or missing:
        raise RuntimeError(
            f"the optimizer must hold exactly the trainable parameters: it holds frozen/foreign "
            f"{frozen[:5]} ({len(frozen)}) and misses trainable {missing[:5]} ({len(missing)}). "
            "Freeze/unfreeze parameters before the trainer builds its optimizer."
        )


__all__ = [
    "AdapterOnlyTrainer",
    "PAUSE_ENV",
    "PAUSE_MARKER",
    "check_optimizer_params",
    "gather_trainable_state_dict",
    "publish_checkpoint",
    "remove_partial_checkpoints",
    "skip_deepspeed_shm_comm",
    "without_zero3_init",
]
