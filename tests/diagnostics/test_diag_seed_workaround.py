"""The user's latest workaround (seed-notes): on batches without compressed history, turn the
embeddings into a fresh leaf (`.detach().requires_grad_(True)`). Backward then "works" and
nothing trains; the frozen LLM is tracked for nothing. Diagnosed on a real MEMModel."""

from __future__ import annotations

import inspect

import torch

from diagnostics import diagnose
from ocrmem import MEMModel


class FreshLeafWorkaround(MEMModel):
    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **kwargs):
        if pixel_values is None or not len(pixel_values):
            embeds = self.base_llm.get_input_embeddings()(input_ids)
            embeds = embeds.detach().requires_grad_(True)  # the workaround
            return self.base_llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        return super().forward(input_ids, attention_mask, labels, pixel_values)


def _line_of(text: str) -> int:
    lines, start = inspect.getsourcelines(FreshLeafWorkaround)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_fresh_leaf_workaround_is_an_error_with_waste_pointing_at_the_line(tiny_dir):
    model = FreshLeafWorkaround.from_pretrained(tiny_dir).train()
    ids = torch.randint(0, 1000, (2, 30))
    report = diagnose(model, {"input_ids": ids, "labels": ids}, expect_trainable=["proj"])
    assert report.status == "error"
    assert report.loss.grad_fn is not None  # backward "works": the trap
    unused = next(f for f in report.findings if f.cause == "unused_param")
    assert unused.severity == "error" and any(p.startswith("proj.") for p in unused.params)
    waste = next(f for f in report.findings if f.cause == "wasted_tracking")
    assert waste.module == "base_llm" and waste.line == _line_of("requires_grad_(True)")


def test_same_model_is_healthy_on_a_batch_with_pages(tiny_dir, tiny_batch):
    model = FreshLeafWorkaround.from_pretrained(tiny_dir).train()
    assert diagnose(model, tiny_batch, expect_trainable=["proj"]).status == "ok"
