"""Bytes saved for backward per training step, tiny preset: deterministic, so no timing noise.

Configurations (one fast-path batch of 4 rows, one page each):

* encoder **untracked** (ours: the frozen encoder runs under ``no_grad`` because nothing
  trainable lies upstream) vs **tracked** (the user's workaround: the encoder input forced to
  require grad, ``pixel_values.requires_grad_()``, so autograd records the whole encoder);
* LLM activation checkpointing **off** vs **non-reentrant**
  (``model.activation_checkpointing_enable()`` → ``ocrmem.compat.enable_activation_checkpointing``).

What is counted (see ``bench_helpers.SavedTensorBytes``): every tensor that reaches the pack hook
of ``torch.autograd.graph.saved_tensors_hooks`` during forward. With non-reentrant checkpointing
the tensors saved *inside* a checkpointed layer go to the checkpoint's own hooks and are dropped
(recomputed in backward), so they are not counted; the layer inputs the checkpoint keeps for the
recomputation are saved outside its hooks, so they are — reported apart as
``checkpoint_inputs``. Frozen weights that ops save (``Linear`` keeps its weight for the input
gradient) are reported apart as ``weights``: they exist anyway. ``held`` = unique activations +
checkpoint inputs: what the configuration adds to memory until backward.

Each test measures its configuration and the baseline (untracked, off) and stores the ratio; the
timing pytest-benchmark records is one forward + backward of that configuration.
"""

from __future__ import annotations

import pytest
import torch

from bench_helpers import SavedTensorBytes
from ocrmem.data import build_sample_batch

BATCH_SIZE = 4
CONFIGS = {
    "untracked-off": (False, False),
    "tracked-off": (True, False),
    "untracked-nonreentrant": (False, True),
    "tracked-nonreentrant": (True, True),
}
BASELINE = "untracked-off"


def saved_bytes(model, batch: dict[str, torch.Tensor], tracked: bool) -> dict[str, int]:
    """One forward (counted) + backward; returns the byte counts by kind."""
    batch = dict(batch)
    if tracked:
        batch["pixel_values"] = batch["pixel_values"].detach().clone().requires_grad_(True)
    counter = SavedTensorBytes(model)
    with counter:
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.result()


def configure(model, checkpointing: bool):
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    return model.train()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_saved_bytes_per_step(benchmark, tiny_model, config: str) -> None:
    tracked, checkpointing = CONFIGS[config]
    batch = build_sample_batch(tiny_model, batch_size=BATCH_SIZE, seed=0)
    baseline = saved_bytes(configure(tiny_model, False), batch, tracked=False)
    model = configure(tiny_model, checkpointing)
    measured = saved_bytes(model, batch, tracked)
    again = saved_bytes(model, batch, tracked)
    assert measured == again, "saved bytes must be deterministic"

    benchmark.group = "bytes saved for backward, tiny preset"
    benchmark.pedantic(saved_bytes, args=(model, batch, tracked), rounds=3, iterations=1)
    benchmark.extra_info.update(
        {f"{key}": value for key, value in measured.items()},
        config=config,
        encoder_tracked=tracked,
        checkpointing="non-reentrant" if checkpointing else "off",
        # HF checkpoints a decoder layer only in train mode; a frozen LLM left in eval() would
        # silently not checkpoint. Recorded so the table shows whether checkpointing was live.
        llm_train_mode=model.base_llm.training,
        batch_size=BATCH_SIZE,
        pages=int(batch["pixel_values"].shape[0]),
        baseline=BASELINE,
        baseline_held_bytes=baseline["held_bytes"],
        ratio_held_vs_baseline=measured["held_bytes"] / baseline["held_bytes"],
        ratio_total_vs_baseline=measured["total_bytes"] / baseline["total_bytes"],
    )
