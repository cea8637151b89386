"""Evidence that the memory carries information: ``eval_memory_gain``.

A loss that goes down proves little about the memory: the frozen LLM can lower its loss on the
replies from the recent text alone. The test is a counterfactual. Each eval batch runs twice:

* with every row's own pages (the ordinary ``eval_loss``), and
* with **shuffled memory** — the pages of the rows that have pages rolled by one row, so each such
  row sees another row's history (same layout: memory tokens, then its own recent text and reply).

``eval_memory_gain`` = mean reply-token loss with shuffled memory − with the row's own memory, over
the rows that have pages (token-weighted). It is > 0 exactly when the model's replies depend on
*which* history it was shown; ~0 means the pages are read as noise (or not read at all).

How it plugs into the HF Trainer (so the numbers land in ``trainer_state.json``'s ``log_history``
and in every reporter): :class:`~ocrmem.training.AdapterOnlyTrainer` calls
:func:`memory_prediction_step` as its ``prediction_step`` when the trainer's ``compute_metrics`` is
:func:`memory_gain_metrics`; it returns per-row sums (B, 4) in place of logits, which HF gathers
across batches and processes, and :func:`memory_gain_metrics` reduces them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import IGNORE_INDEX, left_pad

logger = logging.getLogger(__name__)

# Columns of the per-row statistics memory_prediction_step returns.
OWN_SUM, SHUFFLED_SUM, TOKENS, SHUFFLED = range(4)


def roll_memory(batch: dict[str, torch.Tensor], memory_token_id: int, tokens_per_page: int,
                pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The same batch with each paged row's pages replaced by the next paged row's (rolled by one).

    Args:
        batch: A fast-path batch (``input_ids``, ``attention_mask``, ``labels`` (B, L),
            ``pixel_values`` (P, 3, S, S) in row order).
        memory_token_id: The placeholder id of the memory tokens.
        tokens_per_page: Memory tokens per page.
        pad_id: Left-padding id.

    Returns:
        ``(rolled_batch, moved)`` — ``moved`` (B,) bool marks the rows that got other pages — or
        ``None`` when fewer than two rows have pages (nothing to shuffle).
    """
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    pixel_values = batch.get("pixel_values")
    rows = [(input_ids[b][mask[b]], labels[b][mask[b]]) for b in range(input_ids.shape[0])]
    pages = [int((ids == memory_token_id).sum()) // tokens_per_page for ids, _ in rows]
    paged = [b for b, n in enumerate(pages) if n]
    if len(paged) < 2 or pixel_values is None:
        return None
    starts = np.cumsum([0, *pages]).tolist()
    own_pages = [pixel_values[starts[b]:starts[b + 1]] for b in range(len(rows))]  # (p_b, 3, S, S)
    donor = {b: paged[(i + 1) % len(paged)] for i, b in enumerate(paged)}
    new_ids, new_labels, new_pages = [], [], []
    for b, (ids, lab) in enumerate(rows):
        source = donor.get(b, b)
        text = ids != memory_token_id
        n_mem = pages[source] * tokens_per_page
        new_ids.append([memory_token_id] * n_mem + ids[text].tolist())
        new_labels.append([IGNORE_INDEX] * n_mem + lab[text].tolist())
        new_pages.append(own_pages[source])
    rolled = left_pad(new_ids, new_labels, pad_id, device=input_ids.device)
    rolled["pixel_values"] = torch.cat(new_pages)
    moved = torch.tensor([b in donor for b in range(len(rows))], device=input_ids.device)
    return rolled, moved


def reply_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy over labelled tokens, and the token counts: (B,), (B,)."""
    shift_logits = logits[:, :-1, :].float()  # (B, L-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, L-1)
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1).to(losses.dtype)  # (B,), (B,)


def memory_prediction_step(trainer: Any, model: torch.nn.Module,
                           inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prediction_step`` of the memory-gain evaluation (see the module docstring).

    Returns:
        ``(loss, stats, stats)``: the batch's ordinary loss, and per-row statistics (B, 4) —
        own-memory loss sum, shuffled-memory loss sum, reply tokens, 1.0 if the row's memory was
        shuffled — given as both "logits" and "labels" so HF gathers them and calls
        ``compute_metrics``.
    """
    inputs = trainer._prepare_inputs(inputs)
    inner = trainer.accelerator.unwrap_model(model)
    tokenizer = inner._require_tokenizer("the memory-gain evaluation")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        with trainer.compute_loss_context_manager():
            own = model(**inputs)
        own_sum, tokens = reply_loss_sums(own.logits, own.labels)
        shuffled_sum, moved = own_sum, torch.zeros_like(own_sum)
        rolled = roll_memory(inputs, inner.memory_token_id, inner.tokens_per_page, pad_id)
        # Under DeepSpeed every rank must run the same modules: a rank with nothing to shuffle
        # runs its own batch a second time rather than skipping the forward.
        if rolled is not None or trainer.is_deepspeed_enabled:
            second, moved_rows = rolled if rolled is not None else (inputs, torch.zeros_like(own_sum, dtype=torch.bool))
            with trainer.compute_loss_context_manager():
                other = model(**second)
            shuffled_sum, _ = reply_loss_sums(other.logits, other.labels)
            moved = moved_rows.to(own_sum.dtype)
    stats = torch.stack([own_sum, shuffled_sum, tokens, moved], dim=1)  # (B, 4)
    return own.loss.detach().mean(), stats, stats


def memory_gain_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for :func:`memory_prediction_step`'s statistics (HF adds the ``eval_`` prefix).

    Returns:
        ``memory_gain`` (shuffled − own mean reply loss, token-weighted, over the rows whose memory
        was shuffled), ``loss_own_memory`` and ``loss_shuffled_memory`` over those rows, and
        ``memory_rows`` (how many). Without such rows only ``memory_rows`` = 0 (and a warning).
    """
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 4)
    stats = stats[stats[:, TOKENS] >= 0]  # HF pads uneven gathers with -100
    moved = stats[stats[:, SHUFFLED] > 0.5]
    tokens = moved[:, TOKENS].sum()
    if not len(moved) or tokens == 0:
        logger.warning(
            "eval_memory_gain: no eval batch had two rows with compressed history, so no memory could be "
            "shuffled; use a larger eval batch or eval data with histories longer than context_threshold."
        )
        return {"memory_rows": 0.0}
    own = moved[:, OWN_SUM].sum() / tokens
    shuffled = moved[:, SHUFFLED_SUM].sum() / tokens
    return {
        "memory_gain": float(shuffled - own),
        "loss_own_memory": float(own),
        "loss_shuffled_memory": float(shuffled),
        "memory_rows": float(len(moved)),
    }


__all__ = ["memory_gain_metrics", "memory_prediction_step", "reply_loss_sums", "roll_memory"]
