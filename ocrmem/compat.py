"""Every difference between the supported transformers versions (4.46.3 .. newest 5.x), in one place.

Nothing else in ``ocrmem`` or ``diagnostics`` may branch on a transformers version: ask this
module instead. Each helper checks for the *feature* (a parameter name, an attribute) rather
than comparing version strings, so a release that back-ports or renames something is handled
by the same code path.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

TRANSFORMERS_VERSION: str = transformers.__version__


def has_qwen3() -> bool:
    """Qwen3 arrived in transformers 4.51; older versions get Qwen2 for the tiny preset."""
    return hasattr(transformers, "Qwen3ForCausalLM")


def has_model_class(name: str) -> bool:
    """Whether this transformers ships the model class ``name`` (``"Idefics3ForConditionalGeneration"``):
    the multimodal families arrived at different versions (Qwen2-VL 4.45, SmolVLM 4.50, ...)."""
    try:
        return getattr(transformers, name, None) is not None
    except (ImportError, RuntimeError):  # a lazy module whose optional dependency is missing
        return False


def tiny_llm_classes() -> tuple[type, type]:
    """The (config class, model class) pair the tiny preset builds: Qwen3, else Qwen2."""
    if has_qwen3():
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    return transformers.Qwen2Config, transformers.Qwen2ForCausalLM


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def dtype_kwarg(dtype: torch.dtype | str | None) -> dict[str, Any]:
    """``from_pretrained`` takes ``dtype=`` in 5.x and ``torch_dtype=`` before."""
    if dtype is None:
        return {}
    # 5.x renamed the config field (and the from_pretrained kwarg) `torch_dtype` -> `dtype`.
    params = inspect.signature(transformers.PretrainedConfig.__init__).parameters
    key = "dtype" if "dtype" in params else "torch_dtype"
    return {key: dtype}


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load progress bars ("Loading weights", 5.x) for loads of local
    tiny files that take milliseconds; restores the previous setting."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


# Every transformers load in the project passes these: local files only, and never code from a
# model directory. With `trust_remote_code=False` transformers raises instead of asking "Do you
# wish to run the custom code? [y/N]" at a terminal (which it does when the argument is None).
NO_REMOTE_CODE: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def load_causal_lm(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a local causal LM directory with no network access and no remote code."""
    from transformers import AutoModelForCausalLM

    with quiet_progress():
        return AutoModelForCausalLM.from_pretrained(path, **NO_REMOTE_CODE, **dtype_kwarg(dtype))


def is_causal_lm_type(model_type: Any) -> bool:
    """Whether ``AutoModelForCausalLM`` of this transformers builds ``model_type`` (a config.json field)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_tokenizer(path: str) -> Any:
    """Load a local tokenizer directory with no network access and no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE)


def trainer_processing_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Rename ``tokenizer=`` to ``processing_class=`` (the name every supported version knows).

    ``tokenizer`` was deprecated in 4.46 (FutureWarning) and removed in 5.0; ``processing_class``
    exists from 4.46 on, so forwarding the new name is silent everywhere.
    """
    kwargs = dict(kwargs)
    if "tokenizer" in kwargs:
        tokenizer = kwargs.pop("tokenizer")
        if kwargs.get("processing_class") is not None and tokenizer is not None:
            raise ValueError(
                "Pass either `tokenizer` or `processing_class` to the trainer, not both "
                "(`tokenizer` is the old name of `processing_class`)."
            )
        if kwargs.get("processing_class") is None:
            kwargs["processing_class"] = tokenizer
    return kwargs


def training_args_checkpointing(enabled: bool, use_reentrant: bool = False) -> dict[str, Any]:
    """TrainingArguments kwargs turning activation checkpointing on (5.x) / gradient checkpointing (4.x)."""
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    prefix = "activation" if "activation_checkpointing" in params else "gradient"
    if not enabled:
        return {f"{prefix}_checkpointing": False}
    return {
        f"{prefix}_checkpointing": True,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": use_reentrant},
    }


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on HF activation checkpointing of ``model`` (named gradient checkpointing before 5.x)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers 5.x also calls `enable_input_require_grads()` for every model fed `input_ids`
    # (4.x only under PEFT): a hook forcing the frozen embedding output to require grad, so the
    # whole frozen LLM is tracked even when nothing trainable lies upstream. Only reentrant
    # checkpointing needs that; non-reentrant does not, so take the hook off again.
    if not use_reentrant and getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing`."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether HF activation checkpointing is on for ``model``."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(model, attr):
            return bool(getattr(model, attr))
    return False


def numpy_safe_globals() -> Any:
    """A context manager letting ``torch.load(weights_only=True)`` read numpy RNG states.

    torch >= 2.6 loads with ``weights_only=True`` by default; transformers 4.46's
    ``Trainer._load_rng_state`` does not allowlist numpy, so resuming from a checkpoint fails with
    "Weights only load failed ... numpy._core.multiarray._reconstruct" (later versions wrap the
    load themselves; nesting this is harmless there).
    """
    import contextlib

    import numpy as np

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: weights_only was not the default
        return contextlib.nullcontext()
    np_core = getattr(np, "_core", None) or np.core
    return safe_globals([np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))])


__all__ = [
    "TRANSFORMERS_VERSION",
    "disable_activation_checkpointing",
    "dtype_kwarg",
    "enable_activation_checkpointing",
    "has_model_class",
    "has_qwen3",
    "is_activation_checkpointing",
    "is_causal_lm_type",
    "NO_REMOTE_CODE",
    "load_causal_lm",
    "load_tokenizer",
    "quiet_progress",
    "numpy_safe_globals",
    "tiny_llm_classes",
    "trainer_processing_kwargs",
    "training_args_checkpointing",
]
