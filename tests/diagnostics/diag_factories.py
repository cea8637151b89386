"""``--factory`` targets for the CLI tests: FUNC() -> {"model", "batch", "expect_trainable"}."""

from __future__ import annotations

from typing import Any

import zoo


def healthy() -> dict[str, Any]:
    return {"model": zoo.MemLike(), "batch": zoo.make_batch(), "expect_trainable": ["proj"]}


def proj_under_no_grad() -> dict[str, Any]:
    return {"model": zoo.ProjUnderNoGrad(), "batch": zoo.make_batch(), "expect_trainable": ["proj"]}


def blanket_freeze() -> dict[str, Any]:
    return {"model": zoo.BlanketFreeze(), "batch": zoo.make_batch(), "expect_trainable": ["proj"]}


def shape_mismatch() -> dict[str, Any]:
    """Not a gradient problem: the projector's input width does not match the encoder (exit 2)."""
    model = zoo.MemLike()
    model.proj = zoo.make_proj(vision_dim=zoo.VISION_DIM * 2)
    return {"model": model, "batch": zoo.make_batch()}


def not_a_dict() -> list[int]:
    return [1, 2, 3]


class _Chatty(zoo.MemLike):
    """A model whose library code prints to stdout on every forward (as some do)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        print("chatty library: forward called")
        return super().forward(*args, **kwargs)


def chatty() -> dict[str, Any]:
    print("chatty library: building the model")  # like a library's import-time log line on stdout
    return {"model": _Chatty(), "batch": zoo.make_batch(), "expect_trainable": ["proj"]}
