"""Hypothesis strategies for the grad-flow law: what is trainable, what the batch holds, how it runs."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

# The trainable sets the law is checked on (names resolved against the tiny preset in the test).
TRAINABLE_SETS = ("proj", "proj+encoder_last_block", "proj+encoder_lora", "proj+llm_norm")


@dataclass(frozen=True)
class Draw:
    """One drawn scenario."""

    trainable: str  # one of TRAINABLE_SETS
    pages: tuple[int, ...]  # fast path: pages per row (0-3); seed path: 0 = short history, >0 = long
    recent: tuple[int, ...]  # recent-text tokens per row
    checkpointing: bool  # non-reentrant activation checkpointing of the LLM
    seed_path: bool  # model(input_ids, attention_mask, labels) only


@st.composite
def scenarios(draw: st.DrawFn) -> Draw:
    batch = draw(st.integers(1, 3))
    return Draw(
        trainable=draw(st.sampled_from(TRAINABLE_SETS)),
        pages=tuple(draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))),
        recent=tuple(draw(st.lists(st.integers(2, 24), min_size=batch, max_size=batch))),
        checkpointing=draw(st.booleans()),
        seed_path=draw(st.booleans()),
    )


__all__ = ["Draw", "TRAINABLE_SETS", "scenarios"]
