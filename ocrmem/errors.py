"""The exception and warning classes of ``ocrmem``.

Callers catch :class:`OcrMemError` for anything this package raises on purpose.
Errors about a value the caller passed also subclass :class:`ValueError`, so code
that already handles ``ValueError`` keeps working.
"""


class OcrMemError(Exception):
    """Base class."""


class ConfigError(OcrMemError, ValueError):
    """A bad config value."""


class ChatDataError(OcrMemError, ValueError):
    """A line of a JSONL chat file cannot be trained on; the message names ``file:line`` and the field."""


class CheckpointError(OcrMemError, ValueError):
    """A checkpoint is missing keys, has wrong shapes or is corrupt."""


class OutputDirLockedError(OcrMemError, RuntimeError):
    """Another live training holds the output dir's lock (its pid and host are in the message)."""


class InputError(OcrMemError, ValueError):
    """A bad argument to ``forward``, the collator or the renderer (wrong shape, range or value)."""


class InputTypeError(OcrMemError, TypeError, ValueError):
    """An argument of the wrong type (a ``list`` where a ``str`` belongs, float token ids).

    Also a ``ValueError``, like every error about a value the caller passed: callers (the
    CLIs) that turn ``ValueError`` into exit 2 need no second clause for it.
    """


class RemoteCodeError(CheckpointError):
    """A model directory asks to run custom code (``auto_map``); ``ocrmem`` never runs it."""


class FreshProjectorWarning(UserWarning):
    """``from_pretrained(..., fresh_proj=True)``: ``proj`` starts from a fresh random init."""


class PixelRangeWarning(UserWarning):
    """``pixel_values`` look like 0..1 pixels rather than pages normalised to [-1, 1]."""


class EmptyMemoryError(OcrMemError, RuntimeError):
    """A batch has no compressed history and ``empty_memory_policy`` is ``"error"``."""


class EmptyMemoryWarning(UserWarning):
    """A batch had no compressed history: ``proj`` took no part and receives zero gradient."""


class MissingGlyphWarning(UserWarning):
    """Rendered text contains characters the font cannot draw."""


__all__ = [
    "ChatDataError",
    "CheckpointError",
    "ConfigError",
    "EmptyMemoryError",
    "EmptyMemoryWarning",
    "FreshProjectorWarning",
    "InputError",
    "InputTypeError",
    "MissingGlyphWarning",
    "OcrMemError",
    "OutputDirLockedError",
    "PixelRangeWarning",
    "RemoteCodeError",
]
