"""A once-per-dataset scan of an ImageFolder: which files decode, and how a GPU decoder may be fed each one.

DALI fails a whole batch on one bad file, and decodes some files PIL reads differently (CMYK JPEGs) or not at all.
So every file is decoded once with PIL, exactly as ImageFolderDataset decodes it (to_rgb), and the verdict is kept:

    status   0: unreadable (skipped and replaced like ImageFolderDataset does: the next readable file in sorted
                order); 1: the bytes go to DALI as they are (8-bit RGB or greyscale JPEG, RGB PNG: DALI decodes them
                to PIL's values); 2: fed re-encoded from PIL's to_rgb as a lossless PNG (CMYK, 16-bit, palette,
                transparency, other formats), so their values equal the PIL path's
    width, height   the image's size (the crop boxes are computed from it, without opening the file again)
    bytes, crc32    the file's size and checksum: a file that changed since the scan is noticed when it is read
                    and checked again with PIL rather than trusted

The scan lives in shards with a manifest (data/shards.py): one directory per dataset root (by default under
~/.cache/semanticist-fast/scans/, or data.scan_dir), resumable after a kill, and split across ranks (rank r scans
shards r, r + R, ...). Its identity is the sorted list of files and labels; a scan of another list is refused.
"""
import hashlib
import io
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .folder import UNREADABLE_ERRORS
from .shards import CacheError, ShardWriter, open_shards
from .transforms import to_rgb

log = logging.getLogger(__name__)

SCAN_VERSION = 1
UNREADABLE, DIRECT, REENCODE = 0, 1, 2
IDENTITY_FIELDS = ("version", "files_sha256", "num_items", "shard_size")
_NAMES = ("status", "width", "height", "bytes", "crc32")


def files_digest(samples: list[tuple[str, int]], root: str) -> str:
    """sha256 of the (path relative to root, label) list: what a scan, or a cache, was made from."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return digest.hexdigest()


def default_scan_dir(root: str) -> Path:
    """Where the scan of `root` is kept unless data.scan_dir says otherwise (a home every node of a cluster sees)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    resolved = str(Path(root).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return cache / "semanticist-fast" / "scans" / f"{Path(resolved).name}-{digest}"


def direct_to_dali(pil: Image.Image) -> bool:
    """Whether DALI decodes this file's bytes to the values PIL's to_rgb gives."""
    if "transparency" in pil.info:
        return False
    return (pil.format == "JPEG" and pil.mode in ("RGB", "L")) or (pil.format == "PNG" and pil.mode == "RGB")


def inspect_bytes(data: bytes) -> tuple[int, int, int]:
    """(status, width, height) of one file's bytes, decoded fully as ImageFolderDataset decodes them."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            direct = direct_to_dali(pil)
            rgb = to_rgb(pil)  # a full decode: truncation fails here
            return (DIRECT if direct else REENCODE), rgb.width, rgb.height
    except UNREADABLE_ERRORS:
        return UNREADABLE, 0, 0


def reencode(data: bytes) -> bytes:
    """A file's pixels as PIL's to_rgb gives them, as a lossless PNG (every DALI decoder reads it)."""
    with Image.open(io.BytesIO(data)) as pil:
        rgb = to_rgb(pil)
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=1)
    return out.getvalue()


def checksum(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _scan_file(path: str) -> tuple[int, int, int, int, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return UNREADABLE, 0, 0, 0, 0
    status, width, height = inspect_bytes(data)
    return status, width, height, len(data), checksum(data)


def build_scan(samples: list[tuple[str, int]], root: str, directory, shard_size: int = 16384, rank: int = 0,
               world_size: int = 1, threads: int = 0, progress: bool = True,
               stop_after_shards: Optional[int] = None) -> Path:
    """Scan this rank's share of the shards of `samples` into `directory` (resumes a partial scan). threads: PIL
    decodes in parallel (0: one per CPU core)."""
    identity = {"version": SCAN_VERSION, "files_sha256": files_digest(samples, root), "num_items": len(samples),
                "shard_size": shard_size, "root": str(root)}
    writer = ShardWriter(directory, identity, IDENTITY_FIELDS, what="image scan")
    todo = writer.missing(rank, world_size)
    if stop_after_shards is not None:
        todo = todo[:stop_after_shards]
    if not todo:
        return Path(directory)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(writer.shard_len(s) for s in todo), desc="image scan", unit="file")
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # PIL releases the GIL while it decodes
        for shard in todo:
            start = shard * shard_size
            paths = [p for p, _ in samples[start:start + writer.shard_len(shard)]]
            rows = []
            for row in pool.map(_scan_file, paths):
                rows.append(row)
                if bar is not None:
                    bar.update(1)
            columns = list(zip(*rows))
            writer.write(shard, status=np.array(columns[0], np.uint8), width=np.array(columns[1], np.int32),
                         height=np.array(columns[2], np.int32), bytes=np.array(columns[3], np.int64),
                         crc32=np.array(columns[4], np.uint32))
            bad = [paths[i] for i, r in enumerate(rows) if r[0] == UNREADABLE]
            for path in bad:
                log.warning("image scan: %s is unreadable; it is skipped (replaced by the next readable file)", path)
    if bar is not None:
        bar.close()
    return Path(directory)


class Scan:
    """The verdicts of a complete scan, one row per file of the ImageFolder (in its sorted order)."""

    def __init__(self, directory, samples: list[tuple[str, int]], root: str):
        self.dir = Path(directory)
        manifest, arrays = open_shards(self.dir, _NAMES, what="image scan")
        wanted = files_digest(samples, root)
        if manifest.get("files_sha256") != wanted or manifest.get("num_items") != len(samples):
            scanned = str(manifest.get("files_sha256"))[:12]
            raise CacheError(f"the image scan in {self.dir} was made of another list of files "
                             f"({manifest.get('num_items')} files, files_sha256 {scanned}; "
                             f"{root} has {len(samples)}, {wanted[:12]}): files were added, removed or renamed; "
                             f"delete {self.dir} to scan again")
        self.status, self.width, self.height, self.bytes, self.crc32 = (np.concatenate(arrays[n]) for n in _NAMES)
        self.num_unreadable = int((self.status == UNREADABLE).sum())
        if self.num_unreadable == len(samples):
            raise RuntimeError(f"no readable image under '{root}': all {len(samples)} files failed to decode")

    def resolve(self, index: int, also_bad=()) -> int:
        """`index`, or the next file in sorted order the scan found readable (and not in also_bad)."""
        n = len(self.status)
        for step in range(n):
            j = (index + step) % n
            if self.status[j] != UNREADABLE and j not in also_bad:
                return j
        raise RuntimeError(f"no readable image left in {self.dir}")


def scan_folder(samples: list[tuple[str, int]], root: str, directory, world, progress: bool = True,
                threads: int = 0) -> Scan:
    """Build (each rank its share, resuming) and open the scan; `world` has rank, size and barrier(what)."""
    build_scan(samples, root, directory, rank=world.rank, world_size=world.size, progress=progress, threads=threads)
    world.barrier("image scan")
    scan = Scan(directory, samples, root)
    if scan.num_unreadable:
        log.warning("image scan of %s: %d of %d files are unreadable and skipped (their paths are in the scan's "
                    "warnings, status 0 in %s)", root, scan.num_unreadable, len(samples), directory)
    return scan
