"""Teach a (tiny, random) LLM to read memory slots before it is frozen under a trainable ``proj``.

Adapter-only training assumes an LLM that already reads what arrives at its memory tokens — a real
pre-trained LLM reads a LLaVA-style projector's output. The tiny preset's LLM is random: frozen as
it is, it cannot even produce the reply template, so its loss is dominated by tokens ``proj``
cannot influence and there is no reading mechanism for ``proj`` to steer (``eval_memory_gain`` ~0;
see ``benchmarks/memgain/README.md``).

:func:`pretrain_reader` gives it one, cheaply, without rendering or the OCR encoder. Each row is
the synthetic memory task's question and answer in chat format, after ``tokens_per_page x pages``
memory slots (1 to ``max_pages`` pages, like the real layout)::

    slots         (n, H)  noise at the embedding scale x 0.3  +  embed(first token of the answer)
    input_embeds  (L, H)  [slots] + embed(<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n)
    labels        (L,)    -100 except the answer and its <|im_end|>\\n

So the answer can only be read from the slots, and the loss is on the answer, as in
:class:`~ocrmem.data.MemoryCollator`'s batches. Every weight of the LLM trains (the target
embedding included: the slots hold the LLM's *own* input embedding of the answer's first token).
Afterwards a ``proj`` has a simple job: map the page features to (something near) the embedding of
the fact's first token.

:func:`slot_reading_loss` measures the same task on held-out rows, with each row's own slots or
with another row's (``shuffled=True``): the difference is the slot-level analogue of
``eval_memory_gain`` (:mod:`ocrmem.evaluation`).

Deterministic: the rows, the slot noise and the batches come from ``seed`` only (and the result
is bit-identical for a given torch build and thread count).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from .data import format_turn, synthetic_memory_examples
from .errors import ConfigError
from .modeling import IGNORE_INDEX, causal_lm_loss, left_pad

# The rows come from their own random streams, apart from the training (seed) and evaluation
# (seed + 10_000) examples of ocrmem.train's synthetic task.
TRAIN_ROWS_OFFSET = 20_000
HELD_OUT_ROWS_OFFSET = 30_000
NOISE_SCALE = 0.3  # slot noise relative to the embedding std: the answer's embedding stays findable
WARMUP_STEPS = 20  # linear warm-up, then linear decay to 5% of the peak


@dataclass(frozen=True)
class ReaderPretrainingResult:
    """What :func:`pretrain_reader` did: the loss of every step (first and last for a log line)."""

    losses: tuple[float, ...]
    steps: int
    batch_size: int
    learning_rate: float
    seed: int

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        """Mean of the last 10 steps' losses (one step's loss is noisy)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


def slot_reading_rows(tokenizer: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` rows of the slot-reading task: (prompt ids, answer ids), answer = reply + ``<|im_end|>\\n``."""
    rows = []
    for example in synthetic_memory_examples(n, seed=seed, filler_turns=0):
        prompt = format_turn("user", example["prompt"]) + "<|im_start|>assistant\n"
        answer = f"{example['response']}<|im_end|>\n"
        rows.append((_encode(tokenizer, prompt), _encode(tokenizer, answer)))
    return rows


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _memory_token_id(tokenizer: Any, memory_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(memory_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"`memory_token` {memory_token!r} is not a token of this tokenizer; pass one it knows.")
    return int(token_id)


def slot_reading_batch(
    llm: Any,
    rows: list[tuple[list[int], list[int]]],
    slot_tokens: list[int],
    memory_token_id: int,
    pad_id: int,
    generator: torch.Generator,
    slot_sources: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The LLM inputs of one batch of the slot-reading task (see the module docstring).

    Args:
        llm: The causal LM (its input embedding fills the slots; gradient flows into it).
        rows: (prompt ids, answer ids) per row.
        slot_tokens: Memory slots per row (a multiple of the tokens per page).
        memory_token_id: Placeholder id the slots replace.
        pad_id: Left-padding id.
        generator: Draws the slot noise.
        slot_sources: Row ``b`` gets the slots made for row ``slot_sources[b]``'s answer
            (default: its own); for the shuffled-slot measurement.

    Returns:
        ``inputs_embeds`` (B, L, H), ``attention_mask``, ``position_ids`` and ``labels`` (B, L).
    """
    embedding = llm.get_input_embeddings()
    ids = [[memory_token_id] * n + prompt + answer for (prompt, answer), n in zip(rows, slot_tokens)]
    labels = [[IGNORE_INDEX] * (n + len(prompt)) + answer for (prompt, answer), n in zip(rows, slot_tokens)]
    batch = left_pad(ids, labels, pad_id)
    embeds = embedding(batch["input_ids"])  # (B, L, H)
    with torch.no_grad():
        scale = embedding.weight.std()
    sources = slot_sources if slot_sources is not None else range(len(rows))
    slots = []
    for n, source in zip(slot_tokens, sources):
        first_answer_token = rows[source][1][0]
        # Noise of a random strength per row (0.5-2x the embedding scale), then shrunk: the reader
        # must find the answer's embedding under noise, as under an imperfect proj.
        noise = torch.randn(n, embeds.shape[-1], generator=generator) * scale * (0.5 + 1.5 * torch.rand(1, generator=generator))
        slots.append(noise * NOISE_SCALE + embedding.weight[first_answer_token])  # (n, H)
    slot_mask = (batch["input_ids"] == memory_token_id).unsqueeze(-1).expand_as(embeds)  # (B, L, H)
    embeds = embeds.masked_scatter(slot_mask, torch.cat(slots).to(embeds.dtype))
    mask = batch["attention_mask"]
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),  # left padding: positions start at the first real token
        "labels": batch["labels"],
    }


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"`{name}` is {value!r}; use an int >= {minimum}.")


def _forward_loss(llm: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False).logits
    return causal_lm_loss(logits, batch["labels"])


def pretrain_reader(
    llm: Any,
    tokenizer: Any,
    *,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    tokens_per_page: int = 16,
    max_pages: int = 2,
    memory_token: str = "<|image_pad|>",
    num_rows: int = 2048,
) -> ReaderPretrainingResult:
    """Train every weight of ``llm`` on the slot-reading task (module docstring), in place.

    AdamW (no weight decay), ``WARMUP_STEPS`` of linear warm-up then linear decay to 5%, gradient
    norm clipped at 1. On return the LLM is in eval mode with ``requires_grad`` off everywhere
    (it is meant to be frozen next).

    Args:
        llm: A causal LM whose vocabulary holds ``memory_token``.
        tokenizer: Its tokenizer.
        steps: Optimizer steps (0: nothing changes).
        batch_size: Rows per step.
        learning_rate: Peak learning rate.
        seed: Seeds the rows, the slot noise and the batches.
        tokens_per_page: Slots per page (the encoder's tokens per page).
        max_pages: Each row gets 1 to ``max_pages`` pages of slots.
        memory_token: The placeholder token the slots replace.
        num_rows: Distinct (question, answer) rows drawn from.

    Returns:
        A :class:`ReaderPretrainingResult` with every step's loss.

    Raises:
        ConfigError: A count below its minimum, a learning rate that is not > 0, or a
            ``memory_token`` the tokenizer does not know.
    """
    _check_positive_int("steps", steps, 0)
    for name, value in (("batch_size", batch_size), ("tokens_per_page", tokens_per_page),
                        ("max_pages", max_pages), ("num_rows", num_rows)):
        _check_positive_int(name, value, 1)
    if not learning_rate > 0:
        raise ConfigError(f"`learning_rate` is {learning_rate!r}; use a number > 0 (e.g. 3e-3).")
    memory_token_id = _memory_token_id(tokenizer, memory_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = slot_reading_rows(tokenizer, num_rows, seed + TRAIN_ROWS_OFFSET)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)

    params = list(llm.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.05, 1 - step / max(steps, 1))
    )
    llm.train()
    losses = []
    for _ in range(steps):
        batch_rows = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        slot_tokens = [tokens_per_page * rng.randint(1, max_pages) for _ in batch_rows]
        loss = _forward_loss(llm, slot_reading_batch(llm, batch_rows, slot_tokens, memory_token_id, pad_id, generator))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for param in params:
        param.requires_grad_(False)
    llm.eval()
    return ReaderPretrainingResult(tuple(losses), steps, batch_size, learning_rate, seed)


def slot_reading_loss(
    llm: Any,
    tokenizer: Any,
    *,
    shuffled: bool = False,
    num_rows: int = 64,
    seed: int = 0,
    tokens_per_page: int = 16,
    memory_token: str = "<|image_pad|>",
) -> float:
    """Mean answer-token loss on ``num_rows`` held-out rows of the slot-reading task (one page of slots).

    Args:
        shuffled: Give each row the slots of the next row (rolled by one) instead of its own: the
            loss then rises by what the LLM reads from the slots.
        seed: Seeds the held-out rows and their slot noise (the same for ``shuffled`` or not).

    Returns:
        The token-weighted mean loss, in nats.
    """
    _check_positive_int("num_rows", num_rows, 2)
    memory_token_id = _memory_token_id(tokenizer, memory_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = slot_reading_rows(tokenizer, num_rows, seed + HELD_OUT_ROWS_OFFSET)
    sources = [(b + 1) % num_rows for b in range(num_rows)] if shuffled else None
    generator = torch.Generator().manual_seed(seed)
    was_training = llm.training
    llm.eval()
    with torch.no_grad():
        batch = slot_reading_batch(llm, rows, [tokens_per_page] * num_rows, memory_token_id, pad_id, generator, sources)
        loss = float(_forward_loss(llm, batch))
    llm.train(was_training)
    return loss


__all__ = [
    "ReaderPretrainingResult",
    "pretrain_reader",
    "slot_reading_batch",
    "slot_reading_loss",
    "slot_reading_rows",
]
