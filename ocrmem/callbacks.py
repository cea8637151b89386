"""GradFlowCallback: watch gradient flow into the adapter on every training step.

The user's training died at a step that depended on the batch (a batch with no compressed
history: ``proj`` took no part, the loss had no ``grad_fn``), so one check on a sample batch is
not enough. This callback does one thorough check and several cheap ones:

* **first batch** — runs the diagnostics engine (:func:`diagnostics.diagnose`) on the first
  training batch, before its forward, and stops when it reports an error (broken gradient flow:
  ``proj`` frozen, run under ``no_grad``, detached, ...). When the adapter took no part in that
  batch (no memory: a zero gradient proves nothing) it diagnoses the next one too, up to 3
  batches. The model is left as it was (``.grad``, RNG state, hooks). See "Under distributed
  engines" below for how it avoids disturbing DDP, DeepSpeed and FSDP.
* **every micro-batch** — the loss is finite, and has a ``grad_fn`` (otherwise ``backward``
  would raise the user's ``RuntimeError``: the callback diagnoses that batch and stops first);
  whether ``proj`` took part (``MEMOutput.memory_used``; batches without memory are counted).
* **every optimizer step** — ``proj``'s accumulated gradient is finite, and non-zero whenever a
  micro-batch used memory and had a non-zero loss. Its norm is logged as ``proj_grad_norm`` at
  every logging step, so it lands in ``trainer_state.json``'s ``log_history`` and in the
  reporters (wandb). With :class:`~ocrmem.training.AdapterOnlyTrainer` it is read from the same
  gradients as HF's ``grad_norm``, at the same moment (after DDP's all-reduce, before clipping),
  so the two agree when ``proj`` is all that trains; with a plain ``Trainer`` it is the
  rank-local norm before the all-reduce.
* **plateau** — warns (:class:`LossPlateauWarning`) when the mean loss over a window of
  ``patience`` steps is not below the best earlier window's by ``min_delta`` and by twice its
  standard error (windows, because per-batch losses are noisy; the warning is rate-limited).

How it stops: it sets ``control.should_training_stop`` and raises :class:`TrainingStopped` from
inside the step — *before* the optimizer applies the bad update, so neither a NaN nor a silent
no-op step reaches the weights or a checkpoint. ``trainer.train()`` propagates the exception;
``python -m ocrmem.train`` turns it into exit status 1. (Merely setting the flag would let the
current step run its ``backward``, which is exactly what raises the cryptic error.)

Under distributed engines. The first-batch diagnosis runs its own forward on the unwrapped
model; how it gets gradients decides whether it disturbs the engine:

* DDP and DeepSpeed ZeRO-1/2 reduce gradients from hooks that run when ``AccumulateGrad``
  writes ``param.grad`` (DDP's reducer hooks on the grad accumulator; DeepSpeed registers
  ``param.register_post_accumulate_grad_hook``). A ``loss.backward()`` fires them — under ZeRO-2
  the real step then fails with "Gradient computed twice for this partition". So the diagnosis
  uses ``diagnose(..., backward="autograd_grad")``: ``torch.autograd.grad(loss, params)``
  returns the gradients without executing ``AccumulateGrad``, so ``.grad`` is never written and
  no post-accumulate hook fires (tested in
  ``tests/ocrmem/test_deepspeed.py``: on hooked parameters, and in a 2-rank ZeRO-2 run).
* ZeRO-3 and FSDP shard the parameters and insert gather/reshard steps into the autograd
  graph itself, which any backward (``autograd.grad`` included) would run on one rank only. There
  the diagnosis is graph-only (``backward="none"``): it answers from the autograd graph (which
  trainable parameters the loss reaches, and why not) without a backward, and it runs exactly
  once per rank (no "try the next batch"), so every rank runs the same forwards and gathers.
  Rank-local re-diagnoses (a loss without ``grad_fn``) are skipped there for the same reason.

Under DeepSpeed the gradients live in DeepSpeed's buffers, not in ``param.grad``. The per-step
checks read each micro-batch's gradient instead as it arrives at the parameter (a tensor hook on
the leaf, which runs before ``AccumulateGrad`` and so before DeepSpeed's reduction), rank-local:
finite, and non-zero when this rank's micro-batch used memory. ``proj_grad_norm`` is not logged
there (it would be a rank-local figure beside HF's global ``grad_norm``, which under adapter-only
training is already the norm of the trainable adapter's gradient).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import OcrMemError

logger = logging.getLogger(__name__)


class TrainingStopped(OcrMemError, RuntimeError):
    """Training was stopped by a :class:`GradFlowCallback` finding.

    Attributes:
        cause: ``broken_grad_flow``, ``no_grad_fn``, ``nan_loss``, ``nan_grad``, ``no_gradient``
            or ``not_trainable``.
        step: The optimizer step (1-based) during which it stopped; 0 = before training.
        report: The diagnostics report behind the decision, when one was run.
    """

    def __init__(self, message: str, *, cause: str, step: int, report: Any = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.step = step
        self.report = report


class LossPlateauWarning(UserWarning):
    """The training loss has not improved for ``patience`` steps."""


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _sharded_engine(args: Any) -> bool:
    """ZeRO-3 or FSDP: parameters are sharded and gathered by collectives inside forward/backward."""
    if getattr(args, "fsdp", None):
        return True
    if getattr(args, "deepspeed", None):
        try:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        except ImportError:
            return False
        return bool(is_deepspeed_zero3_enabled())
    return False


def _findings_text(report: Any) -> str:
    text = getattr(report, "findings_text", None)
    if callable(text):
        return text()
    return "\n".join(f"{f.severity.upper()} [{f.cause}]: {f.message}" for f in getattr(report, "findings", []))


class GradFlowCallback(TrainerCallback):
    """Check gradient flow into the trainable adapter at the first batch and at every step.

    Args:
        watch: Parameter-name prefixes of the adapter to watch (default ``("proj",)``).
        expect_trainable: What the first-batch diagnosis expects to be trainable (default ``watch``).
        diagnose_first_batch: Run :func:`diagnostics.diagnose` on the first batch (costs one extra
            forward + backward once).
        patience: Window length in steps: when the mean loss of a window is not below the best
            earlier window's by ``min_delta`` (and by twice the window's standard error), a
            :class:`LossPlateauWarning` is issued (after the 1st, 2nd, 4th, 8th... such window of
            the run); 0 disables it.
        min_delta: The improvement (absolute, in loss units) that counts as movement.
        log_name: Key of the gradient norm in the logs (default ``"<watch[0]>_grad_norm"``).

    Attributes:
        report: The first-batch diagnostics report (``None`` before, or when it could not run).
        last_grad_norm: The watched parameters' gradient norm at the last optimizer step (``None``
            under DeepSpeed, see the module docstring).
        stats: ``micro_batches``, ``empty_memory_batches``, ``memory_used`` (one bool per
            micro-batch, in order), ``step_losses`` (``(step, mean micro-batch loss)`` per
            optimizer step, unrounded) and ``checked_grad_norms`` (``(step, norm)`` the per-step
            check judged: after the all-reduce under DDP, rank-local under DeepSpeed) of this process.
    """

    MAX_DIAGNOSIS_TRIES = 3  # batches in which the adapter took no part before settling for that

    def __init__(
        self,
        watch: Sequence[str] = ("proj",),
        *,
        expect_trainable: Sequence[str] | None = None,
        diagnose_first_batch: bool = True,
        patience: int = 50,
        min_delta: float = 1e-3,
        log_name: str | None = None,
    ) -> None:
        if isinstance(watch, str):
            watch = (watch,)
        if not watch:
            raise ValueError("`watch` is empty; name the adapter's parameter prefix, e.g. watch=('proj',).")
        if patience < 0:
            raise ValueError(f"`patience` must be >= 0 (0 disables the plateau warning), got {patience}.")
        self.watch = tuple(watch)
        self.expect_trainable = tuple(expect_trainable) if expect_trainable is not None else self.watch
        self.diagnose_first_batch = diagnose_first_batch
        self.patience = patience
        self.min_delta = min_delta
        self.log_name = log_name or f"{self.watch[0]}_grad_norm"
        self.report: Any = None
        self.last_grad_norm: float | None = None
        self.stats: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._model: nn.Module | None = None
        self._control: Any = None
        self._global_step = 0
        self._busy = False  # True while the diagnostics engine runs the model itself
        self._diagnosed = not self.diagnose_first_batch
        self._diagnosis_tries = 0
        self._engine_grads = False  # DeepSpeed: gradients read from tensor hooks, not param.grad
        self._check_grad_finite = True
        self._sharded = False  # ZeRO-3 / FSDP: parameters gathered by collectives in forward
        self._step_norm: float | None = None  # set by on_gradients_ready (AdapterOnlyTrainer)
        self._current_batch: Any = None
        self._step_losses: list[float] = []
        self._step_memory: list[bool] = []
        self._grad_sq: dict[str, torch.Tensor] = {}
        self._window: list[float] = []
        self._best: float | None = None  # best window mean so far
        self._stalled = 0  # windows without progress in a row
        self._stalled_total = 0  # ... in the whole run (rate-limits the warning)
        self.stats = {"micro_batches": 0, "empty_memory_batches": 0, "memory_used": [], "step_losses": [],
                      "checked_grad_norms": []}

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._remove_hooks()
        self._reset_run_state()
        if model is None:
            raise ValueError("GradFlowCallback needs the model (the Trainer passes it to callbacks).")
        self._model, self._control, self._global_step = model, control, state.global_step
        # DeepSpeed keeps gradients in its own partitioned buffers: param.grad says nothing there,
        # so the checks read each micro-batch's gradient on its way into the parameter.
        self._engine_grads = bool(getattr(args, "deepspeed", None))
        self._sharded = _sharded_engine(args)
        # fp16 loss scaling overflows on purpose now and then; the scaler skips those steps.
        self._check_grad_finite = not getattr(args, "fp16", False)
        watched = [(n, p) for n, p in model.named_parameters() if p.requires_grad and self._watched(n)]
        if not watched:
            self._stop(
                "not_trainable",
                f"no trainable parameter matches watch={list(self.watch)}: the adapter is frozen or "
                "missing, so training would change nothing. Unfreeze it (set_trainable_params) "
                "before building the trainer.",
            )
        self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post_forward, with_kwargs=True))
        for name, param in watched:
            if self._engine_grads:
                self._handles.append(param.register_hook(self._incoming_grad_hook(name)))
            else:
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def on_gradients_ready(self, state: Any = None) -> None:
        """The step's gradients are final (after DDP's all-reduce, before clipping): read their norm.

        :class:`~ocrmem.training.AdapterOnlyTrainer` calls this right before HF computes
        ``grad_norm``, so ``proj_grad_norm`` is measured on the same tensors at the same moment.
        """
        if self._engine_grads or self._model is None:
            return
        grads = [p.grad for n, p in self._model.named_parameters() if p.requires_grad and self._watched(n) and p.grad is not None]
        if grads:
            self._step_norm = math.sqrt(float(sum(g.detach().float().pow(2).sum() for g in grads)))
        else:
            self._step_norm = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._global_step = state.global_step
        if self._model is not None:
            self._check_step_gradient()
        self._step_norm = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._global_step = state.global_step
        if self._step_losses:
            loss = sum(self._step_losses) / len(self._step_losses)
            self.stats["step_losses"].append((state.global_step, loss))
            self._check_plateau(loss)
        self._step_losses, self._step_memory = [], []
        self._grad_sq.clear()
        self._current_batch = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # AdapterOnlyTrainer already asked extra_logs(); with a plain Trainer, add them here.
        if logs is None or "loss" not in logs or self.log_name in logs:
            return
        extra = self.extra_logs(state)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hooks()

    def extra_logs(self, state: Any = None) -> dict[str, float]:
        """What this callback adds to a training log entry."""
        extra: dict[str, float] = {"empty_memory_batches": self.stats.get("empty_memory_batches", 0)}
        if self.last_grad_norm is not None:
            extra[self.log_name] = self.last_grad_norm
        return extra

    # ------------------------------------------------------------------ hooks

    def _watched(self, name: str) -> bool:
        return any(name == w or name.startswith(w + ".") for w in self.watch)

    def _active(self, module: nn.Module) -> bool:
        return (
            not self._busy
            and module.training
            and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
        )

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active(module):
            return
        self._current_batch = dict(kwargs) if kwargs else args
        if not self._diagnosed:
            self._diagnosed = True
            self._diagnose_first_batch(self._current_batch)

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active(module):
            return
        loss = _loss_of(output)
        if loss is None:
            return
        value = float(loss.detach().float())
        memory = getattr(output, "memory_used", None) is not False  # unknown (not a MEMModel) = used
        self._step_losses.append(value)
        self._step_memory.append(memory)
        self.stats["micro_batches"] += 1
        self.stats["empty_memory_batches"] += int(not memory)
        self.stats["memory_used"].append(memory)
        step = self._global_step + 1
        if not math.isfinite(value):
            with torch.no_grad():
                largest = max((float(p.detach().abs().max()) for p in module.parameters() if p.requires_grad and p.numel()), default=0.0)
            if not math.isfinite(largest) or largest > 1e4:
                hint = (
                    f"the trainable weights have diverged (largest |w| = {largest:.3g}): an earlier "
                    "update was far too large — lower the learning rate"
                )
            else:
                hint = (
                    f"the trainable weights look sane (largest |w| = {largest:.3g}), so look at this "
                    "batch: its inputs, its labels, the compute dtype (fp16 overflow)"
                )
            self._stop("nan_loss", f"the training loss is {value} at step {step}; {hint}.", step)
        if not loss.requires_grad:
            report = None if self._sharded else self._run_diagnosis(self._current_batch)
            detail = f"\n{_findings_text(report)}" if report is not None else ""
            self._stop(
                "no_grad_fn",
                f"the training loss of step {step} has no grad_fn (memory used: {memory}), so "
                f"backward would raise 'element 0 of tensors does not require grad'. Nothing "
                f"trainable took part in this batch's loss.{detail}",
                step,
                report,
            )

    def _grad_hook(self, name: str) -> Any:
        def hook(param: torch.Tensor) -> None:
            if not self._busy and param.grad is not None:
                # A tensor, not a float: no device sync per micro-batch. The last call of a step
                # sees the fully accumulated gradient.
                self._grad_sq[name] = param.grad.detach().float().pow(2).sum()

        return hook

    def _incoming_grad_hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            # One call per micro-batch with that micro-batch's gradient (not yet accumulated):
            # sum the squares over the step. Read only; the gradient goes on unchanged.
            if not self._busy and grad is not None:
                square = grad.detach().float().pow(2).sum()
                previous = self._grad_sq.get(name)
                self._grad_sq[name] = square if previous is None else previous + square

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checks

    def _check_step_gradient(self) -> None:
        step = self._global_step + 1
        if self._step_norm is not None:  # after the all-reduce: what HF's grad_norm sees
            norm = self._step_norm
        else:  # rank-local, from the accumulate hooks
            norm = math.sqrt(float(sum(self._grad_sq.values()))) if self._grad_sq else 0.0
        # Under DeepSpeed the figure is rank-local (summed over micro-batches): checked, not logged.
        self.last_grad_norm = None if self._engine_grads else norm
        self.stats["checked_grad_norms"].append((step, norm))
        if self._check_grad_finite and not math.isfinite(norm):
            self._stop(
                "nan_grad",
                f"{self.log_name} is {norm} at step {step} (the loss was finite): an overflow in "
                "backward. Lower the learning rate, or use bf16/fp32 instead of fp16.",
                step,
            )
        supervised = any(m and loss != 0.0 for m, loss in zip(self._step_memory, self._step_losses))
        if supervised and norm == 0.0:
            batch = self._current_batch if self._step_memory and self._step_memory[-1] else None
            report = self._run_diagnosis(batch) if batch is not None and not self._sharded else None
            detail = f"\n{_findings_text(report)}" if report is not None else ""
            what = "no gradient" if not self._grad_sq else "an exactly zero gradient"
            self._stop(
                "no_gradient",
                f"{list(self.watch)} got {what} at step {step} although this step's batch used "
                f"memory and had a non-zero loss: gradient flow into the adapter is broken on this "
                f"batch (a no_grad/detach on the adapter's path that depends on the batch?).{detail}",
                step,
                report,
            )

    def _check_plateau(self, loss: float) -> None:
        # Per-step losses of different batches are noisy: compare means over windows of `patience`
        # steps, and count a window as progress only when it beats the best earlier window by more
        # than min_delta and twice its own standard error (a lucky batch is not progress).
        if not self.patience:
            return
        self._window.append(loss)
        if len(self._window) < self.patience:
            return
        window, self._window = self._window, []
        mean = sum(window) / len(window)
        stderr = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window) / len(window))
        if self._best is None or mean < self._best - max(self.min_delta, 2.0 * stderr):
            self._best, self._stalled = mean, 0
            return
        self._stalled += 1
        self._stalled_total += 1
        # Warn after 1, 2, 4, 8... stalled windows in the whole run: a long, slowly creeping run
        # logs a handful of warnings, not one per window.
        if self._stalled_total & (self._stalled_total - 1):
            return
        message = (
            f"the training loss has not moved for {self._stalled * self.patience} steps: its mean over "
            f"the last {self.patience} steps is {mean:.6g} (± {stderr:.2g}), the best earlier window's "
            f"{self._best:.6g} (step {self._global_step}). Check that {list(self.watch)} trains "
            "(proj_grad_norm, empty_memory_batches) and the learning rate."
        )
        logger.warning(message)
        warnings.warn(message, LossPlateauWarning, stacklevel=2)

    def _diagnose_first_batch(self, batch: Any) -> None:
        report = self._run_diagnosis(batch)
        self.report = report
        if report is None:
            return
        if getattr(report, "status", "ok") == "error":
            self._stop(
                "broken_grad_flow",
                "the diagnostics engine found broken gradient flow on the first training batch, "
                "so training stops before the first update:\n" + _findings_text(report),
                self._global_step + 1,
                report,
            )
        findings = getattr(report, "findings", [])
        retry = not self._sharded  # a rank-local extra forward would gather out of step with the other ranks
        if retry and any(f.cause == "unused_param" for f in findings) and self._diagnosis_tries < self.MAX_DIAGNOSIS_TRIES:
            # Typically a batch without memory: proj is on the graph with a zero gradient, which
            # proves little. Look at the next batch too (the per-step checks run meanwhile).
            self._diagnosis_tries += 1
            self._diagnosed = False
            logger.info("batch %d: the adapter took no part (no memory?); diagnosing the next batch as well.", self._diagnosis_tries)
            return
        for finding in findings:
            if finding.severity == "warning":
                logger.warning("first batch: [%s] %s", finding.cause, finding.message)
        logger.info("first batch: gradient flow into %s is healthy.", list(self.expect_trainable))

    def _run_diagnosis(self, batch: Any) -> Any:
        """Run the diagnostics engine on ``batch``; ``None`` when it is unavailable or fails."""
        if batch is None or self._model is None:
            return None
        try:
            from diagnostics import diagnose
        except Exception as err:  # the engine is optional at run time: the per-step checks remain
            logger.warning("diagnostics engine unavailable (%s): skipping the batch diagnosis.", err)
            return None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self._busy = True
        try:
            with torch.random.fork_rng(devices=devices):  # the diagnosis must not shift the training RNG
                return diagnose(
                    self._model, batch, expect_trainable=list(self.expect_trainable), backward=self.diagnosis_backward
                )
        except Exception as err:
            logger.warning("the diagnostics engine failed on this batch (%s: %s); continuing with the per-step checks.", type(err).__name__, err)
            return None
        finally:
            self._busy = False

    @property
    def diagnosis_backward(self) -> str:
        """How the diagnosis gets gradients (see the module docstring): ``"autograd_grad"``, or
        ``"none"`` (graph-only) under ZeRO-3 / FSDP."""
        return "none" if self._sharded else "autograd_grad"

    def _stop(self, cause: str, message: str, step: int = 0, report: Any = None) -> None:
        if self._control is not None:
            self._control.should_training_stop = True
        full = f"GradFlowCallback stopped training ({cause}): {message}"
        logger.error(full)
        raise TrainingStopped(full, cause=cause, step=step, report=report)


class RunStepsCallback(TrainerCallback):
    """Remembers the global step a ``train()`` call started at, so a summary after a resume can
    say how many steps *this run* trained (``state.global_step`` counts from the first run)."""

    def __init__(self) -> None:
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_step = state.global_step  # the checkpoint's step after a resume, else 0

    def trained(self, state: Any) -> int:
        """Optimizer steps this run took."""
        return state.global_step - self.start_step


__all__ = ["GradFlowCallback", "LossPlateauWarning", "RunStepsCallback", "TrainingStopped"]
