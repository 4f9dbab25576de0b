"""Atomic file writes: readers see the old file or the whole new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, produce: Callable[[], bytes]) -> Path:
    """Write ``produce()`` to ``path`` via a fsynced temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = produce()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
