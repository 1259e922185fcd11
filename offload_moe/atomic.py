"""Writes that never leave a user's file half-written, and never destroy what is not a file.

A regular file (or a new one) is written next to itself and renamed over: a failed run leaves the old one whole.
Anything else is never renamed over: a symlink is followed to its target (which gets the same rule), and a FIFO or
a device (`/dev/null`, `/dev/stdout`) is written into directly.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UserError


def check_target(path: str | os.PathLike) -> Path:
    """The file `path` names, through any symlink, if a write there can work: its folder exists and it is not a
    folder itself; else a one-line UserError (said before any work is done)."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) and not (target.exists() and os.access(target, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied")
    return target


def _special(target: Path) -> bool:
    """A FIFO, a device or a socket: written into, never replaced."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(mode)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(filename)` writes the content: into a temporary file beside a regular target, then renamed over it
    with the permissions a plain open() would give; straight into a FIFO or device."""
    target = check_target(path)
    if _special(target):
        try:
            write(str(target))
        except OSError as e:  # /dev/full, a FIFO whose reader left
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # not mkstemp's owner-only 0600
        os.replace(tmp, target)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Torch tensors (or numpy arrays: a trace) to `path` as safetensors, by `write_atomic`'s rules."""
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save, save_file
    else:  # torch: imported here, so that `simulate` (numpy only) starts without it
        from safetensors.torch import save, save_file

    def write(name: str) -> None:
        if _special(Path(name)):  # a FIFO or device: the bytes in one write, no seeking
            with open(name, "wb") as f:
                f.write(save(tensors, metadata=metadata))
        else:
            save_file(tensors, name, metadata=metadata)

    write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda name: Path(name).write_text(text))
