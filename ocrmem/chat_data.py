"""The user's data: JSONL chats → one training sample per assistant turn → fast-path batches.

Two line formats are read (one JSON object per line, blank lines ignored)::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   # OpenAI / Qwen
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}      # ShareGPT / LLaVA

``content`` (``value``) is a string or a list of parts ``{"type": "text", "text": "..."}``, which
are joined. Anything else — a non-text part, ``null``, a missing field, an unknown role, a line that
is not JSON — raises :class:`~ocrmem.errors.ChatDataError` naming ``file:line`` and the field
(``read_chats(..., skip_bad_lines=True)`` collects them instead). No value is ever turned into text
with ``str()``: a Python repr is never trained on.

Samples (as in the user's dataset): **every assistant turn is one sample**. Its context is every
turn before it, in the Qwen chat template; the loss is on the reply only — its tokens and the
end-of-turn token ``<|im_end|>``. In each sample the history (everything before the assistant
marker ``<|im_start|>assistant\\n``, i.e. the whole context) is split exactly like the seed path
(:func:`ocrmem.modeling.split_history_ids`): rendered into pages when longer than
``context_threshold`` tokens, kept as text otherwise. The pages are rendered by
:class:`ChatCollator` inside DataLoader workers (the fast path)::

    compressed:  [<|image_pad|> x pages*T] <|im_start|>assistant\\n REPLY <|im_end|>
    short:       CONTEXT TURNS             <|im_start|>assistant\\n REPLY <|im_end|>
    labels:      -100 ...                                     -100    REPLY <|im_end|>

:func:`summarize` computes, without rendering, what a run will see (rows, samples, compressed
share, pages per sample, characters ``max_pages`` drops, samples longer than the LLM's positions,
glyphs the font lacks).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import MemoryCollator, format_turn
from .errors import ChatDataError
from .modeling import IGNORE_INDEX, left_pad, split_history_ids
from .rendering import PageRenderer, pixel_values_from_text

END_OF_TURN = "<|im_end|>"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# Qwen chat-template tokens: inside a turn's text they would be tokenised as control tokens (a fake
# turn boundary, or a memory slot with no page feature behind it).
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>")
# How many bad line numbers a message lists before "...".
SHOWN_BAD_LINES = 5


@dataclass
class ChatFile:
    """The chats of one JSONL file.

    Attributes:
        path: The file.
        chats: One list of turns (``{"role", "content"}``, roles normalised to :data:`ROLES`) per good row.
        lines: The 1-based line number of each chat.
        skipped: ``(line, reason)`` of every line left out (only with ``skip_bad_lines``).
    """

    path: Path
    chats: list[list[dict[str, str]]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def skipped_message(self) -> str | None:
        """``skipped N bad lines of FILE (lines a, b, ...); first: REASON``, or ``None``."""
        if not self.skipped:
            return None
        numbers = ", ".join(str(n) for n, _ in self.skipped[:SHOWN_BAD_LINES])
        more = ", ..." if len(self.skipped) > SHOWN_BAD_LINES else ""
        return (
            f"skipped {len(self.skipped)} bad line(s) of {self.path} (lines {numbers}{more}); "
            f"first: {self.skipped[0][1]}"
        )


def _content_text(value: Any, where: str) -> str:
    """A turn's content as text: a string, or the joined ``text`` of a list of text parts."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ChatDataError(f"{where} is null; give the turn's text as a string (or a list of text parts).")
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            part_where = f"{where}[{j}]"
            if not isinstance(part, dict):
                raise ChatDataError(f"{part_where} is a {type(part).__name__}; a part is an object {{\"type\": \"text\", \"text\": ...}}.")
            if part.get("type") != "text":
                raise ChatDataError(
                    f"{part_where}.type is {part.get('type')!r}; only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                    "can be trained on — drop the other parts, or skip such lines with --skip-bad-lines."
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatDataError(f"{part_where}.text is {'missing' if 'text' not in part else type(text).__name__}; give the part's text as a string.")
            texts.append(text)
        return "".join(texts)
    raise ChatDataError(f"{where} is a {type(value).__name__} ({json.dumps(value)[:60]}); give a string or a list of text parts.")


def parse_chat(row: Any, where: str) -> list[dict[str, str]]:
    """One JSON row → turns ``{"role": "system"|"user"|"assistant", "content": str}``.

    Args:
        row: The decoded JSON value of the line.
        where: ``file:line``, for the messages.

    Raises:
        ChatDataError: naming ``where`` and the field at fault.
    """
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: expected a JSON object with `messages` (or `conversations`), got a {type(row).__name__}.")
    if "messages" in row and "conversations" in row:
        raise ChatDataError(f"{where}: has both `messages` and `conversations`; keep one.")
    if "messages" in row:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise ChatDataError(
            f"{where}: no `messages` field (keys: {sorted(row)[:8]}); each line needs "
            '{"messages": [{"role": ..., "content": ...}]} or ShareGPT\'s {"conversations": [{"from": ..., "value": ...}]}.'
        )
    turns_in = row[key]
    if not isinstance(turns_in, list):
        raise ChatDataError(f"{where}: `{key}` is a {type(turns_in).__name__}; it must be a list of turns.")
    turns = []
    for i, turn in enumerate(turns_in):
        field_name = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ChatDataError(f"{where}: `{field_name}` is a {type(turn).__name__}; each turn is an object with `{role_key}` and `{text_key}`.")
        if role_key not in turn:
            raise ChatDataError(f"{where}: `{field_name}.{role_key}` is missing; one of {sorted(roles)}.")
        role = turn[role_key]
        if not isinstance(role, str) or role not in roles:
            raise ChatDataError(f"{where}: `{field_name}.{role_key}` is {role!r}, an unknown role; use one of {sorted(roles)}.")
        if text_key not in turn:
            raise ChatDataError(f"{where}: `{field_name}.{text_key}` is missing; give the turn's text.")
        content = _content_text(turn[text_key], f"{where}: `{field_name}.{text_key}`")
        reserved = [token for token in RESERVED_TOKENS if token in content]
        if reserved:
            raise ChatDataError(
                f"{where}: `{field_name}.{text_key}` contains the special token {reserved[0]!r} literally; tokenised, it "
                "would act as a chat-template / memory control token. Remove or escape it in the data."
            )
        turns.append({"role": roles[role], "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise ChatDataError(f"{where}: `{key}` has no assistant turn ({'gpt' if key == 'conversations' else 'assistant'}); nothing to train on.")
    return turns


def read_chats(path: str | Path, skip_bad_lines: bool = False) -> ChatFile:
    """Read a JSONL chat file.

    Raises:
        FileNotFoundError: No such file.
        ChatDataError: A bad line (``file:line`` and the field), unless ``skip_bad_lines``; or the
            file has no good line at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    result = ChatFile(path=path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ChatDataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); one JSON object per line.") from err
                turns = parse_chat(row, where)
            except ChatDataError as err:
                if not skip_bad_lines:
                    raise
                result.skipped.append((number, str(err)))
                continue
            result.chats.append(turns)
            result.lines.append(number)
    if not result.chats:
        detail = f" ({result.skipped_message()})" if result.skipped else ""
        raise ChatDataError(f"{path}: no chat to train on{detail}.")
    return result


def chat_samples(chats: Iterable[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """One sample per assistant turn: ``{"context": turns before it, "reply": its text}``."""
    samples = []
    for turns in chats:
        for k, turn in enumerate(turns):
            if turn["role"] == "assistant":
                samples.append({"context": turns[:k], "reply": turn["content"]})
    return samples


def split_rows(chats: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out a seeded ``fraction`` of the rows (whole chats: no turn of an eval chat is trained on).

    Returns:
        ``(train, held_out)``; ``held_out`` has at least one row when ``fraction > 0`` and there
        are two rows or more.
    """
    if fraction <= 0 or len(chats) < 2:
        return list(chats), []
    order = list(range(len(chats)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(chats) - 1, max(1, round(fraction * len(chats))))
    held = set(order[:n_eval])
    return [c for i, c in enumerate(chats) if i not in held], [c for i, c in enumerate(chats) if i in held]


class ChatTokens:
    """Token layout of chat samples, shared by the collator and :func:`summarize`.

    Args:
        tokenizer: The LLM's tokenizer (Qwen chat-template special tokens).
        assistant_marker: Text opening the reply (``MEMConfig.assistant_marker``).
        context_threshold: History longer than this many tokens is compressed.

    Raises:
        ChatDataError: The tokenizer has no ``<|im_end|>`` token.
    """

    def __init__(self, tokenizer: Any, assistant_marker: str, context_threshold: int) -> None:
        self.tokenizer = tokenizer
        self.context_threshold = context_threshold
        self.marker_ids = self.encode(assistant_marker)
        end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if end_id is None or end_id == tokenizer.unk_token_id:
            raise ChatDataError(f"the tokenizer has no {END_OF_TURN!r} token; chat data needs the Qwen chat template's special tokens.")
        self.end_id = int(end_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn_ids(self, turns: Sequence[dict[str, str]]) -> list[list[int]]:
        """Each turn in the chat template, tokenised on its own (turns are joined at special tokens,
        so the concatenation equals tokenising the joined text)."""
        if not turns:
            return []
        texts = [format_turn(t["role"], t["content"]) for t in turns]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def reply_ids(self, reply: str) -> list[int]:
        """The trained-on tokens: the reply and the end-of-turn token."""
        return self.encode(reply) + [self.end_id]

    def split(self, context_ids: list[int]) -> tuple[list[int], list[int]]:
        """``(history, recent)`` of a sample by the seed path's rule; ``history`` is empty when
        the context is at most ``context_threshold`` tokens (then all of it stays text)."""
        history, recent, _ = split_history_ids(context_ids + self.marker_ids, self.marker_ids, self.context_threshold)
        return history, recent


class ChatCollator(MemoryCollator):
    """Collate chat samples (:func:`chat_samples`) into fast-path batches; picklable, so pages are
    rendered in DataLoader workers. Takes :class:`~ocrmem.data.MemoryCollator`'s arguments plus:

    Args:
        assistant_marker: Text opening the reply.
        context_threshold: History longer than this many tokens becomes pages.
    """

    def __init__(self, tokenizer: Any, *args: Any, assistant_marker: str = "<|im_start|>assistant\n",
                 context_threshold: int = 2048, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        self.tokens = ChatTokens(tokenizer, assistant_marker, context_threshold)

    @classmethod
    def _model_kwargs(cls, model: Any) -> dict[str, Any]:
        """The base collator's arguments plus the seed path's history split settings."""
        config = model.config
        return {**super()._model_kwargs(model), "assistant_marker": config.assistant_marker,
                "context_threshold": config.context_threshold}

    def row(self, sample: dict[str, Any]) -> tuple[list[int], list[int], torch.Tensor]:
        """One sample → ``(input_ids, labels, pages (p, 3, S, S))``."""
        context_ids = [i for ids in self.tokens.turn_ids(sample["context"]) for i in ids]
        reply_ids = self.tokens.reply_ids(sample["reply"])
        history, recent = self.tokens.split(context_ids)
        if history:
            # As the seed path does: decode the history tokens and render that text.
            text = self.tokenizer.decode(history, skip_special_tokens=False)
            pages = pixel_values_from_text(self.renderer, text, self.max_pages)  # (p, 3, S, S)
        else:
            size = self.renderer.page_size
            pages = torch.zeros((0, 3, size, size))
        prefix = [self.memory_token_id] * (len(pages) * self.tokens_per_page) + recent
        return prefix + reply_ids, [IGNORE_INDEX] * len(prefix) + reply_ids, pages

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self.row(sample) for sample in samples]
        batch = left_pad([r[0] for r in rows], [r[1] for r in rows], self.pad_id)
        batch["pixel_values"] = torch.cat([r[2] for r in rows])  # (P, 3, S, S); P may be 0
        return batch


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarize(
    chat_files: Sequence[ChatFile],
    chats: Sequence[list[dict[str, str]]],
    tokens: ChatTokens,
    renderer: PageRenderer,
    *,
    max_pages: int,
    tokens_per_page: int,
    max_positions: int | None,
) -> dict[str, Any]:
    """What training on the samples of ``chats`` will see, computed without rendering a page.

    Args:
        chat_files: The files the chats came from (for rows and skipped lines).
        chats: The chats trained on (all of ``chat_files``' chats, or one side of a split).
        tokens: The token layout (tokenizer, marker, threshold).
        renderer: The page renderer (font, page size).
        max_pages: Most pages per sample.
        tokens_per_page: Memory tokens per page.
        max_positions: The LLM's ``max_position_embeddings`` (``None``: not checked).

    Returns:
        A JSON-ready dict; ``glyphs.missing_chars > 0`` means pages would show empty boxes.
    """
    pages, lengths = [], []
    dropped = truncated = compressed = drawn = missing = 0
    missing_set: set[str] = set()
    for turns in chats:
        turn_ids = tokens.turn_ids(turns)  # each turn tokenised once per chat, not once per sample
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            context_ids = [i for ids in turn_ids[:k] for i in ids]
            history, recent = tokens.split(context_ids)
            n_pages = 0
            if history:
                compressed += 1
                stats = renderer.text_stats(tokens.tokenizer.decode(history, skip_special_tokens=False), max_pages)
                n_pages = stats.kept_pages
                dropped += stats.dropped_chars
                truncated += stats.dropped_chars > 0
                drawn += stats.drawn_chars
                missing += stats.missing_chars
                missing_set |= stats.missing_distinct
            pages.append(n_pages)
            lengths.append(n_pages * tokens_per_page + len(recent) + len(tokens.reply_ids(turn["content"])))
    n = len(pages)
    too_long = sum(length > max_positions for length in lengths) if max_positions else 0
    return {
        "files": [str(f.path) for f in chat_files],
        "rows": len(chats),
        "skipped_lines": sum(len(f.skipped) for f in chat_files),
        "skipped_line_numbers": {str(f.path): [line for line, _ in f.skipped[:SHOWN_BAD_LINES]] for f in chat_files if f.skipped},
        "samples": n,
        "samples_with_compressed_history": compressed,
        "compressed_history_share": compressed / n if n else 0.0,
        "context_threshold": tokens.context_threshold,
        "pages_per_sample": {"min": min(pages, default=0), "median": _median(pages), "max": max(pages, default=0)},
        "max_pages": max_pages,
        "samples_cut_by_max_pages": truncated,
        "chars_dropped_by_max_pages": dropped,
        "tokens_per_sample": {"min": min(lengths, default=0), "median": _median(lengths), "max": max(lengths, default=0)},
        "max_position_embeddings": max_positions,
        "samples_longer_than_max_positions": too_long,
        "glyphs": {
            "font": renderer.font_path,
            "rendered_chars": drawn,
            "missing_chars": missing,
            "missing_distinct": len(missing_set),
            "missing_examples": sorted(missing_set)[:10],
        },
    }


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """The human-readable lines of a :func:`summarize` dict."""
    pages, toks, glyphs = summary["pages_per_sample"], summary["tokens_per_sample"], summary["glyphs"]
    lines = [
        f"{name} data: {summary['rows']:,} rows -> {summary['samples']:,} samples (one per assistant turn)"
        + (f"; {summary['skipped_lines']} bad lines skipped" if summary["skipped_lines"] else ""),
        f"  compressed history (> {summary['context_threshold']} tokens): {summary['samples_with_compressed_history']:,} "
        f"samples ({100 * summary['compressed_history_share']:.1f}%)",
        f"  pages per sample: min {pages['min']}, median {pages['median']:g}, max {pages['max']} (max_pages {summary['max_pages']})",
        f"  characters dropped by max_pages: {summary['chars_dropped_by_max_pages']:,} in {summary['samples_cut_by_max_pages']:,} samples",
        f"  tokens per sample (memory + text): min {toks['min']:,}, median {toks['median']:g}, max {toks['max']:,}; "
        f"longer than max_position_embeddings ({summary['max_position_embeddings']}): {summary['samples_longer_than_max_positions']:,}",
        f"  glyphs: {glyphs['missing_chars']:,} of {glyphs['rendered_chars']:,} rendered characters missing in {glyphs['font']}"
        + (f" ({glyphs['missing_distinct']} distinct, e.g. {''.join(glyphs['missing_examples'][:5])!r})" if glyphs["missing_chars"] else ""),
    ]
    return "\n".join(lines)


__all__ = [
    "ChatCollator",
    "ChatFile",
    "ChatTokens",
    "END_OF_TURN",
    "ROLES",
    "SHAREGPT_ROLES",
    "chat_samples",
    "format_summary",
    "parse_chat",
    "read_chats",
    "split_rows",
    "summarize",
]
