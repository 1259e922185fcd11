"""Writes that never leave a user's file half-written: next to the target, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write torch tensors to `path` through a temporary file in the same folder and a rename."""
    from safetensors.torch import save_file

    target = Path(path)
    if not target.parent.exists():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would make it, not mkstemp's owner-only 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
