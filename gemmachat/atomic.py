"""Writing files so that a crash, a full disk or a kill never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gemmachat.errors import UserError


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: readers see the old file or the new, never a mix."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
