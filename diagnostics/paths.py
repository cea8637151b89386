"""Path checks the CLIs run before importing torch: a bad path fails in milliseconds, with the fix.

Torch-free on purpose (see :mod:`diagnostics.grad_flow`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CannotRunError


def check_model_dir(path: str | Path) -> None:
    """Raise :class:`CannotRunError` (with the fix) unless ``path`` looks like a MEMModel dir."""
    path = Path(path)
    fix = "give a directory written by MEMModel.save_pretrained or `python -m ocrmem.tiny DIR`, or omit MODEL_DIR for the embedded tiny model"
    if not path.exists():
        raise CannotRunError(f"MODEL_DIR `{path}` does not exist; {fix}")
    if not path.is_dir():
        raise CannotRunError(f"MODEL_DIR `{path}` is not a directory; {fix}")
    if not (path / "config.json").is_file():
        raise CannotRunError(f"MODEL_DIR `{path}` has no config.json: not a MEMModel directory; {fix}")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # the loader names what is wrong with the file
    if isinstance(model_type, str) and model_type != "ocrmem":
        raise CannotRunError(
            f"MODEL_DIR `{path}` holds a {model_type!r} model, not a MEMModel (model_type 'ocrmem'). To diagnose "
            "any other model, write a factory that builds it and a batch and run `python -m diagnostics.grad_flow "
            "--factory my_check.py:build --expect-trainable PREFIX` (see --help); for MEMModel, " + fix
        )


def check_output_path(option: str, target: str, example: str = "report.json") -> None:
    """Fail early, before minutes of diagnosis, if ``target`` cannot be written.

    Creates missing parent folders (as the write would); writes nothing else.

    Raises:
        CannotRunError: ``target`` is a directory, an existing parent is a file, or the
            folder cannot be created or written.
    """
    path = Path(target)
    if path.is_dir():
        raise CannotRunError(f"{option} `{target}` is a directory; give a file path such as {path / example}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CannotRunError(f"{option} `{target}`: `{blocker}` is a file, not a folder; give a path in a writable folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotRunError(
            f"{option} `{target}`: cannot create its folder ({exc.strerror or exc}); give a path in a writable folder"
        ) from exc
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        raise CannotRunError(f"{option} `{target}` is not writable (permission denied); give a path in a writable folder")


__all__ = ["check_model_dir", "check_output_path"]
