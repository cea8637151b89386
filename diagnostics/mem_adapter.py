"""Adapter: load a MEMModel directory and sample batches for the diagnostics.

The only module of :mod:`diagnostics` that imports :mod:`ocrmem`, and only the
public API: ``ocrmem.tiny.write_tiny``, ``ocrmem.MEMModel.from_pretrained`` and
``ocrmem.data`` (collator, JSONL reader, seed-path batches). Loading runs inside
:class:`~diagnostics.load_triage.LoadTriage` so the load-time warnings are
classified, and inside :class:`~diagnostics.freeze.FreezeWatch` so a frozen ``proj``
can be traced back to the line that froze it. With ``data``, every row is also rendered
once more on its own (:func:`scan_rows`, ~6 ms a row on the tiny preset) so that the
renderer's warnings — missing glyphs, pages dropped by ``max_pages`` — and rows without
memory can be reported with their JSONL line (:data:`LAST_DATA_SCAN`,
:mod:`diagnostics.data_findings`) instead of as anonymous Python warnings.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .data_findings import DataScan, RowCheck
from .engine import move_batch
from .errors import CannotRunError
from .paths import check_model_dir
from .freeze import FreezeWatch
from .load_triage import LoadTriage, TriageFinding
from .source import SourceLocation


class LoadedModel(NamedTuple):
    """What :func:`load_model_dir` returns (unpacks as a 4-tuple)."""

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    expect_trainable: list[str]
    triage_findings: list[TriageFinding]


#: parameter name -> where it was frozen, for the last model loaded (see FreezeWatch).
LAST_FREEZE_SITES: dict[str, SourceLocation] = {}

#: what rendering the ``data`` rows of the last :func:`load_model_dir` call found (None without data).
LAST_DATA_SCAN: Optional[DataScan] = None

_ROW_FORMAT = (
    "one JSON object per line: a chat as `ocrmem.train --train-data` reads it ({\"messages\": [...]} or ShareGPT's "
    "{\"conversations\": [...]}), or {\"history\", \"prompt\", \"response\"}"
)
_MISSING_COUNT = re.compile(r"^([\d,]+) characters")


def _import_ocrmem() -> Any:
    try:
        import ocrmem
        import ocrmem.data
        import ocrmem.tiny
    except ImportError as exc:
        raise CannotRunError(f"cannot import ocrmem ({exc}); install the package (`pip install -e .`)") from exc
    return ocrmem


def _tiny_dir() -> Path:
    ocrmem = _import_ocrmem()
    root = Path(tempfile.mkdtemp(prefix="grad_flow_tiny_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return Path(ocrmem.tiny.write_tiny(root / "tiny"))


def expect_trainable_for(model: nn.Module) -> list[str]:
    """``["proj"]`` plus ``model.config.extra_trainable``."""
    extra = list(getattr(getattr(model, "config", None), "extra_trainable", None) or [])
    return ["proj", *[e for e in extra if e != "proj"]]


def load_model_dir(
    path: Optional[str | Path],
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    n_batches: int = 1,
    batch_size: int = 2,
    seed: int = 0,
    data: Optional[str | Path] = None,
    seed_path: bool = False,
) -> LoadedModel:
    """Load a MEMModel dir (or the embedded tiny model) and build sample batches.

    Args:
        path: a MEMModel directory; ``None`` writes the tiny preset into a temp dir.
        device: where to put the model and batches.
        dtype: floating dtype for the model and floating batch tensors (``None`` keeps).
        n_batches: how many batches (seeds ``seed``, ``seed+1``...).
        batch_size: rows per batch.
        seed: first batch seed.
        data: a JSONL file of the user's examples; batches are its first
            ``n_batches * batch_size`` rows (fewer if the file is shorter).
        seed_path: feed whole chats as ``input_ids`` only (the model splits history itself).

    Returns:
        ``(model, batches, expect_trainable, triage_findings)``.

    Raises:
        CannotRunError: missing directory, ocrmem not importable, loading failed, a ``data``
            file that is missing or not JSONL rows in a known format (``FILE:LINE`` named).
    """
    global LAST_DATA_SCAN
    LAST_DATA_SCAN = None
    ocrmem = _import_ocrmem()
    if path is not None:
        check_model_dir(path)
    n_batches = max(1, n_batches)
    lines: list[int] = []
    chats = False
    if data is not None:  # before loading the model: a bad file fails in a second, not after the load
        examples, lines, chats = read_data_rows(ocrmem, data)
        if chats and seed_path:
            examples = [seed_path_row(sample, line) for sample, line in zip(examples, lines)]
    if path is None:
        path = _tiny_dir()
    path = Path(path)
    watch = FreezeWatch()
    with LoadTriage() as triage:
        try:
            with watch:
                model = ocrmem.MEMModel.from_pretrained(str(path))
        except Exception as exc:
            raise CannotRunError(f"loading `{path}` failed: {type(exc).__name__}: {exc}") from exc
    LAST_FREEZE_SITES.clear()
    LAST_FREEZE_SITES.update(watch.sites_for(model))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.train()
    expect = expect_trainable_for(model)
    if data is None:
        examples = ocrmem.data.synthetic_memory_examples(n_batches * batch_size, seed=seed)
    if seed_path:
        collate: Any = lambda rows: ocrmem.data.seed_path_batch(model.tokenizer, rows)  # noqa: E731
    elif chats:  # the trainer's own collator: the batches training would see
        import ocrmem.chat_data

        collate = ocrmem.chat_data.ChatCollator.for_model(model)
    else:
        collate = ocrmem.data.MemoryCollator.for_model(model)
    batches = []
    for i in range(n_batches):
        rows = examples[i * batch_size : (i + 1) * batch_size]
        if not rows:
            break
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = collate(rows)
        for w in caught:  # with --data the renderer's warnings become findings (scan_rows)
            if data is None or not _is_render_warning(ocrmem, w):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        batches.append(move_batch(batch, device, dtype))
    if data is not None:
        used = examples[: len(batches) * batch_size]
        LAST_DATA_SCAN = DataScan(
            path=str(data),
            rows=scan_rows(ocrmem, model, collate, used, lines, batch_size, seed_path),
            available=len(examples),
            batches_asked=n_batches,
            batches_built=len(batches),
            batch_size=batch_size,
            seed_path=seed_path,
            chats=chats,
            context_threshold=model.config.context_threshold,
            max_pages=model.config.max_pages,
            font_path=model.renderer.font_path,
        )
    return LoadedModel(model, batches, expect, triage.findings(model, expect))


class DataRows(NamedTuple):
    """What :func:`read_data_rows` returns (unpacks as ``(examples, lines)``)."""

    examples: list[dict[str, Any]]
    lines: list[int]
    #: the rows are chats, one example per assistant turn (``{"context", "reply"}``), read by
    #: :func:`ocrmem.chat_data.read_chats` exactly as ``ocrmem.train --train-data`` reads them.
    chats: bool = False


def read_data_rows(ocrmem: Any, data: str | Path) -> DataRows:
    """The examples of a JSONL file and the (1-based) line of each.

    A file of chats (``messages`` or ShareGPT ``conversations``) is read by the trainer's own
    reader, so the diagnosis sees the samples training sees: one per assistant turn, the
    history split by ``context_threshold``. A file of ``{"history", "prompt", "response"}``
    rows (the synthetic task's format) is read as such.

    Raises:
        CannotRunError: missing file, not UTF-8 text, a line that is not a JSON object, a row in
            neither accepted format (the message names ``FILE:LINE`` and the field).
    """
    path = Path(data)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CannotRunError(f"--data `{data}` does not exist; give a JSONL file, {_ROW_FORMAT}") from exc
    except UnicodeDecodeError as exc:
        raise CannotRunError(
            f"--data `{data}` is not UTF-8 text ({exc.reason} at byte {exc.start}; Parquet/Arrow/CSV are not "
            f"read): convert it to JSONL, {_ROW_FORMAT}"
        ) from exc
    except OSError as exc:
        raise CannotRunError(f"reading --data `{data}` failed: {exc}") from exc
    if _first_row_is_chat(text):
        import ocrmem.chat_data as chat_data

        try:
            chats = chat_data.read_chats(path)
        except ValueError as exc:  # ChatDataError: names file:line and the field
            raise CannotRunError(f"--data: {exc} Expected {_ROW_FORMAT}.") from exc
        examples: list[dict[str, Any]] = []
        lines: list[int] = []
        for turns, number in zip(chats.chats, chats.lines):
            samples = chat_data.chat_samples([turns])
            examples.extend(samples)
            lines.extend([number] * len(samples))
        return DataRows(examples, lines, chats=True)
    try:
        examples = ocrmem.data.load_jsonl_examples(path)
    except ValueError as exc:  # ocrmem's ConfigError: a bad JSON line, or a row in the wrong shape
        raise CannotRunError(f"--data: {exc} Expected {_ROW_FORMAT}.") from exc
    lines = [number for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not examples:
        raise CannotRunError(f"--data `{data}` holds no examples; expected {_ROW_FORMAT}")
    for example, number in zip(examples, lines):
        bad = [k for k in ("history", "prompt", "response") if not isinstance(example.get(k), str)]
        if bad:
            raise CannotRunError(
                f"--data {path}:{number}: unknown row format (keys {sorted(example)}; {bad} missing or not "
                f"strings); expected {_ROW_FORMAT}"
            )
    return DataRows(examples, lines)


def _first_row_is_chat(text: str) -> bool:
    """Whether the first non-blank line is a JSON object with ``messages`` or ``conversations``."""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False  # the row reader names the line
        return isinstance(row, dict) and ("messages" in row or "conversations" in row)
    return False


def seed_path_row(sample: dict[str, Any], line: int) -> dict[str, str]:
    """A chat sample as the seed path's ``{"history", "prompt", "response"}`` row (the whole chat up
    to the reply, as the user's own training tokenised it).

    Raises:
        CannotRunError: the reply does not follow a user turn (the seed path's chat shape).
    """
    from ocrmem.data import format_turn

    context = sample["context"]
    if not context or context[-1]["role"] != "user":
        before = context[-1]["role"] if context else "nothing"
        raise CannotRunError(
            f"--seed-path: line {line}: an assistant turn follows {before}, not a user turn; the seed path's "
            "chats alternate user -> assistant. Drop --seed-path to diagnose these chats as ocrmem.train trains on them."
        )
    history = "".join(format_turn(t["role"], t["content"]) for t in context[:-1])
    return {"history": history, "prompt": context[-1]["content"], "response": sample["reply"]}


def _is_render_warning(ocrmem: Any, w: warnings.WarningMessage) -> bool:
    return issubclass(w.category, ocrmem.MissingGlyphWarning) or "max_pages=" in str(w.message)


def scan_rows(
    ocrmem: Any,
    model: Any,
    collate: Any,
    examples: list[dict[str, Any]],
    lines: list[int],
    batch_size: int,
    seed_path: bool,
) -> list[RowCheck]:
    """Render each row's history as the batch path does and record what the renderer warned.

    Fast path: the collator renders ``history`` with its renderer and ``max_pages`` (a chat
    sample: the history :class:`ocrmem.chat_data.ChatCollator` splits off by ``context_threshold``). Seed
    path: the model splits the whole chat (history only when longer than
    ``context_threshold``), decodes it and renders it with its own renderer.
    """
    if seed_path:
        renderer, max_pages = model.renderer, model.config.max_pages
    else:
        renderer, max_pages = collate.renderer, collate.max_pages
    checks = []
    for index, (example, line) in enumerate(zip(examples, lines)):
        if "context" in example:  # a chat sample: the history ChatCollator renders
            ids = [i for turn in collate.tokens.turn_ids(example["context"]) for i in turn]
            history, _ = collate.tokens.split(ids)
            text = collate.tokenizer.decode(history, skip_special_tokens=False) if history else ""
        else:
            text = example["history"]
        if seed_path:
            ids = ocrmem.data.seed_path_batch(model.tokenizer, [example])["input_ids"][0].tolist()
            history, _, _ = model.split_history(ids)
            text = model.tokenizer.decode(history, skip_special_tokens=False) if history else ""
        check = RowCheck(line=line, batch=index // batch_size + 1, pages=0, needed=0)
        if text:
            check.needed = renderer.pages_needed(text)
            check.pages = check.needed if max_pages is None else min(check.needed, max_pages)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                renderer.render_array(text, max_pages)
            for w in caught:
                message = str(w.message)
                if issubclass(w.category, ocrmem.MissingGlyphWarning):
                    count = _MISSING_COUNT.match(message)
                    check.missing = int(count.group(1).replace(",", "")) if count else 1
                    check.missing_message = message
                elif "max_pages=" in message:
                    check.truncated_message = message
        checks.append(check)
    return checks


__all__ = [
    "LAST_DATA_SCAN",
    "LAST_FREEZE_SITES",
    "LoadedModel",
    "expect_trainable_for",
    "DataRows",
    "load_model_dir",
    "read_data_rows",
    "seed_path_row",
    "scan_rows",
]
