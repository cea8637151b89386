"""Fast-path data: render history pages in DataLoader workers, lay out memory tokens, mask labels.

An example is a dict with ``history`` (text to compress: older chat turns), ``prompt`` (the
recent user turn) and ``response`` (the assistant answer trained on) — or ``messages`` in the
user's JSONL chat format, split by :func:`split_chat`. The collator produces::

    input_ids       (B, L)   [<|image_pad|> x pages*T] + recent chat tokens, left-padded
    attention_mask  (B, L)
    labels          (B, L)   -100 everywhere except the response (and its <|im_end|>)
    pixel_values    (P, 3, S, S)  all pages of all rows, row order; P may be 0

Any number of pages per row, zero included; the model's ``masked_scatter`` puts page features
where the memory tokens are.

The memory token written literally in text (``"<|image_pad|>"`` in a chat about the model, say)
is refused, not escaped: in ``prompt``/``response`` (tokenised) it would stand for a page feature
that does not exist, and on the seed path anywhere in the chat it would switch compression off.
In ``history`` it is harmless here (history becomes pixels). The error says how to replace it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InputError, InputTypeError
from .modeling import IGNORE_INDEX, left_pad
from .rendering import PageRenderer, pixel_values_from_text


def format_turn(role: str, content: str) -> str:
    """One Qwen chat-template turn."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def split_chat(messages: list[dict[str, str]], where: str = "`messages`") -> dict[str, str]:
    """Split a chat into ``history`` (every turn before the last user turn), ``prompt`` and ``response``.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``.
        where: How error messages name the chat (e.g. ``"data.jsonl:3: `messages`"``).

    Raises:
        InputTypeError: ``messages`` is not a list of ``{"role": str, "content": str}`` dicts.
        ConfigError: The chat does not end with a user turn followed by an assistant turn.
    """
    if not isinstance(messages, (list, tuple)):
        raise InputTypeError(
            f"{where} has type {type(messages).__name__} ({_short(messages)}); it must be a list of turns "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...].'
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputTypeError(
                f"{where}[{i}] has type {type(message).__name__} ({_short(message)}); each turn must be a dict "
                '{"role": ..., "content": ...}.'
            )
        for key in ("role", "content"):
            if key not in message:
                raise InputError(f"{where}[{i}] has no `{key}` (keys: {sorted(message)}); each turn needs `role` and `content`.")
            if not isinstance(message[key], str):
                raise InputTypeError(
                    f"{where}[{i}][{key!r}] has type {type(message[key]).__name__} ({_short(message[key])}); it must be a str."
                )
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise ConfigError(
            f"{where} must end with a user turn then an assistant turn, got roles {roles}; "
            "the assistant turn is what is trained on."
        )
    history = "".join(format_turn(m["role"], m["content"]) for m in messages[:-2])
    return {"history": history, "prompt": messages[-2]["content"], "response": messages[-1]["content"]}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_example(example: Any, where: str, memory_token: str | None = None) -> dict[str, str]:
    """One training example as ``{"history", "prompt", "response"}`` strings, checked.

    Args:
        example: A dict with those keys, or with ``messages`` (chat format).
        where: How error messages name the example (``"example 3"``, ``"data.jsonl:3"``).
        memory_token: When given, refuse it inside ``prompt``/``response``: those are tokenised,
            and a literal memory token there would take a page feature's place (the rendered
            ``history`` may contain it: it becomes pixels).

    Raises:
        InputTypeError: Not a dict, or a field that is not a str (``None`` included).
        InputError: A missing field, or the memory token inside the tokenised text.
    """
    if not isinstance(example, dict):
        raise InputTypeError(
            f"{where} has type {type(example).__name__} ({_short(example)}); an example is a dict with `history`, "
            "`prompt`, `response` (or `messages` in chat format)."
        )
    if "messages" in example:
        example = split_chat(example["messages"], f"{where}: `messages`")
    missing = [k for k in ("history", "prompt", "response") if k not in example]
    if missing:
        raise InputError(
            f"{where} is missing {missing} (keys: {sorted(example)}); give `history`, `prompt`, `response` "
            "(or `messages` in chat format)."
        )
    for key in ("history", "prompt", "response"):
        if not isinstance(example[key], str):
            fix = " Use '' for no history." if key == "history" else ""
            raise InputTypeError(
                f"{where}: `{key}` has type {type(example[key]).__name__} ({_short(example[key])}); it must be a str.{fix}"
            )
    if memory_token:
        for key in ("prompt", "response"):
            if memory_token in example[key]:
                raise InputError(
                    f"{where}: `{key}` contains the memory token {memory_token!r} literally; tokenised, it would stand "
                    f"for a page feature that does not exist. Remove or replace it, e.g. "
                    f"text.replace({memory_token!r}, {memory_token.replace('|', '')!r})."
                )
    return example


class MemoryCollator:
    """Collate examples into a fast-path batch (picklable: usable with ``num_workers > 0``).

    Args:
        tokenizer: The LLM's tokenizer (must know ``memory_token``).
        page_size: Page side in pixels (the encoder's image size).
        tokens_per_page: Vision tokens the encoder emits per page.
        memory_token: Placeholder token for vision embeddings.
        max_pages: Most pages per row; longer history keeps its most recent pages (warned).
        font_path: Font for rendering (``None``: a CJK-capable system font when available).
        font_size: Font size in pixels (``None``: the renderer's default for ``page_size``).
    """

    def __init__(
        self,
        tokenizer: Any,
        page_size: int,
        tokens_per_page: int,
        memory_token: str = "<|image_pad|>",
        max_pages: int = 8,
        font_path: str | None = None,
        font_size: int | None = None,
    ) -> None:
        for name, value in (("tokens_per_page", tokens_per_page), ("max_pages", max_pages)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"MemoryCollator: `{name}` is {value!r}; use a positive int "
                    "(MemoryCollator.for_model(model) takes both from the model)."
                )
        self.tokenizer = tokenizer
        self.memory_token = memory_token
        self.tokens_per_page = tokens_per_page
        self.max_pages = max_pages
        self.memory_token_id = tokenizer.convert_tokens_to_ids(memory_token)
        if self.memory_token_id is None or self.memory_token_id == tokenizer.unk_token_id:
            raise ConfigError(f"`memory_token` {memory_token!r} is not a token of this tokenizer.")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.renderer = PageRenderer(page_size=page_size, font_path=font_path, font_size=font_size)

    @classmethod
    def for_model(cls, model: Any) -> "MemoryCollator":
        """The collator matching a :class:`~ocrmem.modeling.MEMModel`'s encoder, tokenizer and config."""
        return cls(model._require_tokenizer("the collator"), **cls._model_kwargs(model))

    @classmethod
    def _model_kwargs(cls, model: Any) -> dict[str, Any]:
        """The constructor arguments :meth:`for_model` takes from the model (subclasses add theirs)."""
        config = model.config
        return dict(
            page_size=model.page_size,
            tokens_per_page=model.tokens_per_page,
            memory_token=config.memory_token,
            max_pages=config.max_pages,
            font_path=config.font_path,
            font_size=config.font_size,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``examples`` (see the class docstring).

        Raises:
            InputTypeError / InputError: ``examples`` is empty or not a list, or an example is
                malformed (see :func:`check_example`); the message names the example's index.
        """
        if not isinstance(examples, (list, tuple)):
            raise InputTypeError(
                f"MemoryCollator takes a list of examples, got a {type(examples).__name__} ({_short(examples)})."
            )
        if not examples:
            raise InputError(
                "MemoryCollator got an empty list of examples; a batch needs at least one "
                "(check the dataset's length and the DataLoader's batch_size)."
            )
        rows_ids, rows_labels, pages = [], [], []
        for index, example in enumerate(examples):
            example = check_example(example, f"example {index}", self.memory_token)
            row_pages = pixel_values_from_text(self.renderer, example["history"], self.max_pages)  # (p, 3, S, S)
            prompt_ids = self._encode(format_turn("user", example["prompt"]) + "<|im_start|>assistant\n")
            answer_ids = self._encode(f"{example['response']}<|im_end|>\n")
            n_mem = len(row_pages) * self.tokens_per_page
            rows_ids.append([self.memory_token_id] * n_mem + prompt_ids + answer_ids)
            rows_labels.append([IGNORE_INDEX] * (n_mem + len(prompt_ids)) + answer_ids)
            pages.append(row_pages)
        batch = left_pad(rows_ids, rows_labels, self.pad_id)
        batch["pixel_values"] = torch.cat(pages)  # (P, 3, S, S); P may be 0
        return batch


_NAMES = ["Mochi", "Biscuit", "Luna", "Pepper", "Tofu", "Nori", "Ziggy", "Olive"]
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Perth"]
_COLORS = ["blue", "red", "green", "amber", "violet", "teal", "coral", "ivory"]
_FILLER = [
    "We talked about the weather and the plans for the weekend.",
    "The meeting moved to Thursday afternoon after lunch.",
    "I read two chapters of the book before going to sleep.",
    "The train was late again, so I walked the last part.",
    "We compared notes on the project and fixed a small bug.",
]


def synthetic_memory_examples(n: int, seed: int = 0, filler_turns: int = 6) -> list[dict[str, str]]:
    """A memory task: each fact lives only in the (rendered) history; the question is in the recent text.

    Args:
        n: Number of examples.
        seed: Deterministic generation.
        filler_turns: Unrelated chat turns around the fact, to make the history long.

    Returns:
        Examples with ``history``, ``prompt``, ``response``.
    """
    rng = random.Random(seed)
    facts = [
        ("My cat is called {}.", "What is my cat called?", _NAMES),
        ("I live in {}.", "Which city do I live in?", _CITIES),
        ("My favourite colour is {}.", "What is my favourite colour?", _COLORS),
    ]
    examples = []
    for _ in range(n):
        template, question, values = rng.choice(facts)
        answer = rng.choice(values)
        turns = [rng.choice(_FILLER) for _ in range(filler_turns)]
        turns.insert(rng.randrange(len(turns) + 1), template.format(answer))
        history = "".join(
            format_turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(turns)
        )
        examples.append({"history": history, "prompt": question, "response": answer})
    return examples


def load_jsonl_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read training examples, one JSON object per line: ``{"messages": [...]}`` (the user's chat
    format) or ``{"history", "prompt", "response"}``.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: A line is not valid JSON or not an object; the message names the line.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"load_jsonl_examples: `path` is {_short(path)}; pass the path of a .jsonl file.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data file {str(path)!r} is a directory; pass the .jsonl file itself (one JSON object per line).")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"data file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 JSONL.") from err
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line.") from err
        if not isinstance(example, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(example).__name__}.")
        examples.append(check_example(example, f"{path}:{number}"))
    return examples


def seed_path_batch(
    tokenizer: Any, examples: list[dict[str, Any]], memory_token: str = "<|image_pad|>"
) -> dict[str, torch.Tensor]:
    """What the user's own training fed the model: the whole chat as ``input_ids`` (no pages),
    ``labels = input_ids``, left-padded. The model splits and compresses history itself.

    Raises:
        InputTypeError / InputError: A malformed example, or ``memory_token`` anywhere in the
            text (the whole chat is tokenised here, so it would switch compression off).
    """
    if not examples:
        raise InputError("seed_path_batch got no examples; give at least one.")
    rows = []
    for index, example in enumerate(examples):
        example = check_example(example, f"example {index}", memory_token)
        if memory_token in example["history"]:
            raise InputError(
                f"example {index}: `history` contains the memory token {memory_token!r} literally; on the seed path the "
                "whole chat is tokenised and the model would take it for compressed memory. Remove or replace it, e.g. "
                f"text.replace({memory_token!r}, {memory_token.replace('|', '')!r})."
            )
        text = example["history"] + format_turn("user", example["prompt"])
        text += format_turn("assistant", example["response"])
        rows.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return left_pad(rows, rows, pad_id)


def build_sample_batch(model: Any, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A realistic fast-path batch for ``model``: rendered history pages + recent text with labels."""
    collator = MemoryCollator.for_model(model)
    return collator(synthetic_memory_examples(batch_size, seed=seed))


__all__ = [
    "MemoryCollator",
    "build_sample_batch",
    "check_example",
    "format_turn",
    "load_jsonl_examples",
    "seed_path_batch",
    "split_chat",
    "synthetic_memory_examples",
]
