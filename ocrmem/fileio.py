"""Crash-safe, readable file writes shared by every writer in ``ocrmem``.

``atomic_write`` writes through a temporary file in the target's directory and renames it over
the target, so a reader (or a resumed run) never sees half a file; the result gets the mode a
plain ``open()`` would give (0644 under umask 022), not ``mkstemp``'s or safetensors' 0600.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``.

    The file ends up with the mode a plain ``open(path, "w")`` would give (0644 under umask 022):
    ``mkstemp`` creates 0600, and safetensors >= 0.6 writes 0600 too, whatever the file had.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    try:  # Linux: read it, rather than set it for a moment under other threads' feet
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


__all__ = ["atomic_write", "default_file_mode"]
