"""Cost of the input checks at the top of ``MEMModel.forward`` (:func:`ocrmem.validation.validate_inputs`).

Tiny preset, fast path, a batch the collator built beforehand (the hot path in training), two
sides interleaved (see ``bench_helpers.SideBySide``):

* **checked** — ``model(**batch)`` as shipped: config re-validated, every input checked;
* **unchecked** — the same forward with ``validate_inputs`` and the config check swapped for
  no-ops for the duration of the call.

Timed with ``torch.no_grad`` (forward only), where the checks are the largest share: a training
step adds backward, which the checks do not touch. The ratio checked / unchecked is the overhead.

    python -m pytest benchmarks/test_bench_validation.py -o addopts="" -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import ocrmem.modeling as modeling
from bench_helpers import SideBySide
from ocrmem.configuration import MEMConfig
from ocrmem.data import build_sample_batch

WARMUP_ROUNDS = 3
ROUNDS = 30


@pytest.mark.parametrize("batch_size", [1, 4])
def test_forward_input_check_overhead(benchmark, tiny_model, monkeypatch, batch_size: int) -> None:
    model = tiny_model.eval()
    batch = build_sample_batch(model, batch_size=batch_size, seed=0)
    checked_validate, checked_config = modeling.validate_inputs, MEMConfig._validate

    def checked() -> None:
        with torch.no_grad():
            model(**batch)

    def unchecked() -> None:
        modeling.validate_inputs = lambda *args, **kwargs: None
        MEMConfig._validate = lambda self: None
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            modeling.validate_inputs, MEMConfig._validate = checked_validate, checked_config

    def checks_alone() -> None:
        vocab = model.base_llm.get_input_embeddings().num_embeddings
        model.config._validate()
        checked_validate(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"], None, vocab, model.page_size
        )

    sides = SideBySide({"unchecked": unchecked, "checked": checked, "checks_alone": checks_alone}, baseline="unchecked")
    for _ in range(WARMUP_ROUNDS):
        sides.round()
    sides.reset()
    benchmark.group = "forward input checks, tiny preset (fast path, no_grad)"
    benchmark.pedantic(sides.round, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        sides.summary(),
        batch_size=batch_size,
        pages=int(batch["pixel_values"].shape[0]),
        tokens=int(batch["input_ids"].numel()),
        timed="one round = one forward of each side + the checks alone",
    )
