"""``no_trainable_params``: nothing in the model has ``requires_grad=True``.

Checked before the forward by :func:`diagnostics.params.check_expectations`; the
loss of such a model can have no ``grad_fn``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ._base import ERROR, Finding, loc_fields

if TYPE_CHECKING:
    from ..source import SourceLocation

NAME = "no_trainable_params"
ORDER = 45
MEANING = "the model has no parameter with requires_grad=True"
FIX = "unfreeze the part you mean to train (e.g. `model.proj.requires_grad_(True)`)"


def finding(tensor_count: int, site: Optional["SourceLocation"] = None) -> Finding:
    """The error for a model whose ``tensor_count`` parameter tensors are all frozen; ``site``:
    the statement that froze the ones expected to train, when known."""
    where = f" The parameters expected to train were frozen at {site.display()} (`{site.code}`)." if site else ""
    file, line = loc_fields(site)
    return Finding(
        ERROR,
        NAME,
        f"the model has no trainable parameter ({tensor_count} parameter tensors, all "
        f"requires_grad=False): the loss can have no grad_fn.{where} Unfreeze the part you "
        "mean to train, e.g. `model.proj.requires_grad_(True)`.",
        file=file,
        line=line,
    )


__all__ = ["FIX", "MEANING", "NAME", "finding"]
