"""ocrmem — OCR memory for a frozen LLM: rendered history → frozen DeepEncoder → trainable proj → frozen LLM.

Only ``proj`` learns. See :mod:`ocrmem.modeling` for the data flow and why the encoder runs
under ``no_grad``.

The public names are imported lazily (PEP 562 module ``__getattr__``): ``import ocrmem`` and
``python -m ocrmem.X --help`` must not pay for torch and transformers (seconds) before argparse
runs. ``from ocrmem import MEMModel`` works as before; it imports :mod:`ocrmem.modeling` then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    CheckpointError,
    ConfigError,
    EmptyMemoryError,
    EmptyMemoryWarning,
    FreshProjectorWarning,
    InputError,
    InputTypeError,
    MissingGlyphWarning,
    OcrMemError,
    RemoteCodeError,
)

__version__ = "0.1.0"

#: public name -> the submodule that defines it (imported on first access).
_LAZY = {
    "MEMConfig": "configuration",
    "MEMModel": "modeling",
    "MEMOutput": "modeling",
}

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .configuration import MEMConfig
    from .modeling import MEMModel, MEMOutput


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ocrmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CheckpointError",
    "ConfigError",
    "EmptyMemoryError",
    "EmptyMemoryWarning",
    "FreshProjectorWarning",
    "InputError",
    "InputTypeError",
    "MEMConfig",
    "MEMModel",
    "MEMOutput",
    "MissingGlyphWarning",
    "OcrMemError",
    "RemoteCodeError",
]
