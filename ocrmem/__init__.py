"""ocrmem — OCR memory for a frozen LLM: rendered history → frozen DeepEncoder → trainable proj → frozen LLM.

Only ``proj`` learns. See :mod:`ocrmem.modeling` for the data flow and why the encoder runs
under ``no_grad``.
"""

from .configuration import MEMConfig
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
from .modeling import MEMModel, MEMOutput

__version__ = "0.1.0"

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
