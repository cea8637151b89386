"""Training-step time, tiny preset: fast path (collator renders) vs seed path (model renders).

Both sides train on the same synthetic chats (:func:`ocrmem.data.synthetic_memory_examples`):

* **fast** — the recommended path, timed as the trainer sees it in one process:
  ``collator(examples)`` (render pages, tokenise, lay out memory tokens) + forward + backward.
  In training the collator runs in DataLoader workers, off the critical path; here it is not.
* **fast_precollated** — forward + backward on a batch the collator built beforehand: what the
  training loop waits for when DataLoader workers render ahead of it.
* **seed** — the user's interface: ``model(input_ids, attention_mask, labels)`` with chat rows
  whose history (everything before the last ``<|im_start|>assistant\\n``) exceeds
  ``context_threshold``; the model decodes, renders, encodes and re-pads inside forward.
  The rows are tokenised once beforehand, as a tokenised dataset gives them.

The seed path's history also holds the last user turn (it ends at the assistant marker), so it
renders a little more text; the page count is recorded to show both encode the same pages.
Rounds interleave the three (see ``bench_helpers.SideBySide``); ratios are seed / fast (the
issue's comparison) and seed / fast_precollated (rendering off the critical path).

    python benchmarks/run.py                      # everything, writes RESULTS.md
    python -m pytest benchmarks/test_bench_train_step.py -o addopts="" -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from bench_helpers import SideBySide
from ocrmem.data import MemoryCollator, format_turn, synthetic_memory_examples
from ocrmem.modeling import IGNORE_INDEX, left_pad

WARMUP_ROUNDS = 2
ROUNDS = 15


def seed_path_batch(tokenizer, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """The user's rows: whole chats as token ids, labels only on the assistant answer, left-padded."""
    rows_ids, rows_labels = [], []
    for example in examples:
        context = example["history"] + format_turn("user", example["prompt"]) + "<|im_start|>assistant\n"
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(f"{example['response']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        rows_ids.append(context_ids + answer_ids)
        rows_labels.append([IGNORE_INDEX] * len(context_ids) + answer_ids)
    return left_pad(rows_ids, rows_labels, tokenizer.pad_token_id)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_train_step_seed_vs_fast(benchmark, tiny_model, batch_size: int) -> None:
    model = tiny_model.train()
    examples = synthetic_memory_examples(batch_size, seed=0)
    collator = MemoryCollator.for_model(model)
    seed_batch = seed_path_batch(model.tokenizer, examples)
    pages = {}

    def fast_step() -> None:
        out = model(**collator(examples))
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        pages["fast"] = out.num_pages

    precollated = collator(examples)

    def fast_precollated_step() -> None:
        out = model(**precollated)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def seed_step() -> None:
        out = model(**seed_batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        pages["seed"] = out.num_pages

    steps = SideBySide(
        {"fast": fast_step, "fast_precollated": fast_precollated_step, "seed": seed_step}, baseline="fast"
    )
    for _ in range(WARMUP_ROUNDS):
        steps.round()
    steps.reset()
    # Every row's history must really be compressed, or the seed side would skip the encoder.
    assert pages["seed"] == pages["fast"] >= batch_size, pages

    benchmark.group = "training step, tiny preset (seed vs fast path)"
    benchmark.pedantic(steps.round, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        steps.summary(extra_pairs=(("seed", "fast_precollated"),)),
        batch_size=batch_size,
        pages=pages["fast"],
        context_threshold=model.config.context_threshold,
        seed_tokens_per_row=int(seed_batch["attention_mask"].sum(1).max()),
        timed="one round = one step of each: fast, fast_precollated, seed",
    )
