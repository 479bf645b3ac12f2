"""A directory of fixed-size .npy shards, the manifest that says what they hold, and a record per finished shard.

Shared by the caches that encode a dataset once and stream it afterwards (the AR token cache, the stage-1 latent
cache) and by the image scan of the DALI loader.

    DIR/manifest.json          the cache's identity (what it was built from); a run whose identity differs is
                               refused with the differing fields named
    DIR/{name}-00007.npy       shard 7 of each array, written atomically
    DIR/shard-00007.json       written last: size, sha256, shape and dtype of each of shard 7's arrays

A shard is done when its record exists, so an interrupted build resumes at the missing shards, and several ranks
build one cache together (rank r takes shards r, r + R, ...) without ever writing the same file.

Opening checks, cheaply and always: the manifest and every record parse (a junk file is named), every array has
its recorded size. The content of a random sample of shards (`verify_shards`, 16 by default; a different sample
in each run) is hashed against the records. Readers check the values they read (the token cache: finite tokens,
labels in range), which catches what the sample misses.
"""
import json
import random
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.files import atomic_write, atomic_write_text, sha256_file

MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A cache that cannot be used; the message names the file."""


def num_shards(num_items: int, shard_size: int) -> int:
    return -(-num_items // shard_size)


def shard_len(shard: int, shard_size: int, num_items: int) -> int:
    return min(shard_size, num_items - shard * shard_size)


def shard_file(directory: Path, name: str, shard: int) -> Path:
    return Path(directory) / f"{name}-{shard:05d}.npy"


def record_file(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}.json"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CacheError(f"{path} is not readable JSON ({e}); delete the {what} to rebuild it") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path} holds {type(data).__name__}, not a JSON object; delete the {what} to rebuild it")
    return data


def check_identity(manifest: dict, identity: dict, identity_fields: tuple[str, ...], directory, what: str) -> None:
    """Refuse a cache whose manifest differs from `identity` in any of `identity_fields`, naming each one."""
    diffs = [f"{k}: {what} has {manifest.get(k)!r}, this run needs {identity[k]!r}"
             for k in identity_fields if manifest.get(k) != identity[k]]
    if diffs:
        raise CacheError(f"the {what} in {directory} does not match this run:\n  " + "\n  ".join(diffs)
                         + f"\ndelete {directory} to rebuild it, or point the run at another directory")


class ShardWriter:
    """Creates the manifest, or checks an existing one against `identity` (its `identity_fields` must match;
    other entries, such as where the inputs were found, may change). Every rank of a build may create it: the
    identical file is written atomically."""

    def __init__(self, directory, identity: dict, identity_fields: tuple[str, ...], what: str = "cache"):
        self.dir, self.what = Path(directory), what
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / MANIFEST
        self.num_items, self.shard_size = identity["num_items"], identity["shard_size"]
        if self.path.exists():
            self.manifest = _read_json(self.path, what)
            check_identity(self.manifest, identity, identity_fields, self.dir, what)
        else:
            self.manifest = dict(identity)
            atomic_write_text(self.path, json.dumps(self.manifest, indent=1))

    @property
    def shards(self) -> int:
        return num_shards(self.num_items, self.shard_size)

    def missing(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The shards this rank has to build: those without a record, of the ones it is assigned."""
        return [s for s in range(rank, self.shards, world_size) if not record_file(self.dir, s).exists()]

    def shard_len(self, shard: int) -> int:
        return shard_len(shard, self.shard_size, self.num_items)

    def write(self, shard: int, **arrays: np.ndarray) -> None:
        """Each array to `{name}-{shard}.npy`, then the shard's record, which marks it done."""
        record = {}
        for name, array in arrays.items():
            path = shard_file(self.dir, name, shard)
            atomic_write(path, lambda f, a=array: np.save(f, a))
            record[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path), "shape": list(array.shape),
                            "dtype": str(array.dtype)}
        atomic_write_text(record_file(self.dir, shard), json.dumps(record, indent=1))


def open_shards(directory, names: tuple[str, ...], what: str = "cache", verify_shards: int = 16,
                seed: Optional[int] = None) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """(manifest, {name: [memory-mapped shard arrays]}) of a complete shard directory, checked as described above."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {what} in {directory} ({MANIFEST} missing)")
    manifest = _read_json(path, what)
    for key in ("num_items", "shard_size"):
        if not isinstance(manifest.get(key), int) or manifest[key] <= 0:
            raise CacheError(f"{path}: {key} is {manifest.get(key)!r}; delete the {what} to rebuild it")
    count = num_shards(manifest["num_items"], manifest["shard_size"])
    missing = [s for s in range(count) if not record_file(directory, s).exists()]
    if missing:
        raise CacheError(f"the {what} in {directory} is incomplete ({len(missing)} of {count} shards missing, "
                         f"first {missing[0]}); build it first (it resumes)")
    records = [_read_json(record_file(directory, s), what) for s in range(count)]
    for s, record in enumerate(records):
        for name in names:
            file = shard_file(directory, name, s)
            entry = record.get(name)
            if entry is None or not file.is_file():
                raise CacheError(f"{file} is missing from the {what}; delete {directory} to rebuild it")
            if file.stat().st_size != entry.get("bytes"):
                raise CacheError(f"{file} has {file.stat().st_size} bytes, its record says {entry.get('bytes')} "
                                 f"(truncated or replaced); delete {directory} to rebuild it")
    sample = random.Random(seed).sample(range(count), min(verify_shards, count))
    for s in sample:
        for name in names:
            file = shard_file(directory, name, s)
            if sha256_file(file) != records[s][name]["sha256"]:
                raise CacheError(f"{file} does not match its sha256 (corrupted); delete {directory} to rebuild it")
    arrays = {}
    for name in names:
        arrays[name] = []
        for s in range(count):
            file = shard_file(directory, name, s)
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise CacheError(f"{file} is not a readable .npy file ({e}); delete {directory} to rebuild it") from None
            entry = records[s][name]
            if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
                raise CacheError(f"{file} holds {array.dtype}{list(array.shape)}, its record says "
                                 f"{entry['dtype']}{entry['shape']}; delete {directory} to rebuild it")
            arrays[name].append(array)
    return manifest, arrays
