"""AdapterOnlyTrainer: the HF Trainer for a model in which only the adapter (``proj``) learns."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from . import compat


class AdapterOnlyTrainer(Trainer):
    """A :class:`transformers.Trainer` that accepts ``tokenizer=`` or ``processing_class=`` on every
    supported transformers version without a FutureWarning (the user's problem 5).

    The optimizer sees only parameters with ``requires_grad`` (Trainer's default grouping already
    skips frozen ones), and :meth:`MEMModel.save_pretrained` writes only the trainable weights,
    so checkpoints are adapter-sized.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **compat.trainer_processing_kwargs(kwargs))


__all__ = ["AdapterOnlyTrainer"]
