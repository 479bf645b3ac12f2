"""Crash-safe file writes: a temporary file in the same directory, fsync, then rename.

Readers see the old file or the new one, never a torn write: checkpoints, cache shards, manifests, PNGs.
Also the content hash that manifests record of the files they were built from.
"""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
