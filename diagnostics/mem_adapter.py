"""Adapter: load a MEMModel directory and sample batches for the diagnostics.

The only module of :mod:`diagnostics` that imports :mod:`ocrmem`, and only the
public API: ``ocrmem.tiny.write_tiny``, ``ocrmem.MEMModel.from_pretrained`` and
``ocrmem.data`` (collator, JSONL reader, seed-path batches). Loading runs inside
:class:`~diagnostics.load_triage.LoadTriage` so the load-time warnings are
classified, and inside :class:`~diagnostics.freeze.FreezeWatch` so a frozen ``proj``
can be traced back to the line that froze it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .engine import move_batch
from .errors import CannotRunError
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
        CannotRunError: missing directory, ocrmem not importable, loading failed.
    """
    ocrmem = _import_ocrmem()
    if path is None:
        path = _tiny_dir()
    path = Path(path)
    if not path.is_dir():
        raise CannotRunError(f"MODEL_DIR `{path}` is not a directory")
    if not (path / "config.json").is_file():
        raise CannotRunError(f"MODEL_DIR `{path}` has no config.json: not a MEMModel directory")
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
    try:
        if data is not None:
            examples = ocrmem.data.load_jsonl_examples(data)
        else:
            examples = ocrmem.data.synthetic_memory_examples(max(1, n_batches) * batch_size, seed=seed)
    except (OSError, ValueError, KeyError) as exc:
        raise CannotRunError(f"reading --data `{data}` failed: {exc}") from exc
    if not examples:
        raise CannotRunError(f"--data `{data}` holds no examples")
    collate = (
        (lambda rows: ocrmem.data.seed_path_batch(model.tokenizer, rows))
        if seed_path
        else ocrmem.data.MemoryCollator.for_model(model)
    )
    batches = []
    for i in range(max(1, n_batches)):
        rows = examples[i * batch_size : (i + 1) * batch_size]
        if not rows:
            break
        batches.append(move_batch(collate(rows), device, dtype))
    return LoadedModel(model, batches, expect, triage.findings(model, expect))


__all__ = ["LAST_FREEZE_SITES", "LoadedModel", "expect_trainable_for", "load_model_dir"]
