"""Crash-safe file writes: a temporary file in the same directory, fsync, then rename (and fsync the directory).

Readers see the old file or the new one, never a torn write: checkpoints, cache shards, manifests, PNGs. A full
disk ends in one DiskFullError naming the path, with the old file intact.
"""
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class DiskFullError(OSError):
    """The disk filled while writing `path`; the file it would have replaced is intact."""

    def __init__(self, path: Path, needed: int = 0):
        self.path, self.needed = Path(path), needed
        free = shutil.disk_usage(self.path.parent if self.path.parent.exists() else ".").free
        need = f", about {needed / 2**20:.1f} MiB needed" if needed else ""
        super().__init__(errno.ENOSPC, f"disk full writing {self.path}: {free / 2**20:.1f} MiB free{need}; "
                                       "the previous version is intact")

    def __str__(self):
        return self.strerror


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temporary file beside path, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result should carry the permissions of an ordinary file.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(path) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
