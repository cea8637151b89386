"""``no_trainable_params``: nothing in the model has ``requires_grad=True``.

Checked before the forward by :func:`diagnostics.params.check_expectations`; the
loss of such a model can have no ``grad_fn``.
"""

from __future__ import annotations

from ._base import ERROR, Finding

NAME = "no_trainable_params"
ORDER = 45
MEANING = "the model has no parameter with requires_grad=True"
FIX = "unfreeze the part you mean to train (e.g. `model.proj.requires_grad_(True)`)"


def finding(tensor_count: int) -> Finding:
    """The error for a model whose ``tensor_count`` parameter tensors are all frozen."""
    return Finding(
        ERROR,
        NAME,
        f"the model has no trainable parameter ({tensor_count} parameter tensors, all "
        "requires_grad=False): the loss can have no grad_fn. Unfreeze the part you "
        "mean to train, e.g. `model.proj.requires_grad_(True)`.",
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
